"""shared/launch.py: where a process sits in a launch, from the launchers' environment."""

from __future__ import annotations

import warnings

import pytest


def test_a_multi_machine_launch_that_started_a_process_alone_says_so(monkeypatch):
    """`accelerate launch --cpu --num_machines 2` without mpirun sets MASTER_ADDR and no
    WORLD_SIZE (seen from the real launcher): each machine would run the whole job alone."""
    from mrmae.shared.launch import process_rank

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="MASTER_ADDR=127.0.0.1 is set but WORLD_SIZE is not: this process runs alone"):
        assert process_rank() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert process_rank() == (1, 2, 0)
