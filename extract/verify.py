"""`mrmae cache info` and `mrmae cache verify`: what a cache holds, and whether it replays.

verify re-renders N random cached views from their source images, decoded with the decoder
the manifest records (views.decoder), and reruns the teacher through the teacher stage
extraction uses (extract/teacher_stage.py: the same render, the same precision rule), then
compares with what the cache stores. Views an nvjpeg cache holds are refused off CUDA. A PCA cache stores
coefficients on a basis: there the check compares the stored coefficients with those of
the live features (the dtype's floor applies to them as it does to whole features), and
reports the lossy reconstruction against the live features as a measurement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mrmae.extract.teacher_stage import ViewItem, check_replayable, replay_image, teacher_outputs
from mrmae.shared.shards import RawSample, expand_urls, read_shard, source_digest
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers.base import Teacher, build_teacher

# Token-cosine floors the replay must meet (see BENCHMARKS.md for the measured values).
TOLERANCE = {"int8": 0.999, "float16": 0.99999}
ATTENTION_TOLERANCE = 1e-2  # max absolute error of a [CLS]->patch attention weight


def pca_tolerance(dtype: str, rank: int) -> float:
    """The floor of a PCA cache's check: cosine between the stored coefficient vector and
    the live view's coefficients (x - mean) @ basis.T, per token.

    What rank K leaves out is the basis's doing, the same for every view, and is reported,
    not judged; what storage adds is judged, as in a plain cache. int8 rounds each of the K
    coefficients by at most half a step, absmax / 254 <= ||c|| / 254, so a token's error is
    at most r = sqrt(K) / 254 of its norm and its cosine at least sqrt(1 - r^2): 0.99988 at
    K = 16, 0.9990 at 128, 0.9985 at 192. The floor is the plain cache's, lowered to that
    bound where a large K needs it (less 1e-5 for rerunning the teacher at another batch
    size). float16 rounds by 2^-11 relative, far inside its plain floor.
    """
    if dtype != "int8":
        return TOLERANCE[dtype]
    r = np.sqrt(rank) / 254 * (1 + 2.0 ** -10)  # (the float16 scale's own rounding)
    return round(min(TOLERANCE["int8"], float(np.sqrt(1 - r * r)) - 1e-5), 6)


def duplicate_keys(root: str) -> dict[str, list[str]]:
    """Sample keys stored under more than one input shard -> the shards' sources."""
    cache = cf.FeatureCache(root)
    seen: dict[str, list[str]] = {}
    for entry in cache.complete_shards:
        for key in set(cache.shard(entry.source).keys):
            seen.setdefault(str(key), []).append(entry.source)
    return {k: v for k, v in seen.items() if len(v) > 1}


@dataclass
class VerifyReport:
    problems: list[str]  # integrity: damaged or missing groups, one line each
    checked: int
    worst_cosine: float
    mean_cosine: float
    worst_attention_error: float
    tolerance: float
    ok: bool
    # PCA caches: worst_cosine / mean_cosine above compare coefficient vectors; these compare
    # the reconstruction (coefficients @ basis + mean) with the live features, and the live
    # features' own projection with them (the best rank K allows).
    pca_rank: int = 0
    reconstruction_worst_cosine: float = float("nan")
    reconstruction_mean_cosine: float = float("nan")
    projection_worst_cosine: float = float("nan")
    repaired: list[str] = dataclasses.field(default_factory=list)  # --repair: groups marked incomplete


def source_urls(cache: cf.FeatureCache, shards: str | list[str] | None = None) -> dict[str, str]:
    """group -> where to read each complete shard's source from.

    Shards given on the command line (`--shards`) are matched to entries as training
    matches them (the same URL, else the same file name); any other entry is read from its
    recorded source, which is refused when it is a command (`recorded_source`).
    """
    given: dict[str, str] = {}
    for url in expand_urls(shards) if shards else []:
        entry = cf.find_shard(cache.manifest, url)
        if entry is None or not entry.complete:
            raise cf.CacheError(f"--shards {url}: not a complete shard of {cache.root}")
        given[entry.group] = url
    return {e.group: given.get(e.group) or cache.recorded_source(e) for e in cache.complete_shards}


def changed_sources(root: str, urls: dict[str, str] | None = None) -> list[str]:
    """Input shards whose bytes differ from those extracted (sha256), one line each;
    `urls`: group -> where to read the source (`source_urls`)."""
    cache = cf.FeatureCache(root)
    urls = urls if urls is not None else source_urls(cache)
    problems = []
    for entry in cache.complete_shards:
        if not entry.source_sha256:
            continue
        url = urls[entry.group]
        try:
            digest = source_digest(url)
        except Exception as e:  # missing, unreadable: say so, do not stop the check
            problems.append(f"{url}: cannot read the source shard ({type(e).__name__}: {e})")
            continue
        if digest != entry.source_sha256:
            problems.append(f"{url}: source shard changed since extraction (sha256 differs)")
    return problems


def repair_cache(root: str) -> list[str]:
    """Mark every damaged shard (missing, or not the bytes its sha256 recorded) incomplete:
    its entry and its bytes removed, so the next `extract-features` over the same shards
    redoes just those. Returns the groups repaired."""
    repaired = []
    for entry, _ in cf.damaged_shards(root):
        cf.mark_incomplete(root, entry)
        repaired.append(cf.Location(root).join(entry.group))
    return repaired


def _bar(total: int, unit: str, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit=unit, desc=desc, disable=not progress, dynamic_ncols=True)


def integrity_problems(root: str, progress: bool = False) -> list[str]:
    """`cf.check_integrity`, group by group under a bar (stderr) counting the groups: the
    PCA basis against its recorded sha256, then every complete group against its own."""
    manifest = cf.read_manifest(root)
    problems = []
    if manifest.storage.pca is not None:
        try:
            cf.FeatureCache(root).pca_basis()  # read, hashed and checked against the manifest
        except cf.CacheError as e:
            problems.append(str(e))
    complete = [e for e in manifest.shards if e.complete]
    with _bar(len(complete), "group", "verify integrity", progress) as bar:
        for entry in complete:
            problems += [line for _, line in cf.damaged_shards(root, dataclasses.replace(manifest, shards=(entry,)))]
            bar.update(1)
    return problems


def verify_cache(root: str, recompute: int, seed: int = 0, device: str = "cpu", sources: bool = False,
                 repair: bool = False, shards: str | list[str] | None = None, progress: bool = True,
                 teacher: Teacher | None = None) -> VerifyReport:
    """Check every group against its recorded sha256 (and, with `sources`, every input
    shard against the sha256 of the bytes extracted), then re-render `recompute` random
    views from source, rerun the teacher and compare (skipped if integrity fails).
    `repair`: damaged groups are marked incomplete (`repair_cache`); the report still
    lists the damage found. `shards`: where to read the sources (`source_urls`; needed
    where a recorded one is a command). `progress`: bars on stderr (groups, then views).
    `teacher`: the cache's teacher already built (its weights are checked all the same).
    Views decoded by a decoder this machine lacks: teacher_stage.ReplayError (a CacheError),
    one line, before any work."""
    cache = cf.FeatureCache(root) if sources or recompute > 0 else None
    urls = source_urls(cache, shards) if cache is not None else {}  # before any work: one line
    if recompute > 0:
        check_replayable(cache.manifest.views.decoder, device)
    problems = integrity_problems(root, progress) + (changed_sources(root, urls) if sources else [])
    if problems or recompute <= 0:
        repaired = repair_cache(root) if problems and repair else []
        return VerifyReport(problems, 0, float("nan"), float("nan"), float("nan"), 0.0, not problems,
                            repaired=repaired)
    m = cache.manifest
    teacher = (teacher or build_teacher(m.teacher.spec)).to(device)
    if str(teacher.spec) != m.teacher.spec:
        raise cf.CacheError(f"{root}: the teacher given is {teacher.spec}, the cache's is {m.teacher.spec}")
    if teacher.fingerprint != m.teacher.weights_sha256:
        raise cf.CacheError(f"{root}: teacher {m.teacher.spec} now has other weights than when the cache was made")
    picks = pick_rows(cache, recompute, seed)
    compare = _Comparison(cache.pca_basis())
    with _bar(sum(len(rows) for _, rows in picks), "view", "verify recompute", progress) as bar:
        for group, rows in picks:
            source = urls[group.entry.group]
            for items, stored in _replayed(group, source, rows, m.views.decoder, device, str(cache.root)):
                compare.add(teacher_outputs(items, teacher, device), stored)
                bar.update(len(items))
    return compare.report(problems, m.storage.dtype)


def pick_rows(cache: cf.FeatureCache, n: int, seed: int) -> list[tuple[cf.ShardReader, list[int]]]:
    """n (shard, row) pairs drawn uniformly over all stored views without replacement, by
    `seed`: [(group, its rows in increasing order)], groups in the manifest's order."""
    shards = [cache.shard(s.source) for s in cache.complete_shards]
    sizes = np.array([len(g) for g in shards])
    rng = np.random.default_rng(seed)
    picks = rng.choice(sizes.sum(), size=min(n, int(sizes.sum())), replace=False)
    offsets = np.cumsum(sizes) - sizes
    by_shard: dict[int, list[int]] = {}
    for p in sorted(picks):
        s = int(np.searchsorted(offsets, p, side="right") - 1)
        by_shard.setdefault(s, []).append(int(p - offsets[s]))
    return [(shards[s], rows) for s, rows in by_shard.items()]


REPLAY_BATCH = 16  # views per teacher batch when replaying (the teacher's result barely depends on it)


def _replayed(group: cf.ShardReader, source: str, rows: list[int], decoder: str, device: str,
              root: str):
    """(ViewItems, their stored rows) of `rows` of `group`, REPLAY_BATCH at a time, each item's
    image read from `source`, proven against the row's recorded sha256 and prepared for
    `decoder` (teacher_stage.replay_image)."""
    images: dict[str, RawSample] = {}
    for r in read_shard(source):
        images.setdefault(r.key, r)  # a repeated key: the first copy is the one extracted
    prepared: dict[str, bytes | torch.Tensor] = {}
    for start in range(0, len(rows), REPLAY_BATCH):
        items, stored = [], []
        for row in rows[start:start + REPLAY_BATCH]:
            rec = group.read(slice(row, row + 1))
            key = str(rec["keys"][0])
            if key not in images or images[key].image is None:
                raise cf.CacheError(f"{source}: key {key} is in the cache but not in the shard")
            if key not in prepared:  # the image the view was rendered from, not another behind the same key
                cf.check_image(source, key, images[key].image, group.image_digest(row), root)
                prepared[key] = replay_image(images[key].image, decoder, device)
            items.append(ViewItem(key, int(rec["view"][0]), rec["crop"][0], bool(rec["flip"][0]), image=prepared[key]))
            stored.append(rec)
        yield items, stored


class _Comparison:
    """Live teacher outputs against stored rows, batch by batch: the worst and mean token
    cosine (of PCA coefficients in a PCA cache, where the reconstruction is measured too)
    and the worst attention error."""

    def __init__(self, basis: cf.PcaBasis | None):
        self.basis = basis
        self.cosines: list[float] = []
        self.att_err: list[float] = []
        self.recon_cos: list[torch.Tensor] = []
        self.proj_cos: list[float] = []

    def add(self, out, stored: list[dict]) -> None:
        """out: TeacherOutput of B views; stored: their B rows as `group.read` gives them."""
        cos = torch.nn.functional.cosine_similarity
        for i, rec in enumerate(stored):
            live, kept = out.features[i].float().cpu(), torch.from_numpy(rec["features"][0])
            if self.basis is not None:  # stored [L, K] coefficients: judge those, measure the reconstruction
                coeffs = cf.project(live.numpy(), self.basis)
                self.recon_cos.append(cos(live, torch.from_numpy(cf.reconstruct(rec["features"][0], self.basis)),
                                          dim=-1))
                self.proj_cos.append(cos(live, torch.from_numpy(cf.reconstruct(coeffs, self.basis)),
                                         dim=-1).min().item())
                live = torch.from_numpy(coeffs)
            self.cosines.append(cos(live, kept, dim=-1).min().item())
            attention = out.attention[i].float().cpu()
            self.att_err.append((attention - torch.from_numpy(rec["attention"][0])).abs().max().item())

    def report(self, problems: list[str], dtype: str) -> VerifyReport:
        basis, cosines = self.basis, self.cosines
        tol = TOLERANCE[dtype] if basis is None else pca_tolerance(dtype, basis.rank)
        worst = min(cosines) if cosines else float("nan")
        worst_att = max(self.att_err) if self.att_err else float("nan")
        ok = bool(cosines) and worst >= tol and worst_att <= ATTENTION_TOLERANCE
        report = VerifyReport(problems, len(cosines), worst, float(np.mean(cosines)) if cosines else float("nan"),
                              worst_att, tol, ok)
        if basis is not None and self.recon_cos:
            every = torch.cat(self.recon_cos)
            report.pca_rank = basis.rank
            report.reconstruction_worst_cosine = every.min().item()
            report.reconstruction_mean_cosine = every.mean().item()
            report.projection_worst_cosine = min(self.proj_cos)
        return report
