"""The task-agnostic embedding mode end to end with a tiny random BERT: sentences extracted from
GLUE train files, gradual pruning while distilling the dense embeddings, zero-shot STS-B score,
the same outputs as a GLUE run, resumption, and bad input refused before anything is written.

What can fail: the extractor leaking dev sentences or duplicates, the masks missing the target
or not matching the saved weights, the ONNX export not carrying the masked zeros, a finished
run being retrained on a second call, the CLI not reaching this mode.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from blockprune.errors import BlockpruneError
from blockprune.frontends.embedding import (
    EmbeddingConfig,
    extract_glue_sentences,
    mean_pool,
    read_sentences,
    relation_mse,
    run_embedding,
)
from test_frontend_recipe import GLUE, tiny_model  # noqa: F401  (fixture)

STSB = GLUE / "STS-B"
pytestmark = pytest.mark.skipif(not (STSB / "dev.tsv").is_file(), reason="real GLUE STS-B data not found")


def test_extract_sentences_dedupes_and_reads_train_only(tmp_path):
    root = tmp_path / "glue"
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na fine film\t1\ndull\t0\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nDEV ONLY\t1\n")
    (root / "RTE").mkdir()
    (root / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tdull\tA cat sat.\tentailment\n")
    path, counts = extract_glue_sentences(root, tmp_path / "runs" / "s.txt")
    got = read_sentences(path)
    assert sorted(got) == ["A cat sat.", "a fine film", "dull"] and counts == {"SST-2": 2, "RTE": 1}
    with pytest.raises(BlockpruneError, match="no GLUE train"):
        extract_glue_sentences(tmp_path / "runs", tmp_path / "x.txt")


def test_mean_pool_ignores_padding_and_normalises():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])
    e = mean_pool(h, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(e, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_relation_term_is_blind_to_a_shared_rotation_and_sees_a_moved_sentence():
    """A shared rotation keeps every pair's cosine (relation term 0) though each embedding moved;
    moving one sentence towards another changes the pair structure (relation term > 0)."""
    g = torch.Generator().manual_seed(0)
    et = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert float(relation_mse(et, et)) == 0.0
    rotated = et @ q
    assert float(relation_mse(rotated, et)) < 1e-10 < float((1 - (rotated * et).sum(-1)).mean())
    moved = et.clone()
    moved[0] = torch.nn.functional.normalize(et[0] + et[1], dim=0)
    assert float(relation_mse(moved, et)) > 1e-3
    assert float(relation_mse(et[:1], et[:1])) == 0.0  # one sentence: no pair
    grad_in = moved.clone().requires_grad_(True)
    relation_mse(grad_in, et).backward()
    assert grad_in.grad[0].abs().sum() > 0


def test_relation_weight_is_validated_and_fingerprinted_only_when_used():
    base = EmbeddingConfig(text="x", out="y")
    assert "relation_weight" not in base.fingerprint()  # runs from before the term resume unchanged
    assert EmbeddingConfig(text="x", out="y", relation_weight=2.0).fingerprint()["relation_weight"] == 2.0
    with pytest.raises(BlockpruneError, match="relation_weight"):
        EmbeddingConfig(text="x", out="y", relation_weight=-1.0).validate()
    EmbeddingConfig(text="x", out="y", cosine_weight=0, hidden_weight=0, relation_weight=1.0).validate()


def test_embedding_run_outputs_and_resume(tiny_model, tmp_path):
    from blockprune.masks import load_masks
    from blockprune.onnx_io import load_onnx
    from onnx import numpy_helper

    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"sentence number {i} is about {w}" for i, w in
                              enumerate(["cats", "dogs", "rain", "markets", "music", "code"] * 8)) + "\n")
    cfg = EmbeddingConfig(text=str(text), out=str(tmp_path / "run"), model=str(tiny_model), sts_dir=str(STSB),
                          block="4x4", ratio=0.5, epochs_gradual=2, epochs_retrain=1, lr=1e-3, batch_size=8,
                          limit_eval=40, calib_examples=16, prune_every=1, exporter="legacy", progress=False,
                          threads=2)
    res = run_embedding(cfg)
    rep = res.report
    assert res.finished and rep["mode"] == "embedding" and rep["metric"] == "stsb_spearman_zero_shot"
    assert -1 <= rep["pruned_metric"] <= 1 and rep["sts_pairs"] == 40 and rep["training_sentences"] == 48
    assert rep["pruned_layers_sparsity"] == pytest.approx(0.5, abs=1e-9)
    grad = {s["stage"]: s for s in rep["stages"]}["gradual"]
    assert grad["history"][-1]["sparsity"] == pytest.approx(0.5, abs=1e-9)
    maskset = load_masks(res.masks_path)
    assert maskset.source == "gradual-embedding-distillation" and maskset.extra["mode"] == "embedding"
    inits = {t.name: numpy_helper.to_array(t) for t in load_onnx(res.onnx_path).graph.initializer}
    assert len(maskset.masks) == 12
    for name, m in maskset.masks.items():
        assert np.all(inits[name][m == 0] == 0) and 0 < m.mean() < 1
    # the rate counts what the ONNX ships: the weight operands of its MatMul/Gemm nodes (the
    # model has a pooler, but the embedding graph outputs token states and leaves it out)
    graph = load_onnx(res.onnx_path).graph
    shipped = {i for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input[1:2] if i in inits}
    from safetensors.numpy import load_file

    assert any("pooler" in k for k in load_file(res.model_dir / "model.safetensors"))
    assert not any("pooler" in n for n in rep["layers"])
    assert rep["counted_weights"]["total"] == sum(inits[i].size for i in shipped)
    assert rep["counted_weights"]["nonzero"] == sum(int(np.count_nonzero(inits[i])) for i in shipped)
    assert rep["compression_rate"] == pytest.approx(2.0, rel=1e-9)
    again = run_embedding(cfg)
    assert again.stages_run == [] and again.stages_skipped == ["gradual", "retrain"]
    assert json.loads((res.out / "state.json").read_text())["stages"]["retrain"]["eval"]["score"] == rep["pruned_metric"]


def test_embedding_cli_and_bad_input(tiny_model, tmp_path):
    from blockprune.frontends.train_cli import add_train_parser

    parser = argparse.ArgumentParser(prog="blockprune")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--mode", "embedding", "--out", str(tmp_path / "r"), "--model", str(tiny_model)])
    with pytest.raises(BlockpruneError, match="--text"):
        args.func(args)
    (tmp_path / "empty.txt").write_text("\n\n")
    args = parser.parse_args(["train", "--mode", "embedding", "--out", str(tmp_path / "r"), "--text",
                              str(tmp_path / "empty.txt"), "--data-dir", str(GLUE)])
    with pytest.raises(BlockpruneError, match="no sentences"):
        args.func(args)
    with pytest.raises(BlockpruneError, match="distillation weight"):
        EmbeddingConfig(text="x", out="y", cosine_weight=0, hidden_weight=0).validate()
    assert not (tmp_path / "r").exists()
