"""mrmae: MR-MAE pretraining with an offline teacher-feature cache.

Stage 1 (`mrmae.extract`) runs a frozen CLIP/DINO teacher once over augmented views and
writes a cache; stage 2 (`mrmae.train`) trains the student from it. `mrmae.shared` is the
contract both speak: view geometry and rendering, teacher specs, the cache format.
"""

__version__ = "0.1.0"
