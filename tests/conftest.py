"""Shared fixtures: real demo tars and a small real teacher (random weights, fixed seed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mrmae.cli import cli
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


def extract(shards, out, format: str = "zarr", *, teacher: str = DINO_TINY, views: int = 2, seed: int = 0,
            image_size: int = 224, **kw) -> dict:
    """`run_extraction` of `shards` (a path or a URL list) into the cache `out` with a small
    real teacher, `views` views per image from `seed`, no progress bars; `kw`: any other
    ExtractConfig field (batch_size, store_pixels, pca, ...). Returns the run's summary."""
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    return run_extraction(ExtractConfig(shards=str(shards), out=str(out), teacher=teacher, format=format,
                                        views=ViewConfig(per_image=views, seed=seed, output_size=image_size),
                                        progress=False, **kw))


def rows(cache, layer: str | None = None, by_name: bool = False) -> dict:
    """Every complete shard's rows of a cache (a FeatureCache, or its root: a path or URL),
    by source URL (`by_name`: by the tar's file name); `layer`: one column family (features)."""
    from mrmae.shared import cache_format as cf

    cache = cache if isinstance(cache, cf.FeatureCache) else cf.FeatureCache(str(cache))
    read = (lambda s: cache.shard(s.source).read(slice(None))) if layer is None else \
        (lambda s: cache.shard(s.source).read(slice(None), layer))
    return {(Path(s.source).name if by_name else s.source): read(s) for s in cache.complete_shards}


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


def put_hostile(path: Path, how: str, text: bytes, elsewhere: Path | None = None) -> bool:
    """Put at `path` (absent) a hostile version of a file whose good bytes are `text`:
    "truncated" (its first half), "huge" (3 GiB, sparse), "a FIFO", "a directory", "a link
    out" (to `elsewhere`, holding `text`). False when `how` is none of them (the caller's own)."""
    import os

    if how == "truncated":
        path.write_bytes(text[:len(text) // 2])
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    elif how == "a FIFO":
        os.mkfifo(path)
    elif how == "a directory":
        path.mkdir()
    elif how == "a link out":
        elsewhere.write_bytes(text)
        path.symlink_to(elsewhere)
    else:
        return False
    return True


class S3:
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API) and s3fs pointed at it through the
    environment, as a user's shell would: AWS_ENDPOINT_URL and fake credentials, nothing in
    code. `bucket()` makes a fresh bucket, so tests never see each other's objects."""

    def __init__(self, endpoint: str):
        import s3fs

        self.endpoint = endpoint
        # the test's own client, which lists afresh every time (objects come and go under it)
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def bucket(self) -> str:
        import uuid

        name = f"mrmae-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def forget_listings(self) -> None:
        """Drop the listings cached by the s3fs instance mrmae uses in this process (fsspec
        shares one per set of options), after another process changed the store."""
        import s3fs

        s3fs.S3FileSystem().invalidate_cache()

    def keys(self, prefix: str) -> list[str]:
        """Every object under `prefix` (a bucket or bucket/path), sorted."""
        return sorted(self.fs.find(prefix))

    def upload(self, paths: list[Path], bucket: str, folder: str = "shards") -> str:
        """Copy local tars into s3://bucket/folder/; their URL list ('::'-joined)."""
        for p in paths:
            self.fs.put_file(str(p), f"{bucket}/{folder}/{p.name}")
        return "::".join(f"s3://{bucket}/{folder}/{p.name}" for p in paths)


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for this test process (each xdist worker starts its own, on a free
    port), stopped at the end. Skipped where the `test` extra (moto[server], s3fs) is missing."""
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield S3(env["AWS_ENDPOINT_URL"])
        finally:
            server.stop()


@pytest.fixture(scope="session")
def demo_cache(demo_shards, tmp_path_factory) -> Path:
    """The three demo shards' cache (ViT-Tiny teacher, 2 views a image from seed 3), extracted
    once per test process for every test that only reads it."""
    root = tmp_path_factory.mktemp("demo-cache") / "c"
    extract(url_list(demo_shards), root, views=2, seed=3, batch_size=12)
    return root


@pytest.fixture(scope="session")
def tiny_caches(demo_shards, tmp_path_factory) -> dict[str, Path]:
    """One real cache of the first demo shard per backend (ViT-Tiny, 6 images x 4 views: 24
    rows, so two features chunks in Zarr), extracted once; tests copy it before crafting it."""
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig

    root = tmp_path_factory.mktemp("tiny-caches")
    out = {}
    for backend in cf.backend_names():
        out[backend] = root / backend
        run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(out[backend]), teacher=DINO_TINY,
                                     format=backend, views=ViewConfig(per_image=4, seed=3), batch_size=12,
                                     progress=False))
    return out



# --- shared by the hostile-input tests (cache files, resume, options) -------------------

@pytest.fixture(scope="session")
def small_cache(demo_shards, tmp_path_factory):
    """A real one-shard cache (6 images, 2 views, ViT-Tiny), copied by each test that crafts it."""
    out = tmp_path_factory.mktemp("cache1") / "c"
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                                 "--teacher", DINO_TINY, "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def one_line_error(r, *words):
    """One error line (after a training run's own start line, where it started)."""
    lines = [x for x in r.output.splitlines() if x.strip() and not x.startswith(("pretrain: ", "finetune: "))]
    assert r.exit_code not in (0, None) and len(lines) == 1 and lines[0].startswith("mrmae: error: "), r.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def error_line(r) -> str:
    """The one `mrmae: error:` line of a failed CliRunner run (exit 1, no traceback)."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output + repr(r.exception)
    return lines[0]


TINY_RUN = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "6",
            "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def run_cli(args: list[str]):
    """The real CLI in this process -> (exit code, stderr lines that are not warnings, result)."""
    r = CliRunner().invoke(cli, args)
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("mrmae: warning", "mrmae: note"))]
    return r.exit_code, errors, r


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def two_shard_caches(demo_shards, tmp_path_factory):
    """(shards, cache a, cache b: a's teacher and width with other views, wide: a 384-wide teacher)."""
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    root = tmp_path_factory.mktemp("resume")
    shards = url_list(demo_shards[:2])
    for name, teacher, seed in (("a", DINO_TINY, 3), ("b", DINO_TINY, 4), ("wide", "dino:vit_small_patch16_224", 3)):
        run_extraction(ExtractConfig(shards=shards, out=str(root / name), teacher=teacher,
                                     views=ViewConfig(per_image=2, seed=seed), batch_size=12, progress=False))
    return shards, root / "a", root / "b", root / "wide"


@pytest.fixture(scope="session")
def trained_on_a(two_shard_caches, tmp_path_factory) -> Path:
    """One epoch (2 steps) of the tiny student on cache a."""
    shards, a, _, _ = two_shard_caches
    out = tmp_path_factory.mktemp("run") / "run"
    code, _, r = run_cli(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(out), *TINY_RUN])
    assert code == 0, r.output + repr(r.exception)
    return out
