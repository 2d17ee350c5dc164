"""Where this process sits in a launch (torchrun, accelerate launch), read from the
environment the launchers set; both stages ask here."""

from __future__ import annotations

import os
import warnings


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) alone.

    A rendezvous address without a world size is a multi-machine launch that started this
    process alone: `accelerate launch --cpu --num_machines N` does that without mpirun, and
    every machine would then do the whole job by itself. It is said once, as a warning
    (a MASTER_ADDR left in a shell is harmless), so that nobody mistakes N lone runs for one.
    """
    env = os.environ
    if env.get("MASTER_ADDR") and "WORLD_SIZE" not in env:
        warnings.warn(f"MASTER_ADDR={env['MASTER_ADDR']} is set but WORLD_SIZE is not: this process runs alone "
                      "(accelerate launch --cpu starts several machines only through mpirun; use "
                      "accelerate launch --multi_gpu or torchrun, which join with gloo on CPUs)", stacklevel=2)
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
