"""benchmarks/accuracy.py with the gradual recipe and the embedding grid, with the training
replaced by a recorder: which runs are started from which checkpoints with which settings, the
same-budget dense baseline, the SST-2 cap, the cell order, resumption, and the goals line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _acc():
    spec = importlib.util.spec_from_file_location("bench_accuracy_grid", ROOT / "benchmarks" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Fake:
    def __init__(self, cfg):
        self.metric_name = "accuracy"
        self.metrics = {"dense": 0.80 if cfg.epochs_dense == 3 else 0.81}
        self.report = {"pruned_metric": 0.8 - cfg.ratio / 20, "allocation": {"ratios": {"w": cfg.ratio}}}
        self.compression_rate = 1 / (1 - cfg.ratio)


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


def test_embedding_grid_records_dense_and_cells(tmp_path, monkeypatch):
    acc = _acc()
    from blockprune.frontends import embedding

    calls = []

    class Res:
        def __init__(self, cfg):
            self.compression_rate = 1 / (1 - cfg.ratio)
            self.report = {"dense_metric": 0.867, "pruned_metric": 0.867 - cfg.ratio / 30,
                           "allocation": {"ratios": {}}}

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
    goals = acc.embedding_goals(cells)
    # 0.5 -> 2x at -1.67 points; 0.3 -> 1.43x at -1 point; 0.7 -> 3.33x at -2.33 points
    assert "**1.43x** (goal >= 2x: not met)" in goals[0] and "**2.00x** (goal >= 3x: not met)" in goals[1]
    calls.clear()
    acc.run_embedding_grid(settings, [0.3, 0.5, 0.7], tmp_path / "glue" / "STS-B", tmp_path / "runs",
                           acc.ResultsFile(tmp_path / "e.json", settings), log=lambda s: None)
    assert calls == []
    with pytest.raises(SystemExit, match="other settings"):
        acc.ResultsFile(tmp_path / "e.json", acc.EmbeddingGridSettings(text=str(text), limit_train=11))
