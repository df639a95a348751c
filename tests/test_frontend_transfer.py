"""Method ``transfer`` ("prune once, fine-tune per task") with a tiny random BERT: a task-agnostic
embedding run prunes the encoder, then a GLUE run starts its masked retraining from that encoder
and those masks.

What can fail: source tensors not reaching the task model (or overwriting its classifier), the
``bert.`` prefix of a classifier not matched to an encoder checkpoint's names, the masks changing
during retraining or not matching the source's, a source pruned with another block shape or
layer selection accepted, a missing source found only after the out dir was written.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.embedding import EmbeddingConfig, run_embedding
from blockprune.frontends.recipe import run_recipe
from blockprune.frontends.sparse_init import load_sparse_init, resolve_source
from test_frontend_recipe import GLUE, RTE, small_config, tiny_model  # noqa: F401  (fixture)

STSB = GLUE / "STS-B"
pytestmark = pytest.mark.skipif(not (STSB / "dev.tsv").is_file() or not (RTE / "train.tsv").is_file(),
                                reason="real GLUE STS-B / RTE data not found")


@pytest.fixture(scope="module")
def pruned_encoder(tiny_model, tmp_path_factory):
    """A finished embedding-mode run of the tiny model at 4x4, ratio 0.5."""
    tmp = tmp_path_factory.mktemp("transfer-src")
    text = tmp / "s.txt"
    text.write_text("\n".join(f"sentence {i} talks about {w}" for i, w in
                              enumerate(["cats", "rain", "markets", "music"] * 8)) + "\n")
    cfg = EmbeddingConfig(text=str(text), out=str(tmp / "run"), model=str(tiny_model), sts_dir=str(STSB),
                          block="4x4", ratio=0.5, epochs_gradual=1, epochs_retrain=1, lr=1e-3, batch_size=8,
                          limit_eval=20, calib_examples=8, prune_every=1, exporter="legacy", progress=False,
                          threads=2)
    assert run_embedding(cfg).finished
    return tmp / "run"


def _classifier(tiny_model):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(tiny_model), local_files_only=True)


def _layers(model, block="4x4"):
    return {n: BlockShape.parse(block) for n, p in model.named_parameters()
            if p.dim() == 2 and ".encoder.layer." in f".{n}"}


def test_load_sparse_init_copies_encoder_keeps_heads(tiny_model, pruned_encoder):
    model = _classifier(tiny_model)
    head = {n: t.clone() for n, t in model.state_dict().items() if "classifier" in n or "pooler" in n}
    ckpt = resolve_source(pruned_encoder)
    src = load_file(str(ckpt / "model.safetensors"))
    src_masks = load_file(str(ckpt / "block_masks.safetensors"))
    masks, summary = load_sparse_init(model, pruned_encoder, _layers(model))
    own = model.state_dict()
    copied = [n for n in src if not n.startswith("pooler.")]
    assert copied and all(torch.equal(own[f"bert.{n}"], src[n]) for n in copied)  # encoder names under `bert.`
    assert all(torch.equal(own[n], t) for n, t in head.items())  # the task's own heads untouched
    assert set(masks) == {f"bert.{n}" for n in src_masks} and len(masks) == 12
    for name, m in masks.items():
        assert torch.equal(m.mask, src_masks[name.removeprefix("bert.")].bool())
        assert torch.all(own[name][~m.mask] == 0)  # the source's weights were pruned with these masks
    assert summary["rule"] == "transfer" and summary["overall"] == pytest.approx(0.5)
    assert summary["tensors_copied"] == len(copied)


def test_transfer_run_retrains_with_the_source_masks(tiny_model, pruned_encoder, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "run", method="transfer", sparse_init=str(pruned_encoder),
                       block="4x4", epochs_rew=0, epochs_retrain=1, distill=0.5, distill_hidden=1.0)
    res = run_recipe(cfg)
    assert res.finished and res.stages_run == ["dense", "retrain"]
    src_masks = load_file(str(resolve_source(pruned_encoder) / "block_masks.safetensors"))
    final = load_file(str(tmp_path / "run" / "checkpoints" / "retrain" / "model.safetensors"))
    out_masks = load_file(str(tmp_path / "run" / "checkpoints" / "retrain" / "block_masks.safetensors"))
    assert len(out_masks) == 12
    for name, m in src_masks.items():
        assert torch.equal(out_masks[f"bert.{name}"].bool(), m.bool())
        w = final[f"bert.{name}"]
        assert torch.all(w[m == 0] == 0) and torch.count_nonzero(w[m != 0]) > 0.9 * int(m.sum())
    assert res.report["pruned_layers_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert res.report["allocation"]["rule"] == "transfer"
    assert run_recipe(cfg).stages_run == []  # finished: a second call retrains nothing


def test_transfer_bad_input(tiny_model, pruned_encoder, tmp_path):
    import argparse

    from blockprune.frontends.train_cli import add_train_parser, config_from_args

    out = tmp_path / "run"
    parser = argparse.ArgumentParser(prog="blockprune")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--task", "rte", "--data-dir", str(RTE), "--out", str(out), "--method",
                              "transfer", "--sparse-init", str(pruned_encoder), "--block", "4x4"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.sparse_init, cfg.block) == ("transfer", str(pruned_encoder), "4x4")
    with pytest.raises(BlockpruneError, match="no pruned checkpoint"):
        run_recipe(small_config(tiny_model, out, method="transfer", sparse_init=str(tmp_path / "nowhere"),
                                block="4x4"))
    with pytest.raises(BlockpruneError, match="go together"):
        run_recipe(small_config(tiny_model, out, method="transfer", block="4x4"))
    with pytest.raises(BlockpruneError, match="go together"):
        run_recipe(small_config(tiny_model, out, method="gradual", sparse_init=str(pruned_encoder), block="4x4"))
    assert not out.exists()  # refused before anything was written
    model = _classifier(tiny_model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(BlockpruneError, match="whole 16x1 blocks"):  # source pruned at 4x4
        load_sparse_init(model, pruned_encoder, _layers(model, "16x1"))
    broken = tmp_path / "broken"
    shutil.copytree(resolve_source(pruned_encoder), broken)
    masks = load_file(str(broken / "block_masks.safetensors"))
    masks.pop(sorted(masks)[0])
    save_file(masks, str(broken / "block_masks.safetensors"))
    with pytest.raises(BlockpruneError, match="has no mask for"):
        load_sparse_init(model, broken, _layers(model))
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())  # nothing copied on refusal
