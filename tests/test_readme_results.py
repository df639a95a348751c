"""The README's speed table is the committed measurement, not a copy that drifts from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_speed_section_matches_the_committed_json():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_default_flow_json_records_what_a_reader_needs():
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "default_flow.json").read_text())
    assert data["clock"].startswith("wall") and data["machine"] and data["date"] and data["command"]
    threads = {t["threads"] for t in data["timings"]}
    assert {1, 2} <= threads
    for tm in data["timings"]:
        assert "load_before" in tm and tm["rows"]
        for row in tm["rows"]:
            assert row["speedup"] == row["ort_ms"] / row["tvm_ms"]
    for b in data["builds"]:  # every row says how it was made and that compile verified it
        assert any(c.split()[1] == "compile" for c in b["commands"]) and b["verified"]


def _results(path: Path, settings, cells) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy as acc

    res = acc.ResultsFile(path, settings)
    for c in cells:
        res.add(c)
    return path


def test_variant_tables_put_a_variant_with_other_dense_runs_on_rows_of_its_own(tmp_path):
    """Cells of a variant that retrains its dense models (another learning rate) are compared with
    that variant's dense baseline, on a row of their own, in its recipe change's column; variants
    with the plain grid's dense runs share rows."""
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy as acc
    import readme_results as rr

    base = acc.GridSettings(method="gradual", distill=0.5, distill_hidden=1.0, exporter="legacy")
    cell = lambda m, d, **kw: acc.Cell("CoLA", "pruned", "mcc", m, d, block="16x1", ratio=0.3,  # noqa: E731
                                       compression_rate=1.42, method="gradual", seconds=600, **kw)
    dense = lambda m, t: acc.Cell("CoLA", "dense", "mcc", m, m, method="dense", teacher_metric=t)  # noqa: E731
    plain = _results(tmp_path / "plain.json", base, [dense(0.31, 0.21), cell(0.19, 0.31)])
    teacher = _results(tmp_path / "t.json", dataclasses.replace(base, teacher="baseline"),
                       [dense(0.31, 0.21), cell(0.22, 0.31)])
    lr = _results(tmp_path / "lr.json", dataclasses.replace(base, teacher="baseline", lr=5e-5),
                  [dense(0.40, 0.35), cell(0.395, 0.40)])
    text = rr.render_augment(plain, (teacher, lr))
    rows = [r for r in text.splitlines() if r.startswith("| CoLA")]
    header, = [r for r in text.splitlines() if r.startswith("| task")]
    assert header.count("gradual + baseline as teacher") == 1  # one column per recipe change
    assert rows[0].startswith("| CoLA (mcc) | 16x1 r=0.3 | 1.42x | 31.00 | 21.00 | 19.00 (10 min), -12.00 | "
                              "22.00 (10 min), -9.00 |")
    assert rows[1].startswith("| CoLA (mcc, lr 5e-05) | 16x1 r=0.3 | 1.42x | 40.00 | 35.00 | not run | "
                              "39.50 (10 min), -0.50 |")
    assert len(rows) == 2
