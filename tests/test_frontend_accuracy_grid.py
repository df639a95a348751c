"""benchmarks/accuracy.py with the gradual recipe and the embedding grid, with the training
replaced by a recorder: which runs are started from which checkpoints with which settings, the
same-budget dense baseline, the SST-2 cap, the cell order, resumption, and the goals line.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str, module: str):
    """A script under benchmarks/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(module, ROOT / "benchmarks" / name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _acc():
    return _bench("accuracy.py", "bench_accuracy_grid")


class _Fake:
    def __init__(self, cfg):
        self.metric_name = "accuracy"
        self.metrics = {"dense": 0.80 if cfg.epochs_dense == 3 else 0.81}
        self.report = {"pruned_metric": 0.8 - cfg.ratio / 20, "allocation": {"ratios": {"w": cfg.ratio}}}
        self.compression_rate = 1 / (1 - cfg.ratio)
        if cfg.stop_after == "dense":  # a dense run leaves its checkpoint, which the cells start from
            ckpt = Path(cfg.out) / "checkpoints" / "dense"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "config.json").write_text("{}")


def test_gradual_grid_runs_teacher_baseline_and_cells(tmp_path, monkeypatch):
    acc = _acc()
    import blockprune.frontends.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    args = acc.parse_args(["--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "g.json")])
    assert args.method == "gradual" and args.epochs_retrain == 2 and args.distill == 0.5
    settings = acc.GridSettings(method="gradual", epochs_dense=3, epochs_rew=3, epochs_retrain=2, distill=0.5,
                                distill_hidden=1.0, allocation="sensitivity", score="activation",
                                rgl_form="proximal", sst2_limit_train=100, freeze_embeddings=True)
    cells = acc._cells_arg("16x1:0.5,16x1:0.8,4x4:0.5")
    grid = acc.Grid(settings, ["SST-2", "RTE"], [], [], tmp_path / "d", tmp_path / "runs", cells=cells)
    res = acc.ResultsFile(tmp_path / "g.json", settings)
    acc.run_grid(grid, res, log=lambda s: None)
    dense = [c for c in calls if c.stop_after == "dense"]
    assert [(Path(c.out).name, c.epochs_dense) for c in dense] == [("dense", 3), ("dense-baseline", 5)] * 2
    assert Path(dense[1].model).name == "dense"  # the baseline continues the teacher: 3 + 5 epochs = 3 + 3 + 2
    assert [c.limit_train for c in dense] == [100, 100, None, None]  # SST-2 capped
    pruned = [c for c in calls if c.stop_after is None]
    assert [(c.task, c.block, c.ratio) for c in pruned] == [
        ("SST-2", "16x1", 0.5), ("RTE", "16x1", 0.5), ("SST-2", "16x1", 0.8), ("RTE", "16x1", 0.8),
        ("SST-2", "4x4", 0.5), ("RTE", "4x4", 0.5)]
    for c in pruned:
        assert (c.method, c.epochs_dense, c.epochs_rew, c.epochs_retrain) == ("gradual", 0, 3, 2)
        assert (c.distill, c.distill_hidden, c.allocation, c.score, c.freeze_embeddings) == \
            (0.5, 1.0, "sensitivity", "activation", True)
        assert Path(c.model).name == "dense" and Path(c.model).parent.parent.name == "dense"
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["cells"]["RTE/dense"]["metric"] == 0.81 and data["cells"]["RTE/dense"]["teacher_metric"] == 0.80
    assert data["cells"]["RTE/gradual/16x1/0.8"]["dense_metric"] == 0.81
    assert data["cells"]["RTE/gradual/4x4/0.5"]["allocation"] == {"w": 0.5}
    calls.clear()
    acc.run_grid(grid, acc.ResultsFile(tmp_path / "g.json", settings), log=lambda s: None)
    assert calls == []  # everything finished: nothing reruns
    md = acc.markdown(*acc.load_cells(tmp_path / "g.json"), tolerance=0.01, png=None)
    assert "| RTE | accuracy | 16x1 | 81.00 |" in md


def test_transfer_cells_start_from_the_embedding_run_with_the_same_budget(tmp_path, monkeypatch):
    acc = _acc()
    import blockprune.frontends.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    args = acc.parse_args(["--runs-dir", str(tmp_path / "runs"), "--transfer-from", str(tmp_path / "emb")])
    settings = acc.GridSettings(method="gradual", epochs_dense=3, epochs_rew=3, epochs_retrain=2, distill=0.5,
                                distill_hidden=1.0, allocation="sensitivity", score="activation", rgl_form="proximal")
    grid = acc.Grid(settings, ["MRPC"], [], [], tmp_path / "d", tmp_path / "runs",
                    cells=acc._cells_arg("16x1:0.5"), transfer_from=args.transfer_from.resolve())
    acc.run_grid(grid, acc.ResultsFile(tmp_path / "t.json", settings), log=lambda s: None)
    pruned = [c for c in calls if c.stop_after is None]
    assert [c.method for c in pruned] == ["transfer", "gradual"]
    t, g = pruned
    assert t.sparse_init == str((tmp_path / "emb" / "16x1-r0.5").resolve()) and t.model == g.model
    assert (t.epochs_dense, t.epochs_rew, t.epochs_retrain) == (0, 0, 5)  # as many epochs as gradual's 3 + 2
    assert (t.distill, t.distill_hidden, t.block, t.ratio) == (g.distill, g.distill_hidden, "16x1", 0.5)
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["cells"]["MRPC/transfer/16x1/0.5"]["method"] == "transfer"
    md = acc.markdown(*acc.load_cells(tmp_path / "t.json"), tolerance=0.01, png=None)
    assert "| MRPC | 16x1 (transfer) | 0.5 |" in md and "| MRPC | 16x1 | 0.5 |" in md


def test_embedding_grid_records_dense_and_cells(tmp_path, monkeypatch):
    acc = _acc()
    from blockprune.frontends import embedding

    calls = []

    class Res:
        def __init__(self, cfg):
            self.compression_rate = 1 / (1 - cfg.ratio)
            self.report = {"dense_metric": 0.867, "pruned_metric": 0.867 - cfg.ratio / 30,
                           "allocation": {"ratios": {}}, "timings": {"finalise_seconds": 50.0},
                           "stages": [{"stage": "initial", "seconds": 0.0}, {"stage": "gradual", "seconds": 3000.0},
                                      {"stage": "retrain", "seconds": 2000.0}]}
            # the 0.7 run was finished by an earlier call: this one only re-finalised it
            self.stages_skipped = ["gradual", "retrain"] if cfg.ratio == 0.7 else []

    monkeypatch.setattr(embedding, "run_embedding", lambda cfg: calls.append(cfg) or Res(cfg))
    text = tmp_path / "s.txt"
    text.write_text("a\nb\n")
    settings = acc.EmbeddingGridSettings(text=str(text), limit_train=10)
    res = acc.ResultsFile(tmp_path / "e.json", settings)
    acc.run_embedding_grid(settings, [0.3, 0.5, 0.7], tmp_path / "glue" / "STS-B", tmp_path / "runs", res,
                           log=lambda s: None)
    assert [(c.block, c.ratio, c.limit_train, c.allocation) for c in calls] == [
        ("16x1", r, 10, "sensitivity") for r in (0.3, 0.5, 0.7)]
    _, cells = acc.load_cells(tmp_path / "e.json")
    assert sorted(c.key for c in cells) == sorted(
        [f"{acc.EMBEDDING_TASK}/dense"] + [f"{acc.EMBEDDING_TASK}/embedding/16x1/{r:g}" for r in (0.3, 0.5, 0.7)])
    seconds = {c.ratio: c.seconds for c in cells if c.kind == "pruned"}
    assert seconds[0.7] == 5050.0 and seconds[0.3] < 60 and seconds[0.5] < 60  # stages' times vs this call's
    goals = acc.embedding_goals(cells)
    # 0.5 -> 2x at -1.67 points; 0.3 -> 1.43x at -1 point; 0.7 -> 3.33x at -2.33 points
    assert "**1.43x** (goal >= 2x: not met)" in goals[0] and "**2.00x** (goal >= 3x: not met)" in goals[1]
    calls.clear()
    acc.run_embedding_grid(settings, [0.3, 0.5, 0.7], tmp_path / "glue" / "STS-B", tmp_path / "runs",
                           acc.ResultsFile(tmp_path / "e.json", settings), log=lambda s: None)
    assert calls == []
    with pytest.raises(SystemExit, match="other settings"):
        acc.ResultsFile(tmp_path / "e.json", acc.EmbeddingGridSettings(text=str(text), limit_train=11))
    with pytest.raises(SystemExit, match="other settings"):
        acc.ResultsFile(tmp_path / "e.json", acc.EmbeddingGridSettings(text=str(text), limit_train=10,
                                                                       relation_weight=4.0))
    # a results file written before relation_weight/sensitivity_ratios existed resumes with their defaults
    data = json.loads((tmp_path / "e.json").read_text())
    for k in ("relation_weight", "sensitivity_ratios"):
        del data["settings"][k]
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert len(acc.ResultsFile(tmp_path / "e.json", settings).cells) == 4
    # the new settings reach the run's config
    rel = acc.EmbeddingGridSettings(text=str(text), limit_train=10, relation_weight=4.0,
                                    sensitivity_ratios=[0.2, 0.4, 0.6, 0.8])
    acc.run_embedding_grid(rel, [0.5], tmp_path / "glue" / "STS-B", tmp_path / "runs2",
                           acc.ResultsFile(tmp_path / "r.json", rel), log=lambda s: None)
    assert (calls[-1].relation_weight, calls[-1].sensitivity_ratios) == (4.0, [0.2, 0.4, 0.6, 0.8])


def _gradual_settings(acc):
    return acc.GridSettings(method="gradual", epochs_dense=3, epochs_rew=3, epochs_retrain=2, distill=0.5,
                            distill_hidden=1.0, allocation="sensitivity", score="activation", rgl_form="proximal",
                            freeze_embeddings=True)


def _fake_teacher(grid, task):
    ckpt = grid.runs_dir / task / "dense" / "checkpoints" / "dense"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text("{}")


def test_grid_stages_split_the_work_and_seeds_get_their_own_cells(tmp_path, monkeypatch):
    """--stage teacher/baseline/cells do disjoint parts (so processes can share a grid); extra seeds
    are separate cells (own run dir, own seed, own key) folded into a mean by the summary."""
    acc = _acc()
    import blockprune.frontends.recipe as recipe

    monkeypatch.setattr(recipe, "checkpoint_dir", lambda out, stage: Path(out) / "checkpoints" / stage)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    settings = _gradual_settings(acc)
    mk = lambda stage, seeds=None: acc.Grid(settings, ["RTE"], [], [], tmp_path / "d", tmp_path / "runs",  # noqa: E731
                                            cells=[("16x1", 0.5)], stage=stage, seeds=seeds)
    res = acc.ResultsFile(tmp_path / "g.json", settings)
    with pytest.raises(SystemExit, match="teacher .* is missing"):
        acc.run_grid(mk("cells"), res, log=lambda s: None)
    acc.run_grid(mk("teacher"), res, log=lambda s: None)
    assert [(Path(c.out).name, c.stop_after) for c in calls] == [("dense", "dense")] and res.cells == {}
    _fake_teacher(mk("teacher"), "RTE")
    calls.clear()
    acc.run_grid(mk("teacher"), res, log=lambda s: None)
    assert calls == []  # the teacher exists: nothing retrained
    acc.run_grid(mk("baseline"), res, log=lambda s: None)
    assert [Path(c.out).name for c in calls] == ["dense", "dense-baseline"] and list(res.cells) == ["RTE/dense"]
    calls.clear()
    acc.run_grid(mk("cells", seeds=[0, 1, 2]), res, log=lambda s: None)
    assert [(Path(c.out).name, c.seed, c.method) for c in calls] == [
        ("r0.5", 0, "gradual"), ("r0.5-s1", 1, "gradual"), ("r0.5-s2", 2, "gradual")]
    assert sorted(res.cells) == ["RTE/dense", "RTE/gradual/16x1/0.5", "RTE/gradual/16x1/0.5/s1",
                                 "RTE/gradual/16x1/0.5/s2"]
    # the summary counts a cell run with several seeds once, with the mean of its seeds
    cells = list(res.cells.values())
    for c, v in zip(sorted((c for c in cells if c.kind == "pruned"), key=lambda c: c.seed), (0.70, 0.79, 0.90)):
        c.metric = v
    (folded, n, std), = [x for x in acc.seed_means(cells) if x[0].kind == "pruned"]
    assert n == 3 and folded.metric == pytest.approx(0.7967, abs=1e-4)
    assert std == pytest.approx(statistics.stdev([0.70, 0.79, 0.90]))
    s, = acc.summarize(cells, tolerance=0.01)
    assert s.best_rate == 1.0  # seed 2 alone (0.90) is within a point of dense 0.81; the mean (0.797) is not
    assert "79.67 ± 10.02 (3 seeds)" in acc.markdown({}, cells, 0.01, None)


def test_ablation_configs_differ_only_in_how_masks_are_chosen(tmp_path):
    acc = _acc()
    settings = _gradual_settings(acc)
    grid = acc.Grid(settings, ["MRPC"], [], [], tmp_path / "d", tmp_path / "runs")
    out = tmp_path / "runs" / "MRPC" / "ablation" / "x"
    cfgs = {m: acc.ablation_config(grid, "MRPC", m, "16x1", 0.7, 1, out) for m in acc.ABLATION_METHODS}
    for cfg in cfgs.values():  # same start, budget, distillation, allocation, seed
        assert Path(cfg.model).parts[-4:] == ("MRPC", "dense", "checkpoints", "dense") or "dense" in cfg.model
        assert (cfg.epochs_dense, cfg.epochs_rew + cfg.epochs_retrain, cfg.distill, cfg.distill_hidden) == (0, 5, 0.5, 1.0)
        assert (cfg.allocation, cfg.block, cfg.ratio, cfg.seed) == ("sensitivity", "16x1", 0.7, 1)
        cfg.validate()
    assert (cfgs["magnitude-weight"].method, cfgs["magnitude-weight"].score, cfgs["magnitude-weight"].epochs_rew) == \
        ("magnitude", "weight", 0)
    assert cfgs["magnitude-activation"].score == "activation"
    assert (cfgs["rgl-penalty"].method, cfgs["rgl-penalty"].rgl_form, cfgs["rgl-penalty"].lam_value) == ("rgl", "penalty", 1e-4)
    assert (cfgs["rgl-proximal"].rgl_form, cfgs["rgl-proximal"].lam_value, cfgs["rgl-proximal"].epochs_rew) == \
        ("proximal", 10.0, 3)
    t = cfgs["rgl-targeted"]
    assert (t.method, t.rgl_form, t.rgl_scope, t.rgl_distill, t.epochs_rew) == ("rgl", "proximal", "target", True, 3)
    assert cfgs["rgl-proximal"].rgl_scope == "all" and not cfgs["rgl-proximal"].rgl_distill
    with pytest.raises(SystemExit, match="unknown ablation method"):
        acc.ablation_config(grid, "MRPC", "lottery", "16x1", 0.7, 0, out)


def _par():
    return _bench("accuracy_parallel.py", "bench_accuracy_parallel")


def test_parallel_plan_has_every_job_once_after_its_teacher():
    par = _par()
    jobs = par.plan_jobs(["SST-2", "MRPC", "RTE", "CoLA", "STS-B"], {"grid", "seeds", "ablation", "embedding"}, False)
    names = [j.name for j in jobs]
    assert names[0] == "teacher:SST-2" and len(names) == len(set(names))
    cells = [j for j in jobs if j.name.startswith("cell:")]
    assert len([j for j in cells if j.name.endswith(":s0")]) == 5 * len(par.CELLS)
    assert {j.name for j in cells if j.name.startswith("cell:RTE") and not j.name.endswith(":s0")} == \
        {f"cell:RTE:{b}:{r:g}:s{s}" for b, r in par.CELLS for s in (1, 2)}
    assert sum(j.name.startswith("ablation:") for j in jobs) == 2 * sum(len(v) for v in par.ABLATION_SEEDS.values())
    for j in jobs:
        if not j.name.startswith(("teacher:", "embedding:")):
            assert j.deps == [f"teacher:{j.name.split(':')[1]}"]


def test_parallel_plan_with_the_baseline_as_teacher_runs_each_baseline_before_its_cells():
    par = _par()
    jobs = par.plan_jobs(["MRPC", "RTE"], {"grid", "seeds"}, False, teacher="baseline")
    names = [j.name for j in jobs]
    tbase = str(par.grid_results(False, "baseline"))
    assert tbase.endswith("accuracy_gradual_tbase.json")
    for j in jobs:  # one results file for the grid's dense rows and cells, none shared with the plain grid
        assert j.argv[j.argv.index("--results") + 1] == tbase
        task = j.name.split(":")[1]
        if j.name.startswith("cell:"):
            assert j.deps == [f"teacher:{task}", f"baseline:{task}"] and "baseline" in j.argv
            assert names.index(f"baseline:{task}") < names.index(j.name)
    assert sum(n.startswith("cell:RTE") for n in names) == 3 * len(par.CELLS)  # the extra seeds too
    plain = par.plan_jobs(["MRPC"], {"grid"}, False)
    assert all("--results" not in j.argv and "--teacher" not in j.argv for j in plain)
    with pytest.raises(SystemExit, match="ablation"):
        par.plan_jobs(["MRPC"], {"grid", "ablation"}, False, teacher="baseline")


def test_parallel_plan_runs_the_cells_and_seeds_it_is_given_every_first_seed_before_any_extra():
    """``--cells``/``--seeds`` choose the grid a lent machine runs (the README's next GPU grid is
    16x1 at 0.5/0.6/0.7, three seeds on every task): each (task, cell, seed) once, even where the
    ablation cell's own extra seeds coincide, and every seed-0 cell before any extra seed."""
    par = _par()
    cells = [("16x1", 0.5), ("16x1", 0.6), ("16x1", 0.7)]
    jobs = par.plan_jobs(["MRPC", "CoLA"], {"grid", "seeds"}, False, teacher="baseline", cells=cells, seeds=(1, 2))
    names = [j.name for j in jobs if j.name.startswith("cell:")]
    assert sorted(names) == sorted(f"cell:{t}:16x1:{r:g}:s{s}" for t in ("MRPC", "CoLA") for r in (0.5, 0.6, 0.7)
                                   for s in (0, 1, 2))
    last_first = max(i for i, n in enumerate(names) if n.endswith(":s0"))
    assert all(n.endswith(":s0") for n in names[:last_first + 1])
    default = par.plan_jobs(["MRPC", "RTE"], {"grid", "seeds"}, False)
    assert {n.name for n in default if n.name.endswith(":s1")} == \
        {f"cell:RTE:{b}:{r:g}:s1" for b, r in par.CELLS} | {"cell:MRPC:16x1:0.7:s1"}
    # the ablation cell's own extra seeds only where this grid runs that cell
    other = par.plan_jobs(["MRPC"], {"grid", "seeds"}, False, cells=[("16x1", 0.5)], seeds=(1,))
    assert [j.name for j in other if j.name.startswith("cell:")] == ["cell:MRPC:16x1:0.5:s0", "cell:MRPC:16x1:0.5:s1"]
    with pytest.raises(SystemExit, match="extra seeds"):
        par.main(["--seeds", "0,1", "--list"])
    with pytest.raises(SystemExit, match="needs 'seeds'"):
        par.main(["--what", "grid", "--seeds", "1", "--list"])
    with pytest.raises(SystemExit, match="--cells after -- would override"):
        par.main(["--list", "--", "--exporter", "legacy", "--cells=16x1:0.5"])
    with pytest.raises(SystemExit):  # --seed is accuracy.py's dense seed: no abbreviation of --seeds
        par.main(["--seed", "1", "--list"])
    assert par._selection("16x1:0.6", "2,1,2", {"seeds"}, ["--seed", "1"]) == ([("16x1", 0.6)], (2, 1))


def test_parallel_runner_skips_dependants_of_a_failed_job_and_stops_at_the_deadline(tmp_path, monkeypatch):
    par = _par()
    script = tmp_path / "fake_accuracy.py"
    script.write_text("import sys, time\nargs = sys.argv[1:]\n"
                      "if 'BAD' in args: sys.exit(3)\n"
                      "time.sleep(30 if 'SLOW' in args else 0)\n")
    monkeypatch.setattr(par, "ACCURACY", script)
    jobs = [par.Job("teacher:A", ["A"]), par.Job("teacher:B", ["BAD"]), par.Job("cell:B:x", ["B"], ["teacher:B"]),
            par.Job("cell:A:x", ["A"], ["teacher:A"]), par.Job("slow", ["SLOW"])]
    par.run_jobs(jobs, 2, [], tmp_path / "logs", None, 4 / 60 * 60, dict(__import__("os").environ), echo=lambda s: None)
    status = {j.name: j.status for j in jobs}
    assert status == {"teacher:A": "ok", "teacher:B": "failed", "cell:B:x": "skipped", "cell:A:x": "ok",
                      "slow": "killed"}
    assert (tmp_path / "logs" / "teacher_B.log").read_text().startswith(sys.executable)


def test_collect_packs_every_pruned_cells_masks_under_its_run_dir_from_runs_on(tmp_path):
    """A GPU machine's runs dir stays there: ``--collect`` brings back each pruned cell's masks (not
    the dense rows', not a cell whose run left none) under ``runs/...`` so that, unpacked in this
    checkout, the speed benchmark and the README's match find them where the results JSON says."""
    import json
    import tarfile

    import numpy as np
    from safetensors.numpy import save_file

    par = _par()
    device = tmp_path / "device-checkout"
    cells = {}
    for name, kind, ratio in (("SST-2/dense", "dense", None), ("SST-2/gradual/16x1/0.5", "pruned", 0.5),
                              ("RTE/gradual/16x1/0.7", "pruned", 0.7), ("RTE/gradual/16x1/0.8", "pruned", 0.8)):
        run = device / "runs" / "accuracy-gradual" / name.replace("/gradual/16x1/", "/gradual-16x1/r")
        run.mkdir(parents=True)
        if ratio != 0.8:  # a run killed at the deadline leaves no masks
            save_file({"w": (np.random.default_rng(0).random((32, 16)) > (ratio or 0)).astype(np.uint8)},
                      str(run / "masks.safetensors"))
        cells[name] = {"kind": kind, "run_dir": str(run)}
    results = device / "accuracy_gradual.json"
    results.write_text(json.dumps({"cells": cells}))
    packed, n = par.collect_masks([results, results.with_suffix(".md")], tmp_path / "out")
    assert n == 2 and packed == tmp_path / "out" / "masks.tar.xz"
    name = "runs/accuracy-gradual/RTE/gradual-16x1/r0.7/masks.safetensors"
    with tarfile.open(packed) as tf:
        assert sorted(tf.getnames()) == [name, "runs/accuracy-gradual/SST-2/gradual-16x1/r0.5/masks.safetensors"]
        got = tf.extractfile(name).read()
    assert got == Path(cells["RTE/gradual/16x1/0.7"]["run_dir"], "masks.safetensors").read_bytes()
    assert par.collect_masks([results.with_suffix(".md")], tmp_path / "none") is None


def test_limit_train_takes_all_for_no_cap_and_refuses_nonsense(tmp_path):
    acc = _acc()
    base = ["--runs-dir", str(tmp_path / "runs")]
    assert acc.parse_args(base + ["--embedding"]).limit_train == 20000  # the embedding grid's default cap
    assert acc.parse_args(base + ["--embedding", "--limit-train", "all"]).limit_train is None
    assert acc.parse_args(base + ["--limit-train", "ALL", "--sst2-limit-train", "all"]).sst2_limit_train is None
    assert acc.parse_args(base + ["--limit-train", "500"]).limit_train == 500
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            acc.parse_args(base + ["--limit-train", bad])


def test_augment_is_a_setting_of_the_gradual_grid_and_stays_off_for_the_teacher(tmp_path):
    acc = _acc()
    s = acc.GridSettings(method="gradual", distill=0.5, distill_hidden=1.0, augment=2, rgl_form="proximal",
                         score="activation", allocation="sensitivity", exporter="legacy")
    grid = acc.Grid(s, ["MRPC"], ["16x1"], [0.5], tmp_path / "glue", tmp_path / "runs", 1)
    assert acc._config(grid, "MRPC", tmp_path / "o", method="gradual").augment == 2
    assert acc._config(grid, "MRPC", tmp_path / "o", stop_after="dense", distill=0.0).augment == 0
    with pytest.raises(SystemExit, match="--method gradual"):
        acc.main(["--method", "rgl", "--augment", "1", "--runs-dir", str(tmp_path / "r"),
                  "--results", str(tmp_path / "x.json"), "--tasks", "MRPC"])


def test_teacher_choice_is_a_gradual_grid_setting(tmp_path):
    acc = _acc()
    args = acc.parse_args(["--runs-dir", str(tmp_path / "r"), "--teacher", "baseline"])
    assert args.teacher == "baseline"
    assert acc.GridSettings().teacher == "start"  # grids committed before the option resume unchanged
    with pytest.raises(SystemExit, match="--method gradual"):
        acc.main(["--method", "rgl", "--teacher", "baseline", "--runs-dir", str(tmp_path / "r"),
                  "--results", str(tmp_path / "x.json"), "--tasks", "MRPC"])
    with pytest.raises(SystemExit):
        acc.parse_args(["--teacher", "bigger"])


def test_lr_pruned_is_a_gradual_grid_variant_and_not_an_ablation_setting(tmp_path):
    acc = _acc()
    assert acc.parse_args(["--runs-dir", str(tmp_path / "r"), "--lr-pruned", "5e-5"]).lr_pruned == 5e-5
    assert acc.GridSettings().lr_pruned is None  # grids committed before the option resume unchanged
    for extra in (["--method", "rgl"], ["--ablation"]):
        with pytest.raises(SystemExit, match="--lr-pruned"):
            acc.main([*extra, "--lr-pruned", "5e-5", "--runs-dir", str(tmp_path / "r"),
                      "--results", str(tmp_path / "x.json"), "--tasks", "MRPC"])
        assert not (tmp_path / "x.json").exists()


def test_distillation_variants_share_the_dense_runs_but_not_the_cell_dirs(tmp_path, monkeypatch):
    """A control (no distillation, logits only, another teacher) run into the same --runs-dir
    reuses the task's dense teacher and baseline, and trains its cells in a dir of its own: it
    neither resumes nor overwrites the default cell's checkpoints."""
    acc = _acc()
    import dataclasses

    import blockprune.frontends.recipe as recipe

    monkeypatch.setattr(recipe, "checkpoint_dir", lambda out, stage: Path(out) / "checkpoints" / stage)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    default = _gradual_settings(acc)
    outs = {}
    for name, settings in [("default", default),
                           ("nodistill", dataclasses.replace(default, distill=0.0, distill_hidden=0.0)),
                           ("logits", dataclasses.replace(default, distill_hidden=0.0, teacher="baseline")),
                           ("both", dataclasses.replace(default, teacher="baseline", augment=2)),
                           ("lr", dataclasses.replace(default, teacher="baseline", lr_pruned=5e-5))]:
        grid = acc.Grid(settings, ["RTE"], [], [], tmp_path / "d", tmp_path / "runs", cells=[("16x1", 0.5)],
                        stage="all")
        calls.clear()
        acc.run_grid(grid, acc.ResultsFile(tmp_path / f"{name}.json", settings), log=lambda s: None)
        cell, = [c for c in calls if c.method == "gradual"]
        assert (cell.distill, cell.distill_hidden) == (settings.distill, settings.distill_hidden)
        assert Path(cell.model) == tmp_path / "runs" / "RTE" / "dense" / "checkpoints" / "dense"
        assert {Path(c.out).name for c in calls if c.method != "gradual"} == {"dense", "dense-baseline"}
        assert {c.lr_dense for c in calls} == {default.lr}  # the dense runs are the plain grid's
        assert (cell.lr_rew, cell.lr_retrain) == (settings.lr_pruned or default.lr,) * 2
        outs[name] = Path(cell.out).relative_to(tmp_path / "runs").as_posix()
    assert outs == {"default": "RTE/gradual-16x1/r0.5", "nodistill": "RTE/gradual-16x1-nodistill/r0.5",
                    "logits": "RTE/gradual-16x1-tbase-kd0.5-h0/r0.5", "both": "RTE/gradual-16x1-tbase-aug2/r0.5",
                    "lr": "RTE/gradual-16x1-tbase-lr5e-05/r0.5"}


def test_a_task_at_its_own_rate_trains_its_own_dense_runs_apart_and_the_others_keep_theirs(tmp_path, monkeypatch):
    """--task-lr CoLA=5e-5: CoLA's teacher, baseline and cells train at 5e-5 in CoLA-lr5e-05/ (a runs
    dir shared with a plain-rate grid neither resumes nor overwrites them); RTE stays at the grid's
    rate in RTE/; --lr-pruned equal to a task's own rate is no variant for that task."""
    acc = _acc()
    import dataclasses

    import blockprune.frontends.recipe as recipe

    monkeypatch.setattr(recipe, "checkpoint_dir", lambda out, stage: Path(out) / "checkpoints" / stage)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    args = acc.parse_args(["--runs-dir", str(tmp_path / "r"), "--task-lr", "CoLA=5e-5, RTE=2e-5"])
    assert args.task_lr == {"CoLA": 5e-5, "RTE": 2e-5}
    for bad in ("CoLA", "COLA=5e-5", "CoLA=0", "CoLA=fast"):
        with pytest.raises(SystemExit):
            acc.parse_args(["--task-lr", bad])
    settings = dataclasses.replace(_gradual_settings(acc), teacher="baseline", task_lr={"CoLA": 5e-5},
                                   lr_pruned=5e-5)
    grid = acc.Grid(settings, ["RTE", "CoLA"], [], [], tmp_path / "d", tmp_path / "runs", cells=[("16x1", 0.5)],
                    stage="all")
    results = acc.ResultsFile(tmp_path / "g.json", settings)
    acc.run_grid(grid, results, log=lambda s: None)
    by_task = {}
    for c in calls:
        by_task.setdefault(c.task, []).append(c)
    cola, rte = by_task["CoLA"], by_task["RTE"]
    assert {c.lr_dense for c in cola} == {5e-5} and {c.lr_dense for c in rte} == {settings.lr}
    assert {Path(c.out).relative_to(tmp_path / "runs").parts[0] for c in cola} == {"CoLA-lr5e-05"}
    assert {Path(c.out).relative_to(tmp_path / "runs").parts[0] for c in rte} == {"RTE"}
    cell, = [c for c in cola if c.method == "gradual"]
    assert Path(cell.model) == tmp_path / "runs" / "CoLA-lr5e-05" / "dense" / "checkpoints" / "dense"
    assert Path(cell.out).parent.name == "gradual-16x1-tbase"  # 5e-5 is CoLA's own rate: no -lr variant
    rcell, = [c for c in rte if c.method == "gradual"]
    assert Path(rcell.out).parent.name == "gradual-16x1-tbase-lr5e-05" and rcell.lr_rew == 5e-5
    # a results file written before task_lr existed resumes as a grid without one, and only so
    import json

    plain = _gradual_settings(acc)
    acc.ResultsFile(tmp_path / "old.json", plain).add(acc.Cell("RTE", "dense", "accuracy", 0.5, 0.5, method="dense"))
    data = json.loads((tmp_path / "old.json").read_text())
    del data["settings"]["task_lr"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert acc.ResultsFile(tmp_path / "old.json", plain).cells
    with pytest.raises(SystemExit, match="task_lr"):
        acc.ResultsFile(tmp_path / "old.json", dataclasses.replace(plain, task_lr={"CoLA": 5e-5}))
    with pytest.raises(SystemExit, match="--task-lr"):
        acc.main(["--method", "rgl", "--task-lr", "CoLA=5e-5", "--runs-dir", str(tmp_path / "r"),
                  "--results", str(tmp_path / "x.json"), "--tasks", "CoLA"])
    assert not (tmp_path / "x.json").exists()


def test_a_grid_refuses_a_dense_teacher_trained_with_another_seed_or_rate(tmp_path, monkeypatch):
    """--stage cells (and --stage teacher) do not retrain a teacher they find: one trained with
    another seed or rate in the same runs dir is refused with the fix, before anything trains."""
    acc = _acc()
    import dataclasses
    import json

    import blockprune.frontends.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    settings = _gradual_settings(acc)
    run = tmp_path / "runs" / "RTE" / "dense"
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"config": {"seed": 0, "lr_dense": settings.lr,
                                                           "epochs_dense": settings.epochs_dense}}))
    grid = lambda s: acc.Grid(s, ["RTE"], [], [], tmp_path / "d", tmp_path / "runs",  # noqa: E731
                              cells=[("16x1", 0.5)], stage="cells")
    assert acc._teacher_ckpt(grid(settings), "RTE").is_relative_to(run)  # its own seed and rate: fine
    for other in (dataclasses.replace(settings, seed=1), dataclasses.replace(settings, lr=5e-5)):
        with pytest.raises(SystemExit, match="--runs-dir of its own"):
            acc.run_grid(grid(other), acc.ResultsFile(tmp_path / f"g{other.seed}{other.lr}.json", other),
                         log=lambda s: None)
    assert calls == []


def test_a_fresh_clone_rebuilds_a_recorded_dense_row_and_refuses_one_that_comes_out_otherwise(tmp_path, monkeypatch):
    """On a clone, the committed JSON has a task's dense row but runs/ (not committed) lacks its
    checkpoints: --stage baseline retrains the teacher and baseline, checks they land on the
    recorded metrics, and keeps the row; then the cells can run. A rerun that lands elsewhere
    stops the grid with the fix (cells from it would not match the committed ones)."""
    acc = _acc()
    import dataclasses

    import blockprune.frontends.recipe as recipe

    monkeypatch.setattr(recipe, "checkpoint_dir", lambda out, stage: Path(out) / "checkpoints" / stage)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda cfg: calls.append(cfg) or _Fake(cfg))
    settings = dataclasses.replace(_gradual_settings(acc), teacher="baseline")
    mk = lambda stage, runs="runs": acc.Grid(settings, ["RTE"], [], [], tmp_path / "d", tmp_path / runs,  # noqa: E731
                                             cells=[("16x1", 0.5)], stage=stage)
    results = tmp_path / "g.json"
    acc.run_grid(mk("baseline"), acc.ResultsFile(results, settings), log=lambda s: None)
    recorded = json.loads(results.read_text())["cells"]["RTE/dense"]
    # a clone: the same JSON, no runs/
    calls.clear()
    with pytest.raises(SystemExit, match="teacher .* is missing"):
        acc.run_grid(mk("cells", "clone"), acc.ResultsFile(results, settings), log=lambda s: None)
    logs = []
    acc.run_grid(mk("baseline", "clone"), acc.ResultsFile(results, settings), log=logs.append)
    assert [Path(c.out).name for c in calls] == ["dense", "dense-baseline"]
    assert Path(calls[1].model) == tmp_path / "clone" / "RTE" / "dense" / "checkpoints" / "dense"
    assert json.loads(results.read_text())["cells"]["RTE/dense"] == recorded  # the row is kept as it was
    assert any("as recorded" in line for line in logs)
    calls.clear()
    acc.run_grid(mk("baseline", "clone"), acc.ResultsFile(results, settings), log=lambda s: None)
    assert calls == []  # rebuilt once: nothing retrains
    acc.run_grid(mk("cells", "clone"), acc.ResultsFile(results, settings), log=lambda s: None)
    cell, = calls
    assert cell.teacher == str(tmp_path / "clone" / "RTE" / "dense-baseline" / "checkpoints" / "dense")
    # a rebuild that does not reproduce the row (another torch, another machine) is refused
    data = json.loads(results.read_text())
    data["cells"]["RTE/dense"]["metric"] = 0.85
    results.write_text(json.dumps(data))
    calls.clear()
    with pytest.raises(SystemExit, match=r"differ from the recorded row \{'metric': \(0.85, 0.81\)\}.*--results OTHER"):
        acc.run_grid(mk("baseline", "clone2"), acc.ResultsFile(results, settings), log=lambda s: None)
    assert json.loads(results.read_text())["cells"]["RTE/dense"]["metric"] == 0.85  # nothing rewritten
    # cells that distil from their start need only the teacher back, checked on its own metric
    start = dataclasses.replace(settings, teacher="start")
    calls.clear()
    acc.run_grid(acc.Grid(start, ["RTE"], [], [], tmp_path / "d", tmp_path / "runs", stage="baseline"),
                 acc.ResultsFile(tmp_path / "s.json", start), log=lambda s: None)
    calls.clear()
    acc.run_grid(acc.Grid(start, ["RTE"], [], [], tmp_path / "d", tmp_path / "clone3", stage="baseline"),
                 acc.ResultsFile(tmp_path / "s.json", start), log=lambda s: None)
    assert [Path(c.out).name for c in calls] == ["dense"]


def test_each_finished_cell_merges_its_masks_into_the_archive_beside_the_results(tmp_path, monkeypatch):
    """The masks of a cell outlive its checkout without a manual keep_masks.py: each recorded cell
    merges every finished cell's masks into masks/<results stem>.tar.xz (members named from runs/
    on); --no-keep-masks leaves no archive."""
    acc = _acc()
    import tarfile

    import blockprune.frontends.recipe as recipe

    def run(cfg):
        calls.append(cfg)
        if cfg.method == "gradual":
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "masks.safetensors").write_bytes(f"masks {cfg.ratio}".encode())
        return _Fake(cfg)

    monkeypatch.setattr(recipe, "checkpoint_dir", lambda out, stage: Path(out) / "checkpoints" / stage)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", run)
    settings = _gradual_settings(acc)
    for keep, name in ((True, "g"), (False, "off")):
        grid = acc.Grid(settings, ["RTE"], [], [], tmp_path / "d", tmp_path / "runs", cells=[("16x1", 0.5), ("16x1", 0.7)],
                        stage="all", keep_masks=keep)
        acc.run_grid(grid, acc.ResultsFile(tmp_path / f"{name}.json", settings), log=lambda s: None)
    with tarfile.open(tmp_path / "masks" / "g.tar.xz") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    assert members == {"runs/RTE/gradual-16x1/r0.5/masks.safetensors": b"masks 0.5",
                       "runs/RTE/gradual-16x1/r0.7/masks.safetensors": b"masks 0.7"}
    assert not (tmp_path / "masks" / "off.tar.xz").exists()
    assert acc.parse_args(["--no-keep-masks"]).no_keep_masks and not acc.parse_args([]).no_keep_masks


def test_run_key_is_the_path_from_the_last_runs_folder_so_a_checkout_under_runs_still_matches():
    """Archives and speed files name a run by its key; two clones of one run must agree, even a
    clone whose own path holds a folder called ``runs``, and a path without one has no key."""
    acc = _acc()
    inside = "/home/me/runs/blockprune/runs/accuracy-augment/RTE/gradual-16x1/r0.6-s1"
    assert acc.run_key(inside) == "runs/accuracy-augment/RTE/gradual-16x1/r0.6-s1"
    assert acc.run_key("/work/main/runs/accuracy-augment/RTE/gradual-16x1/r0.6-s1") == acc.run_key(inside)
    assert acc.run_key(Path("runs") / "a" / "b") == "runs/a/b"
    assert acc.run_key("/tmp/grid/RTE/r0.6") is None
