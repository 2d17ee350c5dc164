"""`python tests/_count_keys.py ARGS` runs `mrmae ARGS` and records the keys of every batch
pretraining trains on: one JSON line {"epoch", "keys"} per batch in
$MRMAE_TEST_KEYS/rank<RANK>.jsonl. The launcher, the loader and its split by node and worker
are the real ones; only their output is written down (tests/test_two_nodes.py counts it)."""

from __future__ import annotations

import json
import os

from mrmae.cli import main
from mrmae.train import pretrain

_train_one_epoch = pretrain.train_one_epoch


def _recorded(batches, epoch: int):
    path = os.path.join(os.environ["MRMAE_TEST_KEYS"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    for batch in batches:
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "keys": list(batch["keys"])}) + "\n")
        yield batch


def _counting(model, batches, optimizer, accelerator, epoch, *args, **kwargs):
    return _train_one_epoch(model, _recorded(batches, epoch), optimizer, accelerator, epoch, *args, **kwargs)


pretrain.train_one_epoch = _counting

if __name__ == "__main__":
    main()
