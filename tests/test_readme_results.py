"""The README's speed table is the committed measurement, not a copy that drifts from it."""

from __future__ import annotations

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
