"""`python tests/_count_keys.py ARGS` runs `mrmae ARGS` and records the keys of every batch
pretraining trains on: one JSON line {"epoch", "keys"} per micro-batch in
$MRMAE_TEST_KEYS/rank<RANK>.jsonl. The launcher, the loader and its split by node and worker
are the real ones, and so is the step; only what reaches the step is written down
(tests/test_two_nodes.py counts it)."""

from __future__ import annotations

import json
import os

from mrmae.cli import main
from mrmae.train.engine import PretrainStep

_step = PretrainStep.__call__


def _counting(self, batch, where):
    path = os.path.join(os.environ["MRMAE_TEST_KEYS"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"epoch": where.epoch, "keys": list(batch.keys)}) + "\n")
    return _step(self, batch, where)


PretrainStep.__call__ = _counting

if __name__ == "__main__":
    main()
