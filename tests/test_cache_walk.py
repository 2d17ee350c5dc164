"""A cache walked by CACHE_FORMAT.md alone, with zarr's and webdataset's own APIs.

Caches of both backends, with and without stored views, each with an added teacher, are
made by the real extractor; the reading half (`walk`, `read_zarr_shard`, `read_wds_shard`)
imports nothing of mrmae: it lists what the document says to list, opens groups through
`zarr.open_group(...)["shards"][...]` or tars through `webdataset.WebDataset`, decodes as
the document says, and reads only names the document's field tables give (parsed from
CACHE_FORMAT.md here, so a field renamed on either side breaks the test). What it decodes
must equal what mrmae's own reader (`FeatureCache`) returns for the same views.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import webdataset
import zarr
from conftest import DINO_TINY
from numcodecs import Zstd
from PIL import Image

DOC = Path(__file__).resolve().parents[1] / "CACHE_FORMAT.md"
TARGET = "second"  # the added teacher's target name
GROUP_META = {"attributes": {}, "zarr_format": 3, "node_type": "group"}  # the document's group zarr.json
# zarr names each plain JSON file beside its groups (manifest.json, the entries) as it skips it
pytestmark = [pytest.mark.filterwarnings("ignore:Object at .* is not recognized"),
              pytest.mark.filterwarnings("ignore:.*HAS RANDOM WEIGHTS")]  # (module fixtures: conftest filters per test)


# --- the document's field tables -------------------------------------------------------------


def doc_rows(heading: str) -> list[list[str]]:
    """The cells of the first table under `heading` (a whole line of CACHE_FORMAT.md), header
    row excluded."""
    lines = DOC.read_text().splitlines()
    assert heading in lines, f"CACHE_FORMAT.md has no heading {heading!r}"
    rows = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows[1:] if not set(r[0]) <= set("- ")]


def doc_names(heading: str, column: int = 0) -> list[str]:
    """The first `name` of each row's cell `column` in the table under `heading`."""
    return [re.search(r"`([^`]+)`", r[column]).group(1) for r in doc_rows(heading)]


def documented(name: str, heading: str) -> bool:
    """Whether `name` is one of the table's names (`<i>` standing for a block number,
    `<ext>` for a stored view's extension)."""
    exts = "|".join(re.escape(n.removeprefix("pixels.")) for n in doc_names("## Stored views (`--store-pixels`)", 1))
    for pattern in doc_names(heading):
        regex = re.escape(pattern).replace(re.escape("<i>"), r"\d+").replace(re.escape("<ext>"), f"(?:{exts})")
        if re.fullmatch(regex, name):
            return True
    return False


def check_documented(obj: dict, heading: str, where: str) -> None:
    unknown = [k for k in obj if not documented(k, heading)]
    assert not unknown, f"{where}: {unknown} not in CACHE_FORMAT.md's table under {heading!r}"


MANIFEST = "## manifest.json"
SECTIONS = {"teacher": "### manifest.json `teacher`", "views": "### manifest.json `views`",
            "storage": "### manifest.json `storage`"}
ENTRY = "## shards/&lt;name&gt;.json: a complete shard's entry"
ARRAYS, ATTRS = "## A shard group (zarr backend)", "### Group attributes"
MEMBERS, META = "## The wds backend", "### meta.json"


# --- the reading half: no mrmae below this line, until the comparison -------------------------


def read_json(path: Path, heading: str | None = None) -> dict:
    obj = json.loads(path.read_text())
    if heading:
        check_documented(obj, heading, str(path))
    return obj


def entries(cache: Path) -> list[dict]:
    """What the document says to list: every shards/*.json but the `shards` group's zarr.json."""
    found = [read_json(p, ENTRY) for p in sorted((cache / "shards").glob("*.json")) if p.name != "zarr.json"]
    for e in found:
        for item in e["skipped"]:
            check_documented(item, "### entry `skipped` items", "skipped")
    return found


def dequantize(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """int8 x float16 scale, one scale per token ([..., L]) or per group of channels ([..., L, G])."""
    if scale is None:
        return values.astype(np.float32)
    v, s = values.astype(np.float32), scale.astype(np.float32)
    if s.ndim < v.ndim:
        s = s[..., None]
    return (v.reshape(*s.shape, -1) * s[..., None]).reshape(v.shape)


def decode_pixels(data: bytes, codec: str) -> np.ndarray:
    """A stored view's file -> uint8 [S, S, 3] (CACHE_FORMAT.md, "Stored views")."""
    if codec == "zstd":
        return np.load(io.BytesIO(bytes(Zstd().decode(data))), allow_pickle=False)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def read_zarr_shard(shards: zarr.Group, entry: dict, storage: dict) -> dict:
    """One shard's rows through the `shards` group: {column: array} (features float32)."""
    group = shards[entry["group"].split("/")[1]]
    check_documented(dict(group.attrs), ATTRS, entry["group"])
    names = sorted(group.array_keys())
    assert all(documented(n, ARRAYS) for n in names), names

    def col(name: str) -> np.ndarray:
        assert documented(name, ARRAYS), name
        return group[name][:]

    scale = col("features_scale") if storage["dtype"] == "int8" else None
    rows = {"keys": np.array([str(k) for k in col("keys")]), "view": col("view"), "crop": col("crop"),
            "flip": col("flip"), "features": dequantize(col("features"), scale),
            "attention": col("attention").astype(np.float32), "cls": col("cls").astype(np.float32),
            "image_sha256": col("image_sha256")}
    if storage["pixels"]:
        blob, off = col("pixels").tobytes(), col("pixels_offsets")
        rows["pixels"] = [decode_pixels(blob[off[i]:off[i + 1]], storage["pixels"]) for i in range(len(off) - 1)]
    assert group.attrs["rows"] == len(rows["keys"]) and group.attrs["status"] == "complete"
    return rows


def npy_zst(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(bytes(Zstd().decode(data))), allow_pickle=False)


def read_wds_shard(cache: Path, entry: dict, storage: dict) -> dict:
    """One shard's rows through webdataset: one sample per view, members by their suffix."""
    out: dict[str, list] = {k: [] for k in ("keys", "view", "crop", "flip", "features", "attention", "cls",
                                            "image_sha256", "pixels")}
    for sample in webdataset.WebDataset(str(cache / entry["group"]), shardshuffle=False):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert all(documented(k, MEMBERS) for k in members), sorted(members)
        meta = json.loads(members["meta.json"])
        check_documented(meta, META, sample["__key__"])
        seal = meta.pop("crc32c")  # the crc32c of the JSON text of the fields before it
        assert seal == google_crc32c.value(json.dumps(meta).encode())
        scale = npy_zst(members["scale.npy.zst"]) if storage["dtype"] == "int8" else None
        for k in ("key", "view", "crop", "flip"):
            out["keys" if k == "key" else k].append(meta[k])
        out["image_sha256"].append(np.frombuffer(bytes.fromhex(meta["image_sha256"]), dtype=np.uint8))
        out["features"].append(dequantize(npy_zst(members["features.npy.zst"]), scale))
        for k in ("attention", "cls"):
            out[k].append(npy_zst(members[f"{k}.npy.zst"]).astype(np.float32))
        if storage["pixels"]:
            (ext,) = [k for k in members if k.startswith("pixels.")]
            assert google_crc32c.value(members[ext]) == meta["checksums"]["pixels"]
            out["pixels"].append(decode_pixels(members[ext], storage["pixels"]))
    return {k: (v if k == "pixels" else np.array(v)) for k, v in out.items() if v}


def walk(cache: Path) -> dict[str, dict]:
    """source -> rows of every complete shard of the cache at `cache` (the main one or a target)."""
    manifest = read_json(cache / "manifest.json", MANIFEST)
    for section, heading in SECTIONS.items():
        check_documented(manifest[section], heading, f"manifest.json {section}")
    storage = manifest["storage"]
    rows = {}
    if storage["backend"] == "zarr":
        root = zarr.open_group(str(cache), mode="r")
        assert read_json(cache / "zarr.json") == read_json(cache / "shards" / "zarr.json") == GROUP_META
        for e in entries(cache):
            rows[e["source"]] = read_zarr_shard(root["shards"], e, storage)
    else:
        for e in entries(cache):
            rows[e["source"]] = read_wds_shard(cache, e, storage)
    for e in entries(cache):
        r = rows[e["source"]]
        assert len(r["keys"]) == e["num_views"] == e["num_samples"] * manifest["views"]["per_image"]
        check_files(cache, e, storage["backend"])
    return rows


def check_files(cache: Path, entry: dict, backend: str) -> None:
    """"File lists": the entry binds, by its sha256 and size, the list beside its group
    (`<group>.files`), which lists every file of the group (a tar's members, in order) with
    its size and sha256; nothing else is there."""
    import hashlib
    import tarfile

    ref = entry["file_list"]
    check_documented(ref, "### entry `file_list`", "file_list")
    blob = (cache / (entry["group"] + ".files")).read_bytes()
    assert len(blob) == ref["bytes"] and hashlib.sha256(blob).hexdigest() == ref["sha256"]
    listed = read_json(cache / (entry["group"] + ".files"), "### `<group>.files`")["files"]
    if backend == "zarr":
        group = cache / entry["group"]
        found = {p.relative_to(group).as_posix(): p.read_bytes() for p in group.rglob("*") if p.is_file()}
        assert sum(size for size, _ in listed.values()) == entry["bytes"]
    else:
        with tarfile.open(cache / entry["group"]) as tf:
            found = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        assert list(found) == list(listed)
    assert sorted(found) == sorted(listed)
    for path, (size, digest) in listed.items():
        assert len(found[path]) == size and hashlib.sha256(found[path]).hexdigest() == digest, path


# --- making the caches (mrmae) and comparing with its reader -----------------------------------


@pytest.fixture(scope="module", params=[("zarr", None), ("zarr", "png"), ("wds", None), ("wds", "zstd")],
                ids=lambda p: f"{p[0]}-{p[1] or 'no-pixels'}")
def cache(request, tmp_path_factory):
    """A cache of 2 shards x 2 images x 2 views, a float16 teacher added as TARGET, and the
    temporary a killed writer left: -> (cache dir, source URLs, the temporary's name)."""
    from mrmae.demo import write_demo_shards
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig

    backend, pixels = request.param
    tmp = tmp_path_factory.mktemp(f"walk-{backend}-{pixels}")
    sources = [str(p) for p in write_demo_shards(tmp / "tars", num_images=4, shard_size=2, seed=1)]
    out = tmp / "cache"
    run_extraction(ExtractConfig(shards=sources, out=str(out), teacher=DINO_TINY, format=backend, store_pixels=pixels,
                                 views=ViewConfig(per_image=2, seed=3), batch_size=4, workers=0, progress=False))
    run_extraction(ExtractConfig(shards=[], out=cf.target_root(out, TARGET), teacher=DINO_TINY, dtype="float16",
                                 views_from=str(out), batch_size=4, workers=0, progress=False))
    killed = cf.open_shard_writer(backend, out, sources[0], 4, 192, 196, "int8")  # never finished: a kill
    killed.append(["x"], np.zeros(1), np.ones((1, 4)), np.zeros(1), np.ones((1, 196, 192)), np.ones((1, 196)),
                  np.ones((1, 192)))
    return out, sources, killed.tmp.name


def mrmae_rows(root: Path, target: str | None) -> dict[str, dict]:
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import decode_view

    c = cf.FeatureCache(root, target)
    out = {}
    for e in c.complete_shards:
        shard = c.shard(e.source)
        rows = shard.read(slice(None))
        rows["image_sha256"] = shard.image_digests()
        if c.manifest.storage.pixels:
            rows["pixels"] = [decode_view(shard.stored_pixels(i)).permute(1, 2, 0).numpy() for i in range(len(shard))]
        out[e.source] = rows
    return out


def test_the_document_alone_reads_what_mrmae_reads(cache):
    out, sources, _ = cache
    for root, target in ((out, None), (out / "targets" / TARGET, TARGET)):
        walked, mine = walk(root), mrmae_rows(out, target)
        assert sorted(walked) == sorted(mine) == sorted(sources)
        for src, rows in walked.items():
            assert rows.keys() == mine[src].keys(), (rows.keys(), mine[src].keys())
            for col, value in rows.items():
                if col == "pixels":
                    assert len(value) == len(mine[src][col]) == len(rows["keys"])
                    for a, b in zip(value, mine[src][col]):
                        np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_array_equal(value, np.asarray(mine[src][col]), err_msg=f"{src} {col}")


def test_an_added_teachers_rows_pair_with_the_main_caches_by_entry_name_and_row(cache):
    out, _, _ = cache
    target = out / "targets" / TARGET
    main, added = walk(out), walk(target)
    names = lambda root: {e["group"].split("/")[1].split(".")[0]: e["source"] for e in entries(root)}  # noqa: E731
    assert names(out) == names(target)
    for src in main:
        for col in ("keys", "view", "crop", "flip", "image_sha256"):  # the same views, row by row
            np.testing.assert_array_equal(main[src][col], added[src][col], err_msg=col)
    manifest = read_json(target / "manifest.json", MANIFEST)
    assert manifest["views_from"] == "../.." and manifest["storage"]["dtype"] == "float16"
    assert [p.parent.name for p in (out / "targets").glob("*/manifest.json")] == [TARGET]


def test_zarr_lists_the_hierarchy_and_the_killed_writers_temporary_is_not_among_the_listed_shards(cache):
    out, _, tmp_name = cache
    assert (out / "shards" / tmp_name).exists()  # the killed writer's temporary is there ...
    listed = {e["group"].split("/")[1] for e in entries(out)}
    assert tmp_name.startswith(".tmp-") and tmp_name not in listed  # ... and never listed by the document's rule
    if read_json(out / "manifest.json")["storage"]["backend"] != "zarr":
        assert not (out / "zarr.json").exists() and not (out / "shards" / "zarr.json").exists()
        return
    root = zarr.open_group(str(out), mode="r")
    shards = root["shards"]
    members = set(shards.group_keys())
    assert tmp_name in members  # zarr sees it as a group (it has its own zarr.json): why the rule exists
    assert listed <= members and len(listed) == 2
    target_shards = root["targets"][TARGET]["shards"]
    assert {e["group"].split("/")[1] for e in entries(out / "targets" / TARGET)} == set(target_shards.group_keys())
    tree = str(root.tree())
    assert all(name in tree for name in listed) and "features" in tree and TARGET in tree


def test_a_cache_without_the_shards_group_still_reads_and_clean_adds_it(cache, tmp_path):
    from mrmae.shared import cache_format as cf

    out, sources, _ = cache
    if read_json(out / "manifest.json")["storage"]["backend"] != "zarr":
        pytest.skip("a wds cache has no Zarr groups")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    written = (old / "shards" / "zarr.json").read_bytes()
    for f in (old / "shards" / "zarr.json", old / "targets" / "zarr.json"):  # as written before they existed
        f.unlink()
    with pytest.raises(KeyError):
        zarr.open_group(str(old), mode="r")["shards"]
    before = mrmae_rows(old, None)  # mrmae reads the old layout, ...
    assert sorted(before) == sorted(sources) and len(cf.read_manifest(old).shards) == 2  # (zarr.json is no entry)
    assert cf.clean_cache(old) == []  # ... and `cache clean` adds the groups, removing nothing fresh
    assert (old / "shards" / "zarr.json").read_bytes() == (old / "targets" / "zarr.json").read_bytes() == written
    group = cf.read_manifest(old).shards[0].group.split("/")[1]
    assert zarr.open_group(str(old), mode="r")["shards"][group]["keys"].shape == (4,)


def test_racing_writers_create_the_group_metadata_once_with_the_same_bytes(tmp_path):
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig

    teacher = {"spec": "dino:x", "family": "dino", "arch": "x", "weights": None, "weights_sha256": "0" * 64,
               "input_size": 224, "patch_size": 16, "grid": [14, 14], "dim": 8, "mean": [0.5] * 3, "std": [0.5] * 3,
               "layers": []}
    manifest = cf.new_manifest(teacher, ViewConfig(per_image=2), cf.storage_section("zarr", "int8"), "test")
    errors = []

    def init() -> None:
        try:
            cf.init_cache(tmp_path / "c", manifest)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=init) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shards", "zarr.json"]
    assert [p.name for p in (tmp_path / "c" / "shards").iterdir()] == ["zarr.json"]  # no temporaries left
    assert json.loads((tmp_path / "c" / "shards" / "zarr.json").read_text()) == GROUP_META
    assert (tmp_path / "c" / "zarr.json").read_bytes() == (tmp_path / "c" / "shards" / "zarr.json").read_bytes()
    assert dict(zarr.open_group(str(tmp_path / "c"), mode="r")["shards"].attrs) == {}
