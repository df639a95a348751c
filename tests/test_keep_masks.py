"""benchmarks/keep_masks.py: the pruned cells' masks kept in a committed archive. What can fail: a
cell whose run dir is gone dropped from the archive on the next run (the reason it exists), stale
bytes kept for a cell that was rerun, a dense row or another checkout's path packed, a corrupt
archive silently overwritten, a half-written archive left on a failure."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_frontend_accuracy_grid import _bench


def _km():
    return _bench("keep_masks.py", "bench_keep_masks")


def _cell(root: Path, name: str, seed: int, kind: str = "pruned") -> dict:
    run = root / "runs" / "aug" / name
    run.mkdir(parents=True, exist_ok=True)
    mask = (np.random.default_rng(seed).random((64, 32)) > 0.6).astype(np.float32)
    save_file({"bert.encoder.layer.0.output.dense.weight": mask}, str(run / "masks.safetensors"))
    return {"kind": kind, "run_dir": str(run)}


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:xz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_a_cell_whose_run_dir_is_gone_keeps_its_member_and_a_rerun_cell_gets_its_new_bytes(tmp_path):
    km = _km()
    ck = tmp_path / "checkout"
    cells = {"RTE/dense": _cell(ck, "RTE/dense-baseline", 0, kind="dense"),
             "RTE/gradual/16x1/0.6": _cell(ck, "RTE/g/r0.6", 1),
             "RTE/gradual/16x1/0.6/s1": _cell(ck, "RTE/g/r0.6-s1", 2)}
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": cells}))
    out = tmp_path / "masks" / "acc.tar.xz"
    a, b = "runs/aug/RTE/g/r0.6/masks.safetensors", "runs/aug/RTE/g/r0.6-s1/masks.safetensors"

    assert km.write_archive(km.cell_masks([results], root=ck), out) == {a: "new", b: "new"}
    first = _members(out)
    assert first == {a: (ck / "runs/aug/RTE/g/r0.6/masks.safetensors").read_bytes(),
                     b: (ck / "runs/aug/RTE/g/r0.6-s1/masks.safetensors").read_bytes()}

    # the checkout loses seed 0's run dir; seed 1 is rerun (other masks); a new cell finishes
    for f in (ck / "runs/aug/RTE/g/r0.6").iterdir():
        f.unlink()
    (ck / "runs/aug/RTE/g/r0.6").rmdir()
    cells["RTE/gradual/16x1/0.6/s1"] = _cell(ck, "RTE/g/r0.6-s1", 7)
    cells["RTE/gradual/16x1/0.7"] = _cell(ck, "RTE/g/r0.7", 3)
    results.write_text(json.dumps({"cells": cells}))
    c = "runs/aug/RTE/g/r0.7/masks.safetensors"
    assert km.write_archive(km.cell_masks([results], root=ck), out) == {a: "kept", b: "updated", c: "new"}
    second = _members(out)
    assert second[a] == first[a] and second[b] != first[b]
    assert second[b] == (ck / "runs/aug/RTE/g/r0.6-s1/masks.safetensors").read_bytes()
    assert km.write_archive(km.cell_masks([results], root=ck), out)[c] == "same"

    # --replace: only what is here now
    assert set(km.write_archive(km.cell_masks([results], root=ck), out, merge=False)) == {b, c}
    assert sorted(p.name for p in out.parent.iterdir()) == ["acc.tar.xz"]  # no temp file left


def test_a_run_dir_recorded_in_another_checkout_is_found_under_this_one_and_nowhere_else(tmp_path):
    km = _km()
    here = tmp_path / "here"
    cell = _cell(here, "STS-B/g/r0.6", 4)
    cell["run_dir"] = "/gpu-box/clone/runs/aug/STS-B/g/r0.6"  # where the grid ran
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": {"STS-B/gradual/16x1/0.6": cell,
                                             "STS-B/gradual/16x1/0.9": {"kind": "pruned", "run_dir": "/x/no-runs/r0.9"}}}))
    found = km.cell_masks([results, results.with_suffix(".md")], root=here)
    assert found == {"runs/aug/STS-B/g/r0.6/masks.safetensors": here / "runs/aug/STS-B/g/r0.6/masks.safetensors"}
    assert km.cell_masks([results], root=None) == {}


def test_a_corrupt_or_truncated_archive_is_refused_and_left_as_it_was(tmp_path):
    km = _km()
    ck = tmp_path / "ck"
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": {"RTE/gradual/16x1/0.6": _cell(ck, "RTE/g/r0.6", 1)}}))
    good = tmp_path / "good.tar.xz"
    km.write_archive(km.cell_masks([results], root=ck), good)
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    for name, data in (("text.tar.xz", b"not an xz archive"), ("flipped.tar.xz", bytes(flipped)),
                       ("cut.tar.xz", raw[: len(raw) // 2])):
        out = tmp_path / name
        out.write_bytes(data)
        with pytest.raises(SystemExit, match=rf"{name.replace('.', '[.]')} is not a readable [.]tar[.]xz.*--replace"):
            km.write_archive(km.cell_masks([results], root=ck), out)
        assert out.read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_failure_while_writing_leaves_the_old_archive_whole(tmp_path):
    km = _km()
    ck = tmp_path / "ck"
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": {"RTE/gradual/16x1/0.6": _cell(ck, "RTE/g/r0.6", 1)}}))
    out = tmp_path / "m" / "acc.tar.xz"
    km.write_archive(km.cell_masks([results], root=ck), out)
    before = out.read_bytes()
    found = km.cell_masks([results], root=ck)
    found["runs/aug/RTE/g/r0.7/masks.safetensors"] = ck / "runs/aug/RTE/g/r0.7/masks.safetensors"  # vanished
    with pytest.raises(FileNotFoundError):
        km.write_archive(found, out)
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["acc.tar.xz"]


def test_the_command_writes_merges_and_refuses_what_would_lose_or_mix_cells(tmp_path, capsys):
    km = _km()
    ck = tmp_path / "ck"
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": {"RTE/gradual/16x1/0.6": _cell(ck, "RTE/g/r0.6", 1)}}))
    out = tmp_path / "m.tar.xz"
    assert km.main(["--results", str(results), "--out", str(out)]) == 0
    member = str(results.parent / "ck/runs/aug/RTE/g/r0.6/masks.safetensors")  # where the JSON records it
    assert "1 cells" in capsys.readouterr().out and set(_members(out)) == {"runs/aug/RTE/g/r0.6/masks.safetensors"}

    # the run dir is gone: merging keeps the member, --replace must not empty the archive
    for f in Path(member).parent.iterdir():
        f.unlink()
    assert km.main(["--results", str(results), "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out
    merged = out.read_bytes()
    assert km.main(["--results", str(results), "--out", str(out), "--replace"]) == 0
    assert "left as it was" in capsys.readouterr().out and out.read_bytes() == merged
    assert set(_members(out)) == {"runs/aug/RTE/g/r0.6/masks.safetensors"}

    other = tmp_path / "elsewhere" / "acc.json"
    other.parent.mkdir()
    other.write_text(results.read_text())
    with pytest.raises(SystemExit, match="would share the archive"):
        km.main(["--results", str(results), "--results", str(other)])
    with pytest.raises(SystemExit, match="no results file .*missing.json"):
        km.main(["--results", str(tmp_path / "missing.json"), "--out", str(tmp_path / "n.tar.xz")])
    assert not (tmp_path / "n.tar.xz").exists()
