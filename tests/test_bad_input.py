"""Every bad input gets one clear message (problem + fix), exit code 2, and no output file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from blockprune.cli import main
from blockprune.masks import MaskSet, save_masks


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_clean(out_dir, expected=()):
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(expected), "leftover or half-written files"


@pytest.fixture
def model_path(exports):
    return str(exports.path("bert-tiny", "legacy"))


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_path(capsys, out_dir):
    rc, err = _run(capsys, ["prune", str(out_dir / "nope.onnx"), "-o", str(out_dir / "o.onnx")])
    assert rc == 2 and "does not exist" in err and "fix:" in err
    _assert_clean(out_dir)


def test_not_an_onnx_file(capsys, out_dir, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a model\n" * 20)
    rc, err = _run(capsys, ["prune", str(bad), "-o", str(out_dir / "o.onnx")])
    assert rc == 2 and "not a readable ONNX model" in err or "holds no ONNX graph" in err
    _assert_clean(out_dir)


def test_truncated_onnx(capsys, out_dir, tmp_path, model_path):
    data = open(model_path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    rc, err = _run(capsys, ["prune", str(cut), "-o", str(out_dir / "o.onnx")])
    assert rc == 2 and ("truncated" in err) and "fix:" in err
    _assert_clean(out_dir)
    rc, err = _run(capsys, ["inspect", str(cut)])
    assert rc == 2 and "truncated" in err


def test_graph_without_prunable_matmul(capsys, out_dir, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    rc, err = _run(capsys, ["prune", str(path), "-o", str(out_dir / "o.onnx")])
    assert rc == 2 and "no prunable MatMul/Gemm" in err
    _assert_clean(out_dir)
    rc, err = _run(capsys, ["inspect", str(path)])
    assert rc == 2 and "no prunable MatMul/Gemm" in err


def test_unknown_model_or_config_name(capsys, out_dir):
    rc, err = _run(capsys, ["export", "bert-gigantic", "-o", str(out_dir / "m.onnx")])
    assert rc == 2 and "unknown model 'bert-gigantic'" in err and "bert-tiny" in err
    _assert_clean(out_dir)


def test_unknown_architecture():
    from blockprune.errors import BlockpruneError
    from blockprune.models.registry import architecture_for_model_type, get_architecture

    with pytest.raises(BlockpruneError, match="unknown architecture 'gpt2'"):
        get_architecture("gpt2")
    with pytest.raises(BlockpruneError, match="model type 'gpt2' is not supported"):
        architecture_for_model_type("gpt2")


def test_unsupported_local_model_dir(capsys, out_dir, tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    rc, err = _run(capsys, ["export", str(d), "-o", str(out_dir / "m.onnx")])
    assert rc == 2 and "not supported" in err
    _assert_clean(out_dir)


@pytest.mark.parametrize("block,needle", [("0x4", "zero side"), ("4x0", "zero side"),
                                          ("1x4096", "larger than layer"), ("512x1", "larger than layer"),
                                          ("big", "not of the form RxC")])
def test_bad_block_shapes(capsys, out_dir, model_path, block, needle):
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--block", block])
    assert rc == 2 and needle in err and "fix:" in err
    _assert_clean(out_dir)


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5", "half"])
def test_sparsity_outside_range(capsys, out_dir, model_path, sparsity):
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--sparsity", sparsity])
    assert rc == 2 and ("outside [0, 1)" in err or "not a number" in err)
    _assert_clean(out_dir)


def test_sparsity_outside_range_in_config(capsys, out_dir, model_path, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("layers:\n  - match: query\n    sparsity: 1.2\n")
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--config", str(cfg)])
    assert rc == 2 and "layers[0].sparsity 1.2 is outside [0, 1)" in err
    _assert_clean(out_dir)


def test_masks_for_a_different_model(capsys, out_dir, exports, tmp_path, model_path):
    other = str(exports.path("distilbert-tiny", "legacy"))
    masks = tmp_path / "distil.safetensors"
    rc, _ = _run(capsys, ["prune", other, "-o", str(tmp_path / "d.onnx"), "--save-masks", str(masks)])
    assert rc == 0 and masks.is_file()
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--masks", str(masks)])
    assert rc == 2 and "do not match this model" in err and "transformer.layer.0" in err
    _assert_clean(out_dir)


def test_corrupt_and_missing_masks_file(capsys, out_dir, tmp_path, model_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage")
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--masks", str(junk)])
    assert rc == 2 and "not a readable safetensors file" in err
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--masks", str(tmp_path / "no")])
    assert rc == 2 and "does not exist" in err
    _assert_clean(out_dir)


def test_empty_masks_file(capsys, out_dir, tmp_path, model_path):
    empty = tmp_path / "empty.safetensors"
    save_masks(empty, MaskSet({"x": np.ones((1, 1))}))
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--masks", str(empty)])
    assert rc == 2 and "not prunable weights" in err
    _assert_clean(out_dir)


def test_failed_verification_writes_nothing(monkeypatch, capsys, out_dir, model_path):
    """If the rewritten graph disagreed with its reference, nothing may be written."""
    import blockprune.prune_api as api
    from blockprune.passes import verify

    real = verify.masked_reference

    def corrupted_reference(model, masks):
        ref = real(model, {k: np.ones_like(v) for k, v in masks.items()})  # the dense model: must disagree
        return ref

    monkeypatch.setattr(api, "masked_reference", corrupted_reference)
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir / "o.onnx"), "--sparsity", "0.5"])
    assert rc == 2 and "verification failed" in err and "nothing was written" in err
    _assert_clean(out_dir)


def test_output_is_a_directory(capsys, out_dir, model_path):
    rc, err = _run(capsys, ["prune", model_path, "-o", str(out_dir)])
    assert rc == 2 and "is a directory" in err
