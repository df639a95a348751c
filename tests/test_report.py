"""`blockprune report` on a synthetic run, and the pure logic of benchmarks/accuracy.py and speed.py.

No training, compiling or timing: the run dir is built here (report.json, masks made with
``blockprune.masks.save_masks``, a manifest.json), so the whole file takes seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import asdict
import sys
from pathlib import Path

import numpy as np
import pytest

from blockprune.errors import BlockpruneError
from blockprune.masks import LayerMaskInfo, MaskSet, save_masks

ROOT = Path(__file__).resolve().parent.parent


def _load_bench(name: str):
    """Import benchmarks/<name>.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# A synthetic run directory
# --------------------------------------------------------------------------------------------

H, F = 64, 128
LAYERS = {  # hf name -> (onnx initializer name, [out, in], layout of the stored mask)
    "encoder.layer.0.attention.self.query.weight": ("q0", (H, H), "in_out"),
    "encoder.layer.0.intermediate.dense.weight": ("i0", (F, H), "in_out"),
    "encoder.layer.1.attention.self.query.weight": ("q1", (H, H), "in_out"),
    "encoder.layer.1.output.dense.weight": ("o1", (H, F), "out_in"),
}


def _mask(shape: tuple[int, int], dead_rows: int) -> np.ndarray:
    """W[out, in] mask: 1x32 blocks, the first ``dead_rows`` output rows fully pruned and every
    other block of the remaining rows pruned."""
    m = np.ones(shape, dtype=np.uint8)
    m[:dead_rows] = 0
    m[dead_rows:, :32] = 0 if shape[1] > 32 else 1
    return m


def make_run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    masks, infos, layers = {}, {}, {}
    for i, (hf, (onnx_name, shape, layout)) in enumerate(LAYERS.items()):
        m = _mask(shape, dead_rows=8 * (i + 1))
        masks[onnx_name] = m.T if layout == "in_out" else m
        infos[onnx_name] = LayerMaskInfo(block="1x32", sparsity=1 - float(m.mean()), hf_name=hf, layout=layout)
        layers[hf] = {"shape": list(shape), "density": float(m.mean()), "nonzero": int(m.sum()),
                      "total": m.size, "pruned": True, "block": "1x32"}
    layers["classifier.weight"] = {"shape": [2, H], "density": 1.0, "nonzero": 2 * H, "total": 2 * H,
                                   "pruned": False, "block": None}
    save_masks(run / "masks.safetensors", MaskSet(masks, source="reweighted-group-lasso", layers=infos))
    total = sum(v["total"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    stages = [{"stage": s, "epochs": e, "lr": 2e-5, "metric": m, "metrics": {"accuracy": m}, "dev_loss": 0.6,
               "train_loss": 0.5, "penalty": None, "alpha_refreshes": None, "seconds": 12.0,
               "pruned_mean_norm": 0.1, "kept_mean_norm": 0.4, "ratio": 0.25}
              for s, e, m in (("initial", 0, 0.49), ("dense", 2, 0.66), ("reweighted", 1, 0.64), ("retrain", 1, 0.65))]
    report = {"task": "RTE", "metric": "accuracy", "method": "rgl", "mask_source": "reweighted-group-lasso",
              "model": "minilm", "block": "1x32", "ratio": 0.5, "prune_mode": "layer", "dense_metric": 0.66,
              "pruned_metric": 0.65, "stages": stages, "compression_rate": total / nonzero,
              "density": nonzero / total, "counted_weights": {"total": total, "nonzero": nonzero},
              "pruned_layers_sparsity": 0.5, "layers": layers, "masked_entries_verified_zero": 1234,
              "onnx_export_max_abs_diff": 3e-6, "outputs": {"masks": str(run / "masks.safetensors")}}
    (run / "report.json").write_text(json.dumps(report))
    art = tmp / "art"
    art.mkdir()
    manifest = {"format": "blockprune-tvm-artifact/1", "target": {"name": "x86-64", "arch": "x86_64", "config": {}},
                "library": "model.so", "batch": 1, "seq": 128, "inputs": [], "outputs": [],
                "source": {"path": "model.onnx", "sha256": "ab" * 32}, "versions": {"apache-tvm": "0.27"},
                "kernels": 1, "layers": [
                    {"name": "q0", "node": "n0", "form": "bsr", "shape": [H, H], "block": "1x32", "density": 0.5},
                    {"name": "i0", "node": "n1", "form": "dense", "shape": [F, H]}]}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return run


def run_cli(argv: list[str]) -> int:
    """What ``blockprune`` does once cli.py wires ``add_report_parser``: parse, run, map errors to 2."""
    from blockprune.report_cli import add_report_parser

    parser = argparse.ArgumentParser(prog="blockprune")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BlockpruneError:
        return 2


def test_report_renders_sections_and_plots(tmp_path):
    run = make_run(tmp_path)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"artifact": "art", "where": "on this host", "seconds": [0.011, 0.010, 0.012]}))
    out = tmp_path / "out" / "r.md"
    assert run_cli(["report", str(run), "-o", str(out), "--artifact", str(tmp_path / "art"),
                    "--bench", str(bench)]) == 0
    md = out.read_text()
    for section in ("# Run report: RTE, rgl, block 1x32, ratio 0.5", "## Summary", "## Accuracy per stage",
                    "## Per-layer sparsity and forms", "## Size", "## Compiled artifact", "## Speed"):
        assert section in md, section
    assert "0.6600 -> 0.6500" in md
    assert "| reweighted | 1 | 2e-05 | 0.6400 |" in md
    # forms come from the manifest, matched through the masks' ONNX names
    q0 = next(line for line in md.splitlines() if line.startswith("| encoder.layer.0.attention.self.query.weight"))
    assert "bsr (block density 0.50)" in q0
    i0 = next(line for line in md.splitlines() if line.startswith("| encoder.layer.0.intermediate.dense.weight"))
    assert i0.rstrip().endswith("| dense |")
    assert "| median | 11.000 ms |" in md
    assert "| layers | 2 (1 block-sparse, 1 dense) |" in md
    for png in ("r_sparsity.png", "r_maps.png", "r_stages.png"):
        p = out.parent / png
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md


def test_report_masks_are_oriented_and_ordered(tmp_path):
    from blockprune.report import load_run

    inputs = load_run(make_run(tmp_path))
    assert [m.label for m in inputs.masks] == ["L0 q", "L0 ffn in", "L1 q", "L1 ffn out"]
    for m in inputs.masks:  # every map is W[out, in] whatever the stored layout
        assert m.mask.shape == LAYERS[m.hf_name][1]
    assert inputs.masks[1].mask[:16].sum() == 0  # i0: the first 16 output rows are dead


def test_downsample_averages_bins():
    from blockprune.report_plots import downsample

    m = np.zeros((10, 6))
    m[:5] = 1
    d = downsample(m, 2, 3)
    assert d.shape == (2, 3) and np.allclose(d[0], 1) and np.allclose(d[1], 0)
    assert downsample(np.ones((3, 2)), 64, 64).shape == (3, 2)  # clipped, never empty bins
    assert np.isclose(downsample(np.eye(4), 1, 1)[0, 0], 0.25)


def test_report_speed_json_from_speed_benchmark(tmp_path):
    from blockprune.report import speed_section

    bench = {"clock": "cpu", "runs": 25, "threads": 1, "model_rows": [
        {"model": "minilm", "variant": "dense", "engine": "onnxruntime", "timing": {"cpu": 0.04, "wall": 0.05}},
        {"model": "minilm", "variant": "bsr 1x32 r=0.8", "engine": "tvm", "timing": {"cpu": 0.02, "wall": 0.03}}]}
    md = "\n".join(speed_section(bench))
    assert "| minilm | bsr 1x32 r=0.8 | tvm | 20.000 | 2.00x |" in md


@pytest.mark.parametrize("breakage, message", [
    ("no-dir", "does not exist"),
    ("no-report", "does not exist"),
    ("unfinished", "has not finished"),
    ("corrupt-report", "not valid JSON"),
    ("foreign-report", "not a `blockprune train` report"),
    ("corrupt-masks", "not a readable safetensors file"),
    ("bad-manifest", "has format"),
    ("bad-bench", "not a bench result"),
])
def test_report_bad_input_errors(tmp_path, breakage, message):
    from blockprune.report import report_run

    run = make_run(tmp_path)
    kw = {}
    if breakage == "no-dir":
        run = tmp_path / "nope"
    elif breakage == "no-report":
        (run / "report.json").unlink()
    elif breakage == "unfinished":
        (run / "report.json").unlink()
        (run / "state.json").write_text("{}")
    elif breakage == "corrupt-report":
        (run / "report.json").write_text('{"task": "RTE", ')
    elif breakage == "foreign-report":
        (run / "report.json").write_text('{"hello": 1}')
    elif breakage == "corrupt-masks":
        (run / "masks.safetensors").write_bytes(b"\x00garbage")
    elif breakage == "bad-manifest":
        (tmp_path / "art" / "manifest.json").write_text('{"format": "other/9"}')
        kw["artifact"] = tmp_path / "art"
    elif breakage == "bad-bench":
        (tmp_path / "b.json").write_text('{"x": [1]}')
        kw["bench"] = tmp_path / "b.json"
    out = tmp_path / "out.md"
    with pytest.raises(BlockpruneError, match=message):
        report_run(run, out, **kw)
    assert not out.exists()  # nothing half-written
    args = ["report", str(run), "-o", str(out)] + sum(([f"--{k}", str(v)] for k, v in kw.items()), [])
    assert run_cli(args) == 2


def test_report_without_masks_says_so(tmp_path):
    from blockprune.report import report_run

    run = make_run(tmp_path)
    (run / "masks.safetensors").unlink()
    md = report_run(run, tmp_path / "x.md").read_text()
    assert "no masks.safetensors" in md and "## Speed" in md
    assert not (tmp_path / "x_sparsity.png").exists()


# --------------------------------------------------------------------------------------------
# benchmarks/accuracy.py: summary logic and resumption
# --------------------------------------------------------------------------------------------


def _cells(acc):
    C = acc.Cell
    return [
        C("RTE", "dense", "accuracy", 0.660, 0.660),
        C("RTE", "pruned", "accuracy", 0.668, 0.660, "1x32", 0.3, 1.40),
        C("RTE", "pruned", "accuracy", 0.652, 0.660, "1x32", 0.5, 1.95),  # within 1 point (-0.8)
        C("RTE", "pruned", "accuracy", 0.640, 0.660, "1x32", 0.7, 3.20),  # -2 points: out
        C("RTE", "pruned", "accuracy", 0.650, 0.660, "1x32", 0.8, 4.80),  # exactly -1 point: in
        C("MRPC", "dense", "f1", 0.880, 0.880),
        C("MRPC", "pruned", "f1", 0.860, 0.880, "1x32", 0.3, 1.40),  # -2: out, so no rate: dense (1.0x)
        C("MRPC", "pruned", "f1", 0.879, 0.880, "4x4", 0.5, 1.95),
    ]


def test_accuracy_summary_highest_rate_within_one_point():
    acc = _load_bench("accuracy")
    s = {(x.task, x.block): x for x in acc.summarize(_cells(acc), tolerance=0.01)}
    assert set(s) == {("RTE", "1x32"), ("MRPC", "1x32"), ("MRPC", "4x4")}
    rte = s[("RTE", "1x32")]
    assert (rte.best_rate, rte.best_metric, rte.best_ratio, rte.cells) == (4.80, 0.650, 0.8, 4)
    assert s[("MRPC", "1x32")].best_rate == 1.0 and s[("MRPC", "1x32")].best_ratio is None
    assert s[("MRPC", "4x4")].best_rate == 1.95
    avg = acc.average_rates(s.values())
    assert avg == pytest.approx({"1x32": (4.80 + 1.0) / 2, "4x4": 1.95})
    tight = {(x.task, x.block): x for x in acc.summarize(_cells(acc), tolerance=0.005)}
    assert tight[("RTE", "1x32")].best_rate == 1.40


def test_accuracy_markdown_and_plot(tmp_path):
    acc = _load_bench("accuracy")
    settings = acc.GridSettings(epochs_dense=1)
    res = acc.ResultsFile(tmp_path / "a.json", settings)
    for c in _cells(acc):
        res.add(c)
    md_path = acc.write_report(tmp_path / "a.json", 0.01)
    md = md_path.read_text()
    assert "| RTE | accuracy | 1x32 | 66.00 | 4.80x | 65.00 | 0.8 | 4 |" in md
    assert "| MRPC | f1 | 1x32 | 88.00 | 1.00x (none: dense) | - | - | 1 |" in md
    assert "average of those rates, 1x32: **2.90x**" in md
    assert "| RTE | 1x32 | 0.7 | 3.20x | 64.00 | -2.00 |" in md
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_grid_resumes_and_shares_stages(tmp_path, monkeypatch):
    """Dense once per task, reweighted once per block, retrain per ratio, from the right
    checkpoints; finished cells are skipped, and other settings are refused."""
    acc = _load_bench("accuracy")
    import blockprune.frontends.recipe as recipe

    calls = []

    class FakeResult:
        def __init__(self, cfg):
            self.metric_name = "accuracy"
            self.metrics = {"dense": 0.7, "reweighted": 0.69}
            self.report = {"pruned_metric": 0.7 - cfg.ratio / 10}
            self.compression_rate = 1 / (1 - cfg.ratio)

    def fake_run(cfg):
        calls.append(cfg)
        return FakeResult(cfg)

    monkeypatch.setattr(recipe, "run_recipe", fake_run)
    settings = acc.GridSettings(epochs_dense=1, epochs_rew=1, epochs_retrain=1, limit_train=8)
    grid = acc.Grid(settings, ["RTE"], ["1x32", "4x4"], [0.5, 0.8], tmp_path / "data", tmp_path / "runs")
    res = acc.ResultsFile(tmp_path / "r.json", settings)
    acc.run_grid(grid, res, log=lambda s: None)
    kinds = [(c.stop_after, c.block, c.epochs_dense, c.epochs_rew, Path(c.model).name) for c in calls]
    assert kinds == [("dense", "1x32", 1, 1, "minilm"),
                     ("reweighted", "1x32", 0, 1, "dense"), (None, "1x32", 0, 0, "reweighted"),
                     (None, "1x32", 0, 0, "reweighted"),
                     ("reweighted", "4x4", 0, 1, "dense"), (None, "4x4", 0, 0, "reweighted"),
                     (None, "4x4", 0, 0, "reweighted")]
    assert all(c.ratio == 0.5 for c in calls if c.stop_after == "reweighted")  # one fingerprint per block
    assert sorted(json.loads((tmp_path / "r.json").read_text())["cells"]) == [
        "RTE/dense", "RTE/rgl/1x32/0.5", "RTE/rgl/1x32/0.8", "RTE/rgl/4x4/0.5", "RTE/rgl/4x4/0.8"]
    # rerun: everything done, nothing is called
    calls.clear()
    acc.run_grid(grid, acc.ResultsFile(tmp_path / "r.json", settings), log=lambda s: None)
    assert calls == []
    # a lost cell is redone alone (its reweighted stage is re-entered, which the recipe resumes)
    data = json.loads((tmp_path / "r.json").read_text())
    del data["cells"]["RTE/rgl/4x4/0.8"]
    (tmp_path / "r.json").write_text(json.dumps(data))
    acc.run_grid(grid, acc.ResultsFile(tmp_path / "r.json", settings), log=lambda s: None)
    assert [(c.stop_after, c.block, c.ratio) for c in calls] == [("reweighted", "4x4", 0.5), (None, "4x4", 0.8)]
    with pytest.raises(SystemExit, match="other settings"):
        acc.ResultsFile(tmp_path / "r.json", acc.GridSettings(epochs_dense=2))


def _record_recipe_calls(monkeypatch) -> list:
    """Replace run_recipe by a recorder returning fixed metrics; the configs it got, in order."""
    import blockprune.frontends.recipe as recipe

    calls: list = []

    class FakeResult:
        def __init__(self, cfg):
            self.metric_name, self.metrics = "accuracy", {"dense": 0.7, "reweighted": 0.69}
            self.report, self.compression_rate = {"pruned_metric": 0.69}, 2.0

    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or FakeResult(cfg))
    return calls


def test_accuracy_grid_two_processes_share_one_results_file(tmp_path, monkeypatch):
    """Two grid processes (one per core, disjoint --tasks) write the same JSON: neither loses
    the other's cells, and each skips what the other finished. Dense cells come first, then
    block-major, so an interrupted grid has the first block shape complete for every task."""
    acc = _load_bench("accuracy")
    calls = _record_recipe_calls(monkeypatch)
    settings = acc.GridSettings(epochs_dense=1)
    path = tmp_path / "r.json"
    first = acc.ResultsFile(path, settings)  # both open the file before either writes
    second = acc.ResultsFile(path, settings)
    grid = lambda tasks: acc.Grid(settings, tasks, ["1x32", "4x4"], [0.5], tmp_path / "d", tmp_path / "runs")  # noqa: E731
    acc.run_grid(grid(["RTE", "MRPC"]), first, log=lambda s: None)
    assert [(Path(c.out).parent.name, Path(c.out).name) for c in calls] == [
        ("RTE", "dense"), ("MRPC", "dense"), ("rgl-1x32", "reweighted"), ("rgl-1x32", "r0.5"),
        ("rgl-1x32", "reweighted"), ("rgl-1x32", "r0.5"), ("rgl-4x4", "reweighted"), ("rgl-4x4", "r0.5"),
        ("rgl-4x4", "reweighted"), ("rgl-4x4", "r0.5")]
    assert [Path(c.out).parent.parent.name for c in calls[2:4]] == ["RTE", "RTE"]
    calls.clear()
    acc.run_grid(grid(["CoLA", "RTE"]), second, log=lambda s: None)  # RTE: done by the first process
    assert {Path(c.out).parts[-3] if "rgl" in str(c.out) else Path(c.out).parent.name for c in calls} == {"CoLA"}
    cells = json.loads(path.read_text())["cells"]
    assert sorted(cells) == sorted(f"{t}/{k}" for t in ("RTE", "MRPC", "CoLA")
                                   for k in ("dense", "rgl/1x32/0.5", "rgl/4x4/0.5"))


def test_accuracy_grid_with_distillation_shares_dense_and_reweighted_stages(tmp_path, monkeypatch):
    """Distillation only changes masked retraining: its grid reuses the plain grid's dense and
    reweighted runs (configs with distill=0, so their fingerprints match) and writes its cells
    to rgl-<block>-kd/; a results file written before the setting existed still resumes."""
    acc = _load_bench("accuracy")
    calls = _record_recipe_calls(monkeypatch)
    settings = acc.GridSettings(epochs_dense=1, distill=0.5)
    grid = acc.Grid(settings, ["RTE"], ["1x32"], [0.5], tmp_path / "d", tmp_path / "runs")
    acc.run_grid(grid, acc.ResultsFile(tmp_path / "kd.json", settings), log=lambda s: None)
    assert [(c.stop_after, c.distill, Path(c.out).parent.name) for c in calls] == [
        ("dense", 0.0, "RTE"), ("reweighted", 0.0, "rgl-1x32"), (None, 0.5, "rgl-1x32-kd")]
    old = tmp_path / "old.json"
    stored = {k: v for k, v in asdict(acc.GridSettings(epochs_dense=1)).items() if k != "distill"}
    old.write_text(json.dumps({"format": acc.FORMAT, "settings": stored, "cells": {}}))
    acc.ResultsFile(old, acc.GridSettings(epochs_dense=1))  # no "other settings" error
    with pytest.raises(SystemExit, match="other settings"):
        acc.ResultsFile(old, settings)


def test_accuracy_runs_dir_is_absolute_whatever_the_spelling(tmp_path, monkeypatch):
    """Run configs record checkpoint paths: 'runs/accuracy' and its absolute form must be one grid."""
    acc = _load_bench("accuracy")
    monkeypatch.chdir(tmp_path)
    args = acc.parse_args(["--runs-dir", "runs/accuracy"])
    assert args.runs_dir == tmp_path / "runs" / "accuracy" and args.runs_dir.is_absolute()


def test_speed_at_accuracy_picks_each_tasks_best_cell():
    sat = _load_bench("speed_at_accuracy")
    acc = _load_bench("accuracy")
    cells = _cells(acc)
    best = sat.pick_cells(cells, "best", 0.01)
    assert [(c.task, c.block, c.ratio) for c in best] == [("MRPC", "4x4", 0.5), ("RTE", "1x32", 0.8)]
    assert len(sat.pick_cells(cells, "all", 0.01)) == 6
    row = sat.SpeedRow("RTE", "1x32", 0.8, 4.8, "accuracy", 0.65, 0.66, 40.0, 44.0, "-", 30.0, 20.0, 25.0, 1e-6, "")
    md = sat.markdown([row], {"date": "d", "cpu": "c", "threads": 1, "runs": 5, "clock": "cpu", "command": "x"})
    assert "| RTE | 1x32 | 0.8 | 4.80x | 65.00 (66.00) | 40.0 | 44.0 (0.91x) |" in md and "**2.00x**" in md


# --------------------------------------------------------------------------------------------
# benchmarks/speed.py: break-even interpolation
# --------------------------------------------------------------------------------------------


def test_break_even_interpolates_the_crossing():
    speed = _load_bench("speed")
    dens = [1.0, 0.8, 0.6, 0.4, 0.2]
    bsr = [2.0, 1.6, 1.2, 0.8, 0.4]  # t = 2 * density
    assert speed.break_even_density(dens, bsr, 1.0) == pytest.approx(0.5)
    assert speed.break_even_density(dens[::-1], bsr[::-1], 1.0) == pytest.approx(0.5)  # order-free
    assert speed.break_even_density(dens, bsr, 1.2) == pytest.approx(0.6)  # equal at a point -> that point
    assert speed.break_even_density(dens, bsr, 3.0) == 1.0  # faster everywhere: the densest point (lower bound)
    assert speed.break_even_density(dens, bsr, 0.3) is None  # never faster
    # a noisy, non-monotone sweep: the first crossing from the dense side counts
    assert speed.break_even_density([1.0, 0.8, 0.6, 0.4], [1.5, 0.9, 1.1, 0.5], 1.0) == pytest.approx(1.0 - 0.2 * 5 / 6)
    with pytest.raises(ValueError):
        speed.break_even_density([1.0], [1.0, 2.0], 1.0)
