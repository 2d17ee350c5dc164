"""Where a micro-batch sits in a run, what the loop hands each step function with its batch.

Its own module so that a step function (`train/engine.py`, fine-tuning's) knows it without
importing the loop that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

# How pretraining's masks are seeded, recorded in config.json and each checkpoint:
# 1 (runs before issue 17, no record): noise of (seed, micro-step), this rank's rows of W x B;
# 2: noise of (seed, optimiser step), the micro-batch's rows of E (`MicroBatch.slot`).
# The two agree when A = 1; a resumed run keeps the rule its checkpoint was trained with.
MASK_SEEDING = 2


@dataclass(frozen=True)
class MicroBatch:
    """Where a micro-batch sits: in `epoch`, the `index`-th of the `accum` micro-batches of
    optimiser step `step` (0-based: the steps done before it), on process `rank` of `world`."""

    epoch: int
    step: int
    index: int
    rank: int
    world: int
    accum: int

    @property
    def micro(self) -> int:
        """The micro-step counter (steps x accum + index): fine-tuning's and the old masks' key."""
        return self.step * self.accum + self.index

    @property
    def slot(self) -> int:
        """Its rows in the effective batch, in micro-batches: rows [slot B, (slot + 1) B) of E."""
        return self.index * self.world + self.rank

    @property
    def slots(self) -> int:
        """Micro-batches in the effective batch: E = slots x B."""
        return self.accum * self.world
