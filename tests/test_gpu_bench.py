"""benchmarks/gpu_bench.py --dry: the GPU benchmark's code path on the CPU, tiny sizes.

The real run needs a CUDA card, which the machines that run this suite may not have; the
dry run goes through the same measurements (teachers, extraction, the four pretraining
modes and a compiled one, both loaders, peak memory) so a GPU slot is not spent finding a
broken import or a renamed API. It checks the table printed last and the JSON agree and
hold every row with a positive figure; the figures themselves mean nothing here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
MEASURED = ("teacher_b16", "teacher_l14", "extraction", "pretrain_plain", "pretrain_cached", "pretrain_live_b16",
            "pretrain_live_l14", "pretrain_cached_compiled", "extraction_e2e_b16_k2", "extraction_e2e_l14_k2")
E2E = ("pretrain_e2e_plain", "pretrain_e2e_cached", "pretrain_e2e_live_b16", "pretrain_e2e_cached_compiled",
       "ratio:extraction_e2e_b16_k2/teacher_b16", "ratio:extraction_e2e_l14_k2/teacher_l14",
       "ratio:pretrain_e2e_plain/pretrain_plain", "ratio:pretrain_e2e_cached/pretrain_cached",
       "ratio:pretrain_e2e_live_b16/pretrain_live_b16", "ratio:pretrain_e2e_cached_compiled/pretrain_cached_compiled",
       "ratio:e2e_cached/e2e_live_b16")
REQUIRED = MEASURED + ("render_workers", "render_device", "render_exact", "render_one_by_one",
                       "ratio:render_exact/render_one_by_one", "loader_cached", "loader_plain", "ratio:extraction/teacher_b16", "ratio:cached/plain",
                       "ratio:cached/live_b16", "ratio:cached/live_l14", "ratio:compiled/eager_cached",
                       "ratio:loader_cached/plain", "workers_to_feed:cached", "memory:cached/plain",
                       "memory:live_b16/plain", "memory:live_l14/plain") + E2E


def last_table(stdout: str) -> dict[str, list[str]]:
    """Rows of the last table printed ({first column: cells}), which must end the output."""
    lines = stdout.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("row ") and i + 1 < len(lines)
                 and set(lines[i + 1]) <= {"-", " "})
    rows = [line.split() for line in lines[header + 2:]]
    assert all(rows), "a blank line after the table: it is not printed last"
    return {cells[0]: cells[1:] for cells in rows}


def test_gpu_bench_dry(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], cwd=SCRIPT.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = last_table(proc.stdout)
    payload = json.loads(out.read_text())

    assert payload["dry"] is True and payload["complete"] is True and payload["errors"] == {}, payload["errors"]
    assert payload["device"] and payload["torch"] and payload["date_utc"]
    rows = payload["rows"]
    assert set(table) == set(rows), set(table) ^ set(rows)
    assert set(REQUIRED) <= set(rows), set(REQUIRED) - set(rows)
    # the exact device render equals the CPU's (on the CPU torchvision's is the reference itself)
    assert rows.pop("render_exact_pixels_off")["value"] == 0 and rows.pop("render_one_by_one_pixels_off")["value"] == 0
    for name, row in rows.items():
        assert row["value"] > 0, name
        assert float(table[name][0]) > 0, name  # the table's value column
    for name in MEASURED:
        assert rows[name]["peak_mib"] > 0, name
    for name in E2E:  # the end-to-end ratios carry their goal and say whether it is met
        if name.startswith("ratio:"):
            assert rows[name]["goal"] in (0.8, 0.9, 1.3) and rows[name]["met"] == (rows[name]["value"] >= rows[name]["goal"])


def test_goals_table_reads_every_recorded_figure():
    """benchmarks/goals.py (the last step of `make bench`) over the committed results: every
    goal finds its figure, so a renamed key in a benchmark's JSON shows up here, not as a
    quiet 'not measured' row in BENCHMARKS.md's table."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "goals.py")], cwd=SCRIPT.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines()[2:] if line.strip()]
    assert len(rows) >= 13
    assert not [r for r in rows if "not measured" in r], proc.stdout
    assert all(" met " in r or "MISSED" in r or "reported" in r for r in rows), proc.stdout
