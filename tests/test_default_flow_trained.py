"""benchmarks/default_flow.py --trained: a model pruned by training is compressed as it is (no
one-shot --sparsity), compiled, and timed against onnxruntime on its own ONNX.

What can fail: a trained model pruned again one-shot (its masks overwritten), its label missing from
the timing plan's dense models, a malformed --trained spec accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_frontend_accuracy_grid import _bench


def _record_commands(flow, monkeypatch) -> list[list[str]]:
    """Replace the script's subprocess runner by a recorder that leaves what each command would
    (an exported file, an artifact dir with its manifest); returns the list the commands go to."""
    commands: list[list[str]] = []

    def record(cmd, log):
        log.append(" ".join(cmd))
        commands.append(cmd)
        if cmd[1] == "export":
            Path(cmd[-1]).write_bytes(b"exported")
        if cmd[1] == "compile":
            Path(cmd[-1]).mkdir(parents=True, exist_ok=True)
            (Path(cmd[-1]) / "manifest.json").write_text(json.dumps({"verified": {"max_abs_diff": 0.0}}))

    monkeypatch.setattr(flow, "_run", record)
    return commands


def test_trained_rows_compress_without_sparsity_and_time_against_their_own_onnx(tmp_path, monkeypatch):
    flow = _bench("default_flow.py", "bench_default_flow")
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not read by the recorder")
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        flow.parse_trained(f"{onnx_path}@16x1")
    with pytest.raises(SystemExit, match="does not exist"):
        flow.parse_trained("emb=/nowhere/model.onnx@16x1")
    t = flow.parse_trained(f"emb={onnx_path}@16x1")
    assert (t.label, t.block, t.onnx) == ("emb", "16x1", onnx_path.resolve())

    commands = []

    def record(cmd, log):
        log.append(" ".join(cmd))
        commands.append(cmd)
        if cmd[1] == "compile":
            Path(cmd[-1]).mkdir(parents=True)
            (Path(cmd[-1]) / "manifest.json").write_text(json.dumps({"verified": {"max_abs_diff": 0.0}}))

    monkeypatch.setattr(flow, "_run", record)
    builds = flow.build_all([], tmp_path / "work", forced=True, quick=False, trained=[t])
    assert [b.form for b in builds] == ["default", "bsr", "compact"]
    compress = [c for c in commands if c[1] == "compress"]
    assert [c[2] for c in compress] == [str(onnx_path.resolve())] * 3  # the trained ONNX, not an export
    assert not any("--sparsity" in c for c in compress) and all(c[c.index("--block") + 1] == "16x1" for c in compress)
    assert not any(c[1] == "export" for c in commands)
    assert flow._label({"block": "16x1", "sparsity": None}) == "16x1, trained masks"


def test_timing_waits_for_the_load_of_its_own_builds_to_settle_and_gives_up_on_a_busy_machine():
    mod = _bench("default_flow.py", "bench_default_flow_settle")
    slept: list[float] = []
    decaying = iter([1.9, 1.6, 1.2, 0.8, 0.5])  # two idle cores after our compiles
    load = mod.settled_load(1.0, 60.0, poll_s=5.0, sleep=slept.append, loadavg=lambda: (next(decaying), 0, 0))
    assert load == 0.8 and slept == [5.0, 5.0, 5.0]
    slept.clear()  # another job keeps both cores busy: the wait ends at the limit with the load still high
    load = mod.settled_load(1.0, 20.0, poll_s=5.0, sleep=slept.append, loadavg=lambda: (2.1, 0, 0))
    assert load == 2.1 and sum(slept) == 20.0
    assert mod.settled_load(1.0, 60.0, sleep=slept.append, loadavg=lambda: (0.3, 0, 0)) == 0.3 and sum(slept) == 20.0


def test_a_cell_known_by_its_masks_alone_is_the_bundled_export_compressed_under_them(tmp_path, monkeypatch):
    """A GPU grid's cell comes back as masks only: the base model is exported once (the grid's model,
    head and exporter), each form compresses that export with ``--masks`` and no one-shot pruning,
    and onnxruntime's dense model is that export."""
    flow = _bench("default_flow.py", "bench_default_flow_masks")
    masks = tmp_path / "r0.5" / "masks.safetensors"
    masks.parent.mkdir()
    masks.write_bytes(b"not read by the recorder")
    work = tmp_path / "work"
    work.mkdir()
    a = flow.parse_trained(f"sst2={masks}@16x1", work)
    b = flow.parse_trained(f"rte={masks}@16x1", work)
    assert a.masks == masks.resolve() and a.onnx == b.onnx and a.onnx.parent == work

    commands = _record_commands(flow, monkeypatch)
    builds = flow.build_all([], work, forced=True, quick=False, trained=[a, b])
    exports = [c for c in commands if c[1] == "export"]
    assert len(exports) == 1 and exports[0][2:] == [*flow.MASKED_BASE, "-o", str(a.onnx)]
    compress = [c for c in commands if c[1] == "compress"]
    assert len(compress) == 6 and all(c[2] == str(a.onnx) for c in compress)
    assert all(c[c.index("--masks") + 1] == str(masks.resolve()) for c in compress)
    assert not any("--sparsity" in c for c in compress)
    assert all(" export " in bd.commands[0] and " compress " in bd.commands[1] for bd in builds)

    # a later call re-exports (an earlier export may be stale) unless it keeps earlier builds
    commands.clear()
    flow.build_all([], work, forced=False, quick=False, trained=[a])
    assert [c[1] for c in commands] == ["export", "compress", "compile"]
    commands.clear()
    kept = flow.build_all([], work, forced=False, quick=False, trained=[a, b], previous=builds)
    assert commands == [] and [k.artifact for k in kept] == [bd.artifact for bd in builds if bd.form == "default"]

    # the JSON keeps paths relative to the checkout; a relative --work that prefixes other runs' paths
    # ("runs") strips only paths that start with it
    cmd = (f"{work}/bin/blockprune compress {work}/base.onnx -o runs/x.onnx --masks /co/runs/accuracy/r0.5/m.s "
           f"--config='/co/c.yaml'")
    assert flow._strip_prefixes(cmd, (str(work), "runs", "/co")) == \
        "bin/blockprune compress base.onnx -o x.onnx --masks runs/accuracy/r0.5/m.s --config='c.yaml'"


def test_a_cell_known_by_its_ratios_alone_is_the_bundled_export_pruned_one_shot_at_them(tmp_path, monkeypatch):
    """A cell whose masks were lost is rebuilt from its per-layer ratios (``allocation.yaml``): the
    same base export, ``compress --config`` (no --masks, no uniform --sparsity), labelled as a
    one-shot rebuild so that no table reads it as the trained masks."""
    flow = _bench("default_flow.py", "bench_default_flow_ratios")
    cfg = tmp_path / "r0.6" / "allocation.yaml"
    cfg.parent.mkdir()
    cfg.write_text("block: 16x1\nsparsity: 0.0\n")
    work = tmp_path / "work"
    work.mkdir()
    t = flow.parse_trained(f"stsb={cfg}@16x1", work)
    assert t.config == cfg.resolve() and t.masks is None and t.on_base and t.onnx.parent == work

    commands = _record_commands(flow, monkeypatch)
    builds = flow.build_all([], work, forced=False, quick=False, trained=[t])
    assert [c[1] for c in commands] == ["export", "compress", "compile"]
    compress = commands[1]
    assert compress[2] == str(t.onnx) and compress[compress.index("--config") + 1] == str(cfg.resolve())
    assert "--masks" not in compress and "--sparsity" not in compress
    b = {"block": "16x1", "sparsity": None, "commands": builds[0].commands}
    assert flow._label(b) == "16x1, one-shot at a cell's per-layer ratios"
