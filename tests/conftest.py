"""Shared fixtures: real demo tars and a small real teacher (random weights, fixed seed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mrmae.demo import write_demo_shards

# Small real architectures: timm's ViT-Tiny for speed, open_clip's ViT-S-16 where CLIP matters.
DINO_TINY = "dino:vit_tiny_patch16_224"
CLIP_SMALL = "clip:ViT-S-16"


@pytest.fixture(autouse=True)
def _quiet_random_teacher_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
        yield


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> list[Path]:
    """Three tars of 6 images each (18 samples)."""
    return write_demo_shards(tmp_path_factory.mktemp("shards"), num_images=18, shard_size=6, seed=0)


def url_list(paths: list[Path]) -> str:
    return "::".join(str(p) for p in paths)


def launch_two(launcher: str) -> list[str]:
    """The command prefix that starts `python -m mrmae` in 2 processes on this machine.

    `accelerate launch --multi_gpu` is accelerate's torchrun-based launcher; without CUDA
    mrmae's processes then join with gloo, as on a multi-GPU node they would with NCCL.
    (`accelerate launch --cpu` starts several processes only through mpirun.) Port 0: a
    free one, so that tests running side by side do not collide.
    """
    import sys

    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mrmae"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "mrmae"]


def entry_files(shards: Path) -> list[Path]:
    """The complete shards' entries in a cache's `shards/` folder: every `*.json` but the
    `shards` group's own Zarr metadata, `zarr.json` (CACHE_FORMAT.md)."""
    return sorted(p for p in Path(shards).glob("*.json") if p.name != "zarr.json")
