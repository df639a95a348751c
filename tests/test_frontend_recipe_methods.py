"""The new recipe paths end to end on a slice of RTE with a tiny random BERT:

* ``method="gradual"`` with logit + hidden-state distillation and a sensitivity allocation,
  interrupted in its retrain stage and resumed: the
  per-layer ratios differ, meet the overall target exactly, are what the saved masks hold, and
  are written into the masks' metadata and the report; the retraining keeps the gradual masks;
* ``method="rgl"`` in the proximal form over every group drives groups to exactly zero and logs
  each alpha refresh (fraction of zero groups, pruned/kept norm ratio) into the report; the
  default (targeted, distilled) stage zeroes what hard pruning then removes.
"""

from __future__ import annotations

import json

import pytest
import torch

from blockprune.frontends.recipe import run_recipe
from test_frontend_recipe import RTE, small_config, tiny_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not (RTE / "train.tsv").is_file(), reason="real GLUE RTE data not found")


def test_gradual_with_distillation_and_sensitivity_allocation(tiny_model, tmp_path):
    from blockprune.masks import load_masks

    cfg = small_config(tiny_model, tmp_path / "g", method="gradual", block="4x4", ratio=0.6, epochs_rew=2,
                       epochs_retrain=1, distill=0.5, distill_hidden=1.0, allocation="sensitivity",
                       sensitivity_ratios=[0.3, 0.6, 0.9], sensitivity_examples=32, calib_examples=32,
                       prune_every=2, limit_train=64, exporter="legacy")
    from blockprune.frontends import recipe as recipe_mod

    real = recipe_mod.train_stage

    def crashing(accelerator, model, loader, plan, *args, **kw):
        if plan.name == "retrain":
            raise RuntimeError("simulated interruption")
        return real(accelerator, model, loader, plan, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:  # interrupted in the retrain stage ...
        mp.setattr(recipe_mod, "train_stage", crashing)
        with pytest.raises(RuntimeError, match="simulated"):
            run_recipe(cfg)
    res = run_recipe(cfg)  # ... resumes with the gradual masks from disk and the dense teacher reloaded
    assert res.stages_skipped == ["dense", "gradual"] and res.stages_run == ["retrain"]
    rep = res.report
    alloc = rep["allocation"]
    assert alloc["rule"] == "sensitivity" and alloc["overall"] == pytest.approx(0.6, abs=1e-9)
    ratios = alloc["ratios"]
    assert len(set(round(r, 3) for r in ratios.values())) > 1  # not uniform
    assert rep["pruned_layers_sparsity"] == pytest.approx(0.6, abs=0.02)  # block rounding per layer
    maskset = load_masks(res.masks_path)
    assert maskset.source == "gradual-magnitude"
    assert maskset.extra["allocation"]["ratios"] == pytest.approx(ratios)
    for name, m in maskset.masks.items():
        assert 1 - m.mean() == pytest.approx(ratios[name], abs=16 / m.size + 1e-9)
    # the retrain stage used the masks the gradual stage ended with
    from safetensors.torch import load_file

    g = load_file(str(res.out / "checkpoints" / "gradual" / "block_masks.safetensors"))
    r = load_file(str(res.out / "checkpoints" / "retrain" / "block_masks.safetensors"))
    assert all(torch.equal(g[k], r[k]) for k in g)
    rows = {row["stage"]: row for row in rep["stages"]}
    hist = rows["gradual"]["history"]
    assert hist[0]["sparsity"] == 0.0 and hist[-1]["fraction_of_target"] == 1.0
    assert [h["sparsity"] for h in hist] == sorted(h["sparsity"] for h in hist)
    assert rep["config"]["distill_hidden"] == 1.0


def test_proximal_rgl_zeroes_groups_and_logs_refreshes(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "p", rgl_form="proximal", rgl_scope="all", lam=0.3, block="1x8", ratio=0.5,
                       epochs_dense=0, epochs_rew=2, epochs_retrain=0, limit_train=64, refresh_every_steps=2,
                       refresh_every_epochs=None, exporter="legacy")
    res = run_recipe(cfg)
    log = res.report["rgl_refreshes"]
    assert log[0]["refresh"] == 0 and len(log) >= 3
    assert 0.2 < log[-1]["zero_group_fraction"] < 0.95, log  # exact zeros within a few steps
    assert log[-1]["pruned_kept_norm_ratio"] < log[0]["pruned_kept_norm_ratio"]
    assert res.report["rgl_form"] == "proximal" and res.report["lambda"] == 0.3
    state = json.loads((res.out / "state.json").read_text())
    assert state["stages"]["reweighted"]["history"] == log


def test_targeted_distilled_rgl_prunes_what_it_shrank(tiny_model, tmp_path):
    """``rgl_scope="target"`` with ``rgl_distill``: the reweighted stage is distilled from the dense
    model, shrinks only each layer's allocated share (to exactly zero with a strong lambda), and
    hard pruning then removes exactly those groups at the same per-layer ratios."""
    from safetensors.torch import load_file

    from blockprune.frontends import recipe as recipe_mod
    from blockprune.masks import load_masks

    cfg = small_config(tiny_model, tmp_path / "t", method="rgl", rgl_form="proximal", rgl_scope="target",
                       rgl_distill=True, distill=0.5, lam=1e4, block="4x4", ratio=0.5, epochs_dense=0, epochs_rew=2,
                       epochs_retrain=1, allocation="sensitivity", sensitivity_ratios=[0.3, 0.6, 0.9],
                       sensitivity_examples=32, calib_examples=32, prune_every=1, limit_train=64, exporter="legacy")
    real = recipe_mod.train_stage
    teachers = {}

    def spy(accelerator, model, loader, plan, cfg_, layers=None, masks=None, teacher=None, **kw):
        teachers[plan.name] = teacher is not None
        return real(accelerator, model, loader, plan, cfg_, layers, masks, teacher, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_mod, "train_stage", spy)
        res = run_recipe(cfg)
    assert teachers == {"reweighted": True, "retrain": True}
    assert (res.report["rgl_scope"], res.report["rgl_distilled"]) == ("target", True)
    state = json.loads((res.out / "state.json").read_text())
    ratios = state["stages"]["reweighted"]["allocation"]["ratios"]
    assert len(set(round(r, 3) for r in ratios.values())) > 1  # sensitivity, not uniform
    maskset = load_masks(res.masks_path)
    assert maskset.extra["allocation"]["ratios"] == pytest.approx(ratios)  # hard pruning used the same ratios
    norms = load_file(str(res.out / "checkpoints" / "reweighted" / "group_norms.safetensors"))
    for name, m in maskset.masks.items():
        zero = (norms[name] == 0).numpy()
        keep = torch.as_tensor(m).bool().numpy().T  # the masks file holds the ONNX (in x out) orientation
        pruned = ~keep.reshape(zero.shape[0], 4, zero.shape[1], 4)[:, 0, :, 0]
        assert (zero == pruned).all(), name  # what the stage zeroed is what was pruned
        assert zero.mean() == pytest.approx(ratios[name], abs=1 / zero.size + 1e-9)
    with pytest.raises(Exception, match="rgl-distill"):
        small_config(tiny_model, tmp_path / "x", method="rgl", rgl_distill=True).validate()
    with pytest.raises(Exception, match="proximal form"):
        small_config(tiny_model, tmp_path / "y", method="rgl", rgl_scope="target", prune_mode="layer").validate()
    with pytest.raises(Exception, match="does not have"):
        small_config(tiny_model, tmp_path / "z", method="gradual", rgl_scope="target").validate()


def test_rgl_defaults_to_the_targeted_distilled_stage_where_it_applies(tiny_model, tmp_path):
    """The default RGL stage is the targeted one (proximal form, per-layer ratios) and is
    distilled whenever the recipe distils; the paper's stage stays one flag away, and asking for
    it explicitly fingerprints like the runs made before the new default (they resume)."""
    kw = dict(rgl_form="proximal", prune_mode="layer", distill=0.5)
    auto = small_config(tiny_model, tmp_path / "a", **kw)
    auto.validate()
    assert (auto.scope, auto.distill_rgl_stage) == ("target", True)
    fp = auto.fingerprint()
    assert (fp["rgl_scope"], fp["rgl_distill"]) == ("target", True)
    paper = small_config(tiny_model, tmp_path / "p", rgl_scope="all", rgl_distill=False, **kw)
    assert (paper.scope, paper.distill_rgl_stage) == ("all", False)
    assert "rgl_scope" not in paper.fingerprint() and "rgl_distill" not in paper.fingerprint()
    # where the target does not apply, auto is the old behaviour: no error, same fingerprint
    for other in (dict(rgl_form="penalty"), dict(prune_mode="threshold", threshold=0.1), dict(distill=0.0)):
        cfg = small_config(tiny_model, tmp_path / "o", **{**kw, **other})
        cfg.validate()
        assert cfg.scope == ("target" if other == dict(distill=0.0) else "all")
        assert cfg.distill_rgl_stage is (other != dict(distill=0.0))
    dense_only = small_config(tiny_model, tmp_path / "d", stop_after="dense", **kw)
    assert dense_only.fingerprint() == fp  # `--stop-after dense`, then the full run, resumes
    teacher = small_config(tiny_model, tmp_path / "t", rgl_form="penalty", distill=0.0, stop_after="dense")
    assert (teacher.scope, teacher.distill_rgl_stage) == ("all", False)  # the grid's teachers: fingerprints unchanged
    no_distill = small_config(tiny_model, tmp_path / "n", rgl_distill=False, **kw)
    assert no_distill.distill_rgl_stage is False
