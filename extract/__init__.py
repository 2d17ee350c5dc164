"""Stage 1: run a frozen teacher once over augmented views and write the feature cache.

Rooms, as in clip-retrieval: the reader (`mrmae.shared.shards`: tar shards -> raw samples), `mapper` (decode and
render views), the teacher (`mrmae.shared.teachers`), the writer
(`mrmae.shared.cache_format.ShardWriter`), and `runner`, which drives them per shard.
"""
