"""The CLI flow (export -> prune -> inspect) and the main job on the bundled MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from blockprune.cli import main
from blockprune.onnx_io import get_meta


def test_cli_export_prune_inspect(capsys, tmp_path):
    dense, pruned, masks = tmp_path / "d.onnx", tmp_path / "p.onnx", tmp_path / "m.safetensors"
    assert main(["export", "distilbert-tiny", "-o", str(dense), "--exporter", "legacy", "--head", "classification"]) == 0
    out = capsys.readouterr().out
    assert "check vs PyTorch" in out and "max |diff|" in out
    assert main(["prune", str(dense), "-o", str(pruned), "--block", "1x16", "--sparsity", "0.75",
                 "--save-masks", str(masks)]) == 0
    out = capsys.readouterr().out
    # heads stay dense and count in the paper's CR: (65536 + 4224) / (16384 + 4224)
    assert "3.39x" in out and "verification vs numpy masked reference" in out
    assert main(["inspect", str(pruned), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 14  # 12 encoder Linears + pre_classifier + classifier
    enc = [r for r in report["layers"] if r["role"] not in ("pre_classifier", "classifier")]
    assert all(r["density"] == 0.25 and r["block"] == "1x16" for r in enc)
    assert report["compression_rate"] == pytest.approx(report["total"] / report["nonzero"])
    # the same masks applied to the dense model give the same pruned model, bit for bit
    again = tmp_path / "again.onnx"
    assert main(["prune", str(dense), "-o", str(again), "--masks", str(masks)]) == 0
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(pruned)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(again)).graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["inspect", str(pruned)]) == 0
    text = capsys.readouterr().out
    assert "compression rate (paper's count)" in text and "layer.0.ffn.lin1" in text


def test_inspect_with_block_override(capsys, exports):
    assert main(["inspect", str(exports.path("bert-tiny", "legacy")), "--block", "4x4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    q = report["layers"][0]
    assert q["block"] == "4x4" and q["total_blocks"] == 16 * 16 and q["nonzero_blocks"] == 256
    assert report["compression_rate"] == pytest.approx(1.0)


def test_demo_on_bundled_minilm(minilm_demo):
    s = minilm_demo
    assert s["layers"] == 36
    assert s["compression_rate"] == pytest.approx(2.0)
    assert s["verify_max_abs_diff"] <= 1e-4
    assert s["export_max_abs_diff"] < 1e-4
    # one-shot 50% moves the embeddings a lot but not to random: cosine is a real number in (0, 1)
    assert 0.0 < s["embedding_cosine_min"] <= s["embedding_cosine_mean"] < 1.0
    sizes = s["file_bytes"]
    assert sizes["compressed"] < sizes["pruned"] <= sizes["dense"]
    assert s["compressed_max_abs_diff"] <= 1e-4 and sum(s["compressed_forms"].values()) == 36
    model = onnx.load(s["pruned_model"])
    assert get_meta(model, "source") == "bundled:minilm"
    assert {v["block"] for v in get_meta(model, "layers").values()} == {"1x32"}
    # the demo ends with the compiled model, checked against onnxruntime and timed next to it
    assert s["compile_max_abs_diff"] <= 1e-4
    assert s["ort_dense_ms"] > 0 and s["tvm_ms"] > 0 and s["threads"] == 1
    assert (Path(s["artifact"]) / "model.so").is_file()


def test_embedding_similarity_is_one_for_the_same_model(minilm_demo):
    from blockprune.demo import embedding_similarity
    from blockprune.models.zoo import load_model

    data = open(minilm_demo["dense_model"], "rb").read()
    tok = load_model("minilm").tokenizer()
    sim = embedding_similarity(data, data, tok)
    assert sim.min == pytest.approx(1.0, abs=1e-6)
