"""The three-stage recipe end to end on a slice of real GLUE data (RTE), with a tiny BERT.

What is asserted, and why it can fail:
* the reweighted group Lasso separates the groups that get pruned from the kept ones (their
  mean-norm ratio falls by more than 20% during the reweighted stage);
* masks.safetensors, keyed by ONNX initializer names in each initializer's layout, applied to an
  ONNX export whose pruned entries were deliberately refilled with noise, reproduce the pruned
  PyTorch model's logits under onnxruntime (a key or layout mistake leaves noise in);
* a crash inside a stage leaves the finished stages recorded, and the next call skips them;
* every bad input is refused with a BlockpruneError before a run directory exists;
* the magnitude baseline runs and labels its masks as such.

The model is a 2-layer, 32-wide BERT with the bundled MiniLM tokenizer's vocabulary (random
weights, built here; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.frontends import recipe as recipe_mod
from blockprune.frontends.recipe import RecipeConfig, run_recipe

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
RTE = GLUE / "RTE"

pytestmark = pytest.mark.skipif(not (RTE / "train.tsv").is_file() or not (RTE / "dev.tsv").is_file(),
                                reason=f"real GLUE RTE data not found under {GLUE}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32) whose vocabulary matches the bundled tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from blockprune.models.zoo import bundled_model_dir

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(bundled_model_dir()), local_files_only=True).save_pretrained(str(out))
    return out


def small_config(model: Path, out: Path, **kw) -> RecipeConfig:
    base = dict(model=str(model), task="rte", data_dir=str(RTE), out=str(out), epochs_dense=1, epochs_rew=3,
                epochs_retrain=1, lr_dense=1e-3, lr_rew=3e-3, lr_retrain=1e-3, lam=1e-2, rgl_form="penalty", limit_train=96,
                limit_eval=32, batch_size=16, max_length=64, progress=False, threads=2)
    base.update(kw)
    return RecipeConfig(**base)


class _Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def rgl_run(tiny_model, tmp_path_factory):
    """One RGL run, crashed inside the retrain stage and then resumed: (first-call state, result)."""
    out = tmp_path_factory.mktemp("rgl") / "run"
    cfg = small_config(tiny_model, out)
    real_train_stage = recipe_mod.train_stage

    def crashing(accelerator, model, loader, plan, *args, **kw):
        if plan.name == "retrain":
            raise _Crash("simulated interruption in the retrain stage")
        return real_train_stage(accelerator, model, loader, plan, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_mod, "train_stage", crashing)
        with pytest.raises(_Crash):
            run_recipe(cfg)
    state_after_crash = json.loads((out / "state.json").read_text())
    mtimes = {s: (out / "checkpoints" / s / "model.safetensors").stat().st_mtime_ns for s in ("dense", "reweighted")}
    result = run_recipe(cfg)
    return state_after_crash, mtimes, result


def test_crash_keeps_finished_stages_and_resume_skips_them(rgl_run):
    state, mtimes, res = rgl_run
    assert sorted(state["stages"]) == ["dense", "initial", "reweighted"]  # retrain crashed: not recorded
    assert res.stages_skipped == ["dense", "reweighted"]
    assert res.stages_run == ["retrain"]
    assert res.finished
    for stage, mtime in mtimes.items():  # finished checkpoints were not rewritten
        assert (res.out / "checkpoints" / stage / "model.safetensors").stat().st_mtime_ns == mtime


def test_stop_after_a_finished_stage_runs_nothing(rgl_run, tiny_model):
    _, _, res = rgl_run
    again = run_recipe(small_config(tiny_model, res.out, stop_after="dense"))
    assert (again.finished, again.stages_run, again.stages_skipped) == (False, [], ["dense"])
    assert again.metrics == res.metrics


def test_resume_refuses_different_settings_before_training(rgl_run, tiny_model):
    _, _, res = rgl_run
    before = json.loads((res.out / "state.json").read_text())
    with pytest.raises(BlockpruneError, match="different settings.*lam"):
        run_recipe(small_config(tiny_model, res.out, lam=5e-2))
    assert json.loads((res.out / "state.json").read_text()) == before


def test_reweighted_stage_shrinks_pruned_groups_relative_to_kept(rgl_run):
    _, _, res = rgl_run
    rows = {r["stage"]: r for r in res.report["stages"]}
    before, after = rows["dense"]["ratio"], rows["reweighted"]["ratio"]
    assert 0 < before < 1  # the groups to be pruned are the weaker ones already
    assert after < 0.8 * before, (before, after)
    assert rows["reweighted"]["penalty"] > 0 and rows["reweighted"]["alpha_refreshes"] == 3
    assert rows["retrain"]["pruned_mean_norm"] == 0.0  # pruned groups are exactly zero at the end
    assert rows["retrain"]["kept_mean_norm"] > 0


def test_outputs_masks_and_compression(rgl_run):
    from transformers import AutoModelForSequenceClassification

    from blockprune.masks import load_masks
    from blockprune.onnx_io import get_meta, load_onnx

    _, _, res = rgl_run
    rep = json.loads(res.report_path.read_text())
    assert rep["mask_source"] == "reweighted-group-lasso"
    assert abs(rep["pruned_layers_sparsity"] - 0.5) < 1e-9
    model = AutoModelForSequenceClassification.from_pretrained(str(res.model_dir), local_files_only=True)
    params = dict(model.named_parameters())
    encoder = [n for n, p in params.items() if p.dim() == 2 and ".encoder." in n]
    assert len(encoder) == 12
    maskset = load_masks(res.masks_path)
    assert maskset.source == "reweighted-group-lasso"
    assert sorted(maskset.masks) == sorted(encoder)  # pooler/classifier are not pruned by default
    onnx_model = load_onnx(res.onnx_path)
    param_map = get_meta(onnx_model, "param_map")
    inits = {t.name for t in onnx_model.graph.initializer}
    counted_total = counted_nz = 0
    for name, mask in maskset.masks.items():
        info = maskset.layers[name]
        assert name in inits and info.hf_name == name and info.block == "1x32"
        assert info.layout == param_map[name]["layout"]
        w = params[name].detach().numpy()
        m = mask.T if info.layout == "in_out" else mask
        assert m.shape == w.shape
        assert np.all(w[m == 0] == 0.0)  # exactly zero, not just small
        assert abs(info.sparsity - 0.5) < 1e-9
    for n, p in params.items():
        if p.dim() == 2 and "embed" not in n:
            counted_total += p.numel()
            counted_nz += int(torch.count_nonzero(p))
    assert rep["compression_rate"] == pytest.approx(counted_total / counted_nz)
    assert 1.5 < rep["compression_rate"] < 2.0  # encoder at 50%, pooler/classifier dense but counted


def test_masks_applied_to_onnx_reproduce_pytorch_logits(rgl_run):
    """Refill the pruned entries with noise, export, apply masks.safetensors with the ONNX pass:
    onnxruntime must then match the pruned PyTorch model on real RTE dev sentences."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from blockprune.masks import load_masks
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model
    from blockprune.prune_api import prune_model
    from blockprune.frontends.glue import read_glue_split

    _, _, res = rgl_run
    maskset = load_masks(res.masks_path)
    pruned = load_model(str(res.model_dir), head="classification", num_labels=2)
    noisy = load_model(str(res.model_dir), head="classification", num_labels=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        params = dict(noisy.model.named_parameters())
        for name, mask in maskset.masks.items():
            m = mask.T if maskset.layers[name].layout == "in_out" else mask
            keep = torch.from_numpy(m != 0)
            p = params[name]
            p.copy_(torch.where(keep, p, torch.randn(p.shape, generator=g)))
    exported = export_onnx(noisy, None)
    applied = prune_model(exported.model, masks=maskset).model

    tok = AutoTokenizer.from_pretrained(str(res.model_dir), local_files_only=True)
    rows = read_glue_split(RTE, "rte", "dev", limit=6)
    enc = tok([r.text_a for r in rows], [r.text_b for r in rows], truncation=True, max_length=64,
              padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ref = pruned.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()

    def ort_logits(model) -> np.ndarray:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]

    assert np.max(np.abs(ort_logits(applied) - ref)) < 1e-4
    assert np.max(np.abs(ort_logits(exported.model) - ref)) > 1e-3  # the noise mattered before the masks
    # and the exported model.onnx itself already carries the zeros
    from blockprune.onnx_io import load_onnx

    assert np.max(np.abs(ort_logits(load_onnx(res.onnx_path)) - ref)) < 1e-4


def test_magnitude_baseline_runs_from_the_glue_root(tiny_model, tmp_path):
    out = tmp_path / "mag"
    res = run_recipe(small_config(tiny_model, out, method="magnitude", data_dir=str(GLUE), epochs_rew=5,
                                  ratio=0.75, limit_train=32, limit_eval=16))
    assert res.finished and res.stages_run == ["dense", "retrain"]
    rep = res.report
    assert rep["mask_source"] == "magnitude" and [r["stage"] for r in rep["stages"]] == ["initial", "dense", "retrain"]
    assert abs(rep["pruned_layers_sparsity"] - 0.75) < 1e-9
    from blockprune.masks import load_masks

    assert load_masks(res.masks_path).source == "magnitude"
    assert rep["masked_entries_verified_zero"] == pytest.approx(0.75 * sum(
        m.size for m in load_masks(res.masks_path).masks.values()))


# ------------------------------------------------------------------------------------------
# Bad input: one BlockpruneError each, before any run directory exists
# ------------------------------------------------------------------------------------------


def _task_dir(tmp_path: Path, train_lines: list[str] | None, name: str = "RTE", dev: bool = True) -> Path:
    d = tmp_path / name
    d.mkdir()
    src = (RTE / "train.tsv").read_text(encoding="utf-8").splitlines()
    if train_lines is not None:
        (d / "train.tsv").write_text("\n".join([src[0], *src[1:4], *train_lines]) + "\n", encoding="utf-8")
    if dev:
        shutil.copy(RTE / "dev.tsv", d / "dev.tsv")
    return d


@pytest.mark.parametrize("case", [
    "missing_dir", "missing_split", "unknown_task", "wrong_columns", "bad_label", "block_too_big",
    "ratio_one", "ratio_negative",
])
def test_bad_input_fails_before_training(case, tiny_model, tmp_path):
    out = tmp_path / "run"
    kw: dict = {}
    expect = {
        "missing_dir": "does not exist", "missing_split": "dev.tsv", "unknown_task": "unknown GLUE task",
        "wrong_columns": r"train.tsv:5: expected 4 tab-separated columns, found 3",
        "bad_label": r"train.tsv:5: label 'maybe' is not in the RTE label set",
        "block_too_big": "larger than layer", "ratio_one": "outside", "ratio_negative": "outside",
    }[case]
    if case == "missing_dir":
        kw["data_dir"] = str(tmp_path / "nowhere")
    elif case == "missing_split":
        kw["data_dir"] = str(_task_dir(tmp_path, [], dev=False))
    elif case == "unknown_task":
        kw["task"] = "rtee"
    elif case == "wrong_columns":
        kw["data_dir"] = str(_task_dir(tmp_path, ["99\tonly\tthree"], name="my-rte"))  # any folder name
    elif case == "bad_label":
        kw["data_dir"] = str(_task_dir(tmp_path, ["99\ta\tb\tmaybe"]))
    elif case == "block_too_big":
        kw["block"] = "1x128"  # the model is 32 wide
    elif case == "ratio_one":
        kw["ratio"] = 1.0
    elif case == "ratio_negative":
        kw["ratio"] = -0.1
    with pytest.raises(BlockpruneError, match=expect):
        run_recipe(small_config(tiny_model, out, **kw))
    assert not out.exists()


def test_cli_maps_flags_and_refuses_bad_input(tiny_model, tmp_path):
    from blockprune.frontends.train_cli import add_train_parser, config_from_args

    parser = argparse.ArgumentParser(prog="blockprune")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(RTE), "--out", str(tmp_path / "r"),
        "--ratio", "0.8", "--method", "magnitude", "--lr", "3e-5", "--lr-rew", "1e-4", "--lambda", "1e-3",
        "--layer-lambda", r"attention\.self=1e-5", "--refresh-every-epochs", "0", "--epochs-dense", "0",
        "--prune-mode", "global", "--limit-train", "8", "--seed", "3",
    ])
    cfg = config_from_args(args)
    assert (cfg.ratio, cfg.method, cfg.prune_mode, cfg.seed, cfg.limit_train) == (0.8, "magnitude", "global", 3, 8)
    assert (cfg.lr_dense, cfg.lr_rew, cfg.lr_retrain, cfg.lam) == (3e-5, 1e-4, 3e-5, 1e-3)
    assert cfg.layer_lambdas == [(r"attention\.self", 1e-5)] and cfg.refresh_every_epochs is None
    assert cfg.epochs_dense == 0 and cfg.epochs_rew == 3
    bad = parser.parse_args(["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(RTE),
                             "--out", str(tmp_path / "bad"), "--ratio", "1.5"])
    with pytest.raises(BlockpruneError, match="outside"):
        bad.func(bad)
    assert not (tmp_path / "bad").exists()
