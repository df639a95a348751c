"""compress --quantize int8 (issue #15, ONNX side): the contract's numbers, checked in onnxruntime.

Small on purpose: hand-built one-layer graphs for the arithmetic, the session's bert-tiny export
for the workflow. The int8 reference is :mod:`blockprune.quant` (numpy), itself checked against
onnxruntime's DynamicQuantizeLinear and against the contract's formulas written out here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper

from blockprune.blocks import BlockShape, choose_pruned, block_scores, expand_block_mask
from blockprune.compress_api import compress_model
from blockprune.errors import BlockpruneError
from blockprune.onnx_io import get_meta
from blockprune.passes import PruneConfig
from blockprune.passes.block_sparse import BlockSparseRewrite, DensifyBlockSparse
from blockprune.passes.bsr_function import DOMAIN
from blockprune.passes.bsr_int8_function import OP_INT8, NodeSpec, int8_matmul_pattern
from blockprune.passes.int8_reference import exact_int8_model
from blockprune.passes.quant_verify import compare_quantized
from blockprune.passes.quantize import QuantizeInt8
from blockprune.passes.verify import run_model
from blockprune.quant import QuantizedWeight, dynamic_quantize_linear, int8_matmul_reference, quantize_weight

OUT, IN = 32, 48


def _linear_model(w_out_in: np.ndarray, bias: np.ndarray, layout: str = "in_out") -> onnx.ModelProto:
    """``Y = X @ W^T + b`` with X [batch, seq, in]; W stored [in, out] or, via Transpose, [out, in]."""
    nodes, inits = [], [numpy_helper.from_array(bias.astype(np.float32), "lin.bias")]
    if layout == "in_out":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w_out_in.T, dtype=np.float32), "lin.weight"))
        b = "lin.weight"
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w_out_in, dtype=np.float32), "lin.weight"))
        nodes.append(h.make_node("Transpose", ["lin.weight"], ["wt"], perm=[1, 0], name="t"))
        b = "wt"
    nodes += [h.make_node("MatMul", ["X", b], ["mm"], name="mm"), h.make_node("Add", ["mm", "lin.bias"], ["Y"])]
    g = h.make_graph(nodes, "lin", [h.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "s", w_out_in.shape[1]])],
                     [h.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", w_out_in.shape[0]])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


def _block_pruned(rng, block: str, sparsity: float, shape=(OUT, IN)) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    blk = BlockShape.parse(block)
    pruned = choose_pruned(block_scores(w, blk), np.full(blk.grid(shape), blk.rows * blk.cols), sparsity)
    return w * expand_block_mask(~pruned, blk, shape)


def _x(rng, shape=(2, 5, IN)) -> np.ndarray:
    return (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _assert_onnxruntime_int8(y, x, q, bias):
    """onnxruntime's own int8 run: the contract, except where its AVX2 u8s8 kernel saturates a
    pair of neighbouring products in int16 (``passes/int8_reference.py``); nothing else."""
    xq, xs, xz = dynamic_quantize_linear(x)
    a, w = xq.reshape(-1, xq.shape[-1]).astype(np.int64), q.wq.astype(np.int64)
    pairs = (a[:, None, :] * w[None]).reshape(a.shape[0], w.shape[0], -1, 2).sum(-1)
    saturated = np.clip(pairs, -32768, 32767).sum(-1) - int(xz) * w.sum(1)
    exact = (a - int(xz)) @ w.T
    scale = xs * q.w_scale
    y_exact = (exact.astype(np.float32) * scale + bias).reshape(y.shape)
    y_sat = (saturated.astype(np.float32) * scale + bias).reshape(y.shape)
    close = lambda u: np.isclose(y, u, rtol=1e-5, atol=1e-5)  # noqa: E731
    assert np.all(close(y_exact) | close(y_sat))
    assert close(y_exact).mean() > 0.9  # saturation is the exception


# ---- the arithmetic -----------------------------------------------------------------------------

def test_weight_contract():
    w = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.01]], dtype=np.float32)
    q = quantize_weight(w)
    np.testing.assert_allclose(q.w_scale, [1.27 / 127, 1.0, 2.54 / 127], rtol=1e-6)
    assert q.wq.dtype == np.int8 and q.w_scale.dtype == np.float32
    assert q.wq[0].tolist() == [50, -127, 0] and q.wq[1].tolist() == [0, 0, 0] and q.wq[2].tolist() == [127, 50, 0]
    big = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    qb = quantize_weight(big)
    assert np.abs(qb.wq).max() == 127 and (np.abs(qb.wq).max(axis=1) == 127).all()  # every row uses the range
    assert np.all(np.abs(qb.dequantize() - big) <= qb.w_scale[:, None] / 2 + 1e-7)


def test_dynamic_quantize_matches_onnxruntime():
    g = h.make_graph([h.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "z"])], "dq",
                     [h.make_tensor_value_info("X", TensorProto.FLOAT, [None, None])],
                     [h.make_tensor_value_info("q", TensorProto.UINT8, [None, None]),
                      h.make_tensor_value_info("s", TensorProto.FLOAT, []),
                      h.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    rng = np.random.default_rng(1)
    for x in (_x(rng, (7, 33)), np.abs(_x(rng, (3, 5))), -np.abs(_x(rng, (4, 4))) - 1):
        q, s, z = run_model(model, {"X": x})
        rq, rs, rz = dynamic_quantize_linear(x)
        assert np.float32(s) == rs and np.uint8(z) == rz
        assert np.array_equal(q, rq)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_dense_int8_matches_the_contract(layout):
    rng = np.random.default_rng(2)
    w, b = _block_pruned(rng, "1x4", 0.5), rng.standard_normal(OUT).astype(np.float32)
    w[3] = 0.0  # a zero row: scale 1.0, output exactly the bias
    model = _linear_model(w, b, layout)
    q, report = QuantizeInt8().run(model)
    assert report.changed == 1
    assert sorted(n.op_type for n in q.graph.node) == ["Add", "Cast", "DynamicQuantizeLinear", "MatMulInteger",
                                                         "Mul", "Mul"]
    wq, ws = _init(q, "lin.weight.int8"), _init(q, "lin.weight.w_scale")
    expect = quantize_weight(w)
    assert wq.dtype == np.int8 and wq.shape == (IN, OUT) and np.array_equal(wq, expect.wq.T)
    assert ws.dtype == np.float32 and np.array_equal(ws, expect.w_scale) and ws[3] == 1.0
    x = _x(rng)
    y, exact = run_model(q, {"X": x})[0], run_model(exact_int8_model(q), {"X": x})[0]
    # the contract written out, independently of blockprune.quant's product
    xq, xs, xz = dynamic_quantize_linear(x)
    acc = (xq.astype(np.int64) - int(xz)) @ expect.wq.T.astype(np.int64)
    manual = acc.astype(np.float32) * (xs * expect.w_scale) + b
    np.testing.assert_allclose(exact, manual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact, int8_matmul_reference(x, expect) + b, rtol=1e-5, atol=1e-5)
    _assert_onnxruntime_int8(y, x, expect, b)
    np.testing.assert_array_equal(y[..., 3], np.broadcast_to(b[3], y.shape[:-1]))
    # and it is a quantization of the float layer, not something else
    ref = x @ w.T + b
    assert np.linalg.norm(exact - ref) / np.linalg.norm(ref) < 0.01
    meta = get_meta(q, "layers")["lin.weight"]
    assert meta["quant"] == "int8" and meta["quant_op"] == "MatMulInteger"
    assert get_meta(q, "quantization")["layers_int8"] == 1


@pytest.mark.parametrize("block", ["1x4", "4x4", "16x4"])
def test_block_sparse_int8_equals_dense_int8(block):
    rng = np.random.default_rng(3)
    w, b = _block_pruned(rng, block, 0.6), rng.standard_normal(OUT).astype(np.float32)
    model = _linear_model(w, b)
    bsr, rep = BlockSparseRewrite(block=block).run(model)
    assert rep.changed == 1
    q_bsr, _ = QuantizeInt8().run(bsr)
    q_dense, _ = QuantizeInt8().run(model)
    node = next(n for n in q_bsr.graph.node if n.op_type == OP_INT8)
    assert node.domain == DOMAIN and len(node.input) == 5
    attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
    blk = BlockShape.parse(block)
    assert list(attrs["blocksize"]) == [blk.rows, blk.cols]
    assert list(attrs["dense_shape"]) == [OUT, IN]
    values, scale = _init(q_bsr, node.input[1]), _init(q_bsr, node.input[4])
    assert values.dtype == np.int8 and _init(q_bsr, node.input[2]).dtype == np.int32
    assert np.array_equal(scale, quantize_weight(w).w_scale)
    # the int8 values are the dense quantization's Wq at the kept blocks
    r, c = blk.rows, blk.cols
    indptr, indices = _init(q_bsr, node.input[3]), _init(q_bsr, node.input[2])
    rebuilt = np.zeros((OUT, IN), np.int8)
    for rb in range(OUT // r):
        for k in range(indptr[rb], indptr[rb + 1]):
            rebuilt[rb * r:(rb + 1) * r, indices[k] * c:(indices[k] + 1) * c] = values[k]
    assert np.array_equal(rebuilt, quantize_weight(w).wq)
    # onnxruntime runs the function body as shipped; same numbers as the dense int8 layer
    assert [f.name for f in q_bsr.functions] == [OP_INT8]  # the float32 definition has no user left
    fn = q_bsr.functions[0]
    assert fn.domain == DOMAIN and all(n.domain == "" and onnx.defs.has(n.op_type) for n in fn.node)
    x = _x(rng, (3, 4, IN))
    y_bsr, y_dense = run_model(q_bsr, {"X": x})[0], run_model(q_dense, {"X": x})[0]
    np.testing.assert_array_equal(y_bsr, y_dense)  # same rebuilt weight, same kernel
    _assert_onnxruntime_int8(y_bsr, x, quantize_weight(w), b)
    kept, _ = DensifyBlockSparse().run(q_bsr)  # densify leaves int8 layers (and their definition) alone
    np.testing.assert_array_equal(run_model(kept, {"X": x})[0], y_bsr)
    exact = run_model(exact_int8_model(q_bsr), {"X": x})[0]  # the function body rewritten too
    np.testing.assert_allclose(exact, int8_matmul_reference(x, quantize_weight(w)) + b, rtol=1e-5, atol=1e-5)


# ---- the workflow ------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["1x4", "4x4", "16x4"])
def test_compress_int8_on_bert_tiny(exports, block):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    res = compress_model(model, prune=PruneConfig(block=block, sparsity=0.7), break_even=0.6, quantize="int8")
    assert [s.name for s in res.stages] == ["prune", "reorder", "compact", "policy", "block-sparse", "quantize-int8"]
    q = res.stages[-1].quality
    assert q["min_sentence_cosine"] >= 0.98 and q["max_rel_error"] <= 0.35
    ops = [n.op_type for n in res.model.graph.node]
    assert "MatMul" in ops  # attention scores/context stay float
    assert ops.count(OP_INT8) >= 8 and "BlockSparseMatMul" not in ops
    assert all(r.form.endswith("+int8") for r in res.stats.layers) and len(res.stats.layers) == 12
    assert res.stats.compression_rate >= 1 / 0.3 - 0.05  # quantization does not change the count
    layers = get_meta(res.model, "layers")
    assert all(v["quant"] == "int8" for v in layers.values())
    assert get_meta(res.model, "quantization")["verified"]["min_sentence_cosine"] == q["min_sentence_cosine"]


def test_compress_int8_dense_model(exports):
    model = onnx.load(str(exports.path("bert-tiny", "dynamo")))
    res = compress_model(model, break_even=0.6, quantize="int8")
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMulInteger") == 12
    assert ops.count("DynamicQuantizeLinear") == 8  # q, k and v share their input's quantization
    assert not any(n.domain == DOMAIN for n in res.model.graph.node)
    assert {r.form for r in res.stats.layers} == {"dense+int8"}


@pytest.mark.parametrize("include_heads", [False, True])
def test_heads_follow_the_pruning_rule(exports, include_heads):
    model = onnx.load(str(exports.path("bert-tiny", "legacy", head="classification")))
    res = compress_model(model, prune=PruneConfig(block="1x4", sparsity=0.5, include_heads=include_heads),
                         break_even=0.6, quantize="int8")
    assert res.stages[-1].quality["min_sentence_cosine"] is None  # 2 logits: relative error only
    assert res.stages[-1].quality["max_rel_error"] <= 0.35
    layers = get_meta(res.model, "layers")
    heads = {k: v for k, v in layers.items() if "pooler" in k or "classifier" in k}
    assert len(heads) == 2
    if include_heads:
        assert all(v["quant"] == "int8" for v in heads.values())
        assert not [n for n in res.model.graph.node if n.op_type == "Gemm"]
    else:
        assert all(v["quant"] == "float32" and "head" in v["quant_reason"] for v in heads.values())
    assert sum(v["quant"] == "int8" for v in layers.values()) == 12 + 2 * include_heads


def _transposed_square(w):  # a plausible bug: W[in, out] read as W[out, in] where the shapes allow it
    q = quantize_weight(w)
    return QuantizedWeight(q.wq.T.copy(), q.w_scale) if w.shape[0] == w.shape[1] else q


def _no_zero_point(*args, **kw):  # another: MatMulInteger without the activation zero point
    return [NodeSpec(s.op, s.inputs[:2], s.outputs, s.attrs) if s.op == "MatMulInteger" else s
            for s in int8_matmul_pattern(*args, **kw)]


@pytest.mark.parametrize("bug", ["transposed", "no-zero-point"])
def test_verification_refuses_a_wrong_quantization(exports, monkeypatch, tmp_path, bug):
    from blockprune.cli import main
    from blockprune.passes import quantize as qpass

    src = exports.path("bert-tiny", "legacy")
    if bug == "transposed":
        monkeypatch.setattr(qpass, "quantize_weight", _transposed_square)
    else:
        monkeypatch.setattr(qpass, "int8_matmul_pattern", _no_zero_point)
    with pytest.raises(BlockpruneError, match="too far from its float32 reference"):
        compress_model(onnx.load(str(src)), break_even=0.6, quantize="int8")
    out = tmp_path / "int8.onnx"
    assert main(["compress", str(src), "-o", str(out), "--quantize", "int8", "--break-even", "0.6"]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left behind
    monkeypatch.undo()
    assert main(["compress", str(src), "-o", str(out), "--quantize", "int8", "--break-even", "0.6"]) == 0
    assert list(tmp_path.iterdir()) == [out]
    written = onnx.load(str(out))
    assert get_meta(written, "quantization")["scheme"] == "int8"


def test_quant_verify_bounds():
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((OUT, IN)).astype(np.float32), np.zeros(OUT, np.float32)
    model = _linear_model(w, b)
    q = exact_int8_model(QuantizeInt8().run(model)[0])  # N(0, 1) inputs: no AVX2 saturation noise
    res = compare_quantized(q, model)
    assert res.ok and 0.99 < res.min_cosine <= 1.0 and 0 < res.max_rel_error < 0.05
    twice = _linear_model(2 * w, b)  # right direction, wrong size: only the relative error sees it
    with pytest.raises(BlockpruneError, match="relative error"):
        compare_quantized(q, twice)


def test_bad_input():
    rng = np.random.default_rng(5)
    model = _linear_model(rng.standard_normal((OUT, IN)).astype(np.float32), np.zeros(OUT, np.float32))
    with pytest.raises(BlockpruneError, match="unknown quantization"):
        compress_model(model, break_even=0.6, quantize="int4")
    q, _ = QuantizeInt8().run(model)
    with pytest.raises(BlockpruneError, match="already quantized"):
        QuantizeInt8().run(q)
    with pytest.raises(BlockpruneError, match="already quantized"):
        compress_model(q, break_even=0.6)
    with pytest.raises(SystemExit):
        from blockprune.cli import main

        main(["compress", "m.onnx", "-o", "o.onnx", "--quantize", "int4"])


@pytest.mark.parametrize("block", ["1x4", "4x4", "16x4", "8x4"])
def test_int8_friendly_blocks_are_accepted_and_detected(block):
    from blockprune.passes.detect_blocks import detect_block
    from blockprune.passes.prune_config import PruneConfig as Cfg

    rng = np.random.default_rng(6)
    w = _block_pruned(rng, block, 0.5, shape=(64, 96))
    assert str(detect_block(w).block) == block  # a model pruned elsewhere gets its block back
    cfg = Cfg.from_dict({"block": block, "sparsity": 0.5, "layers": [{"match": "query", "block": block}]})
    assert str(cfg.resolve("encoder.layer.0.attention.self.query.weight").block) == block


def test_python_api(exports, tmp_path):
    import blockprune as bp

    res = bp.compress(exports.path("bert-tiny", "legacy"), tmp_path / "small.onnx", sparsity=0.5, block="16x4",
                      break_even=0.6, quantize="int8")
    assert res.output == tmp_path / "small.onnx" and res.stages[-1].name == "quantize-int8"
    written = onnx.load(str(res.output))
    assert any(n.op_type == OP_INT8 for n in written.graph.node)
    assert get_meta(written, "quantization")["verified"]["min_sentence_cosine"] >= 0.98
    fp32 = bp.compress(exports.path("bert-tiny", "legacy"), tmp_path / "fp32.onnx", sparsity=0.5, block="16x4",
                       break_even=0.6)
    values = [t for t in written.graph.initializer if t.name.endswith(".bsr_values_int8")]
    assert values and all(t.data_type == TensorProto.INT8 for t in values)
    kept = sum(int(np.prod(t.dims)) for t in values)  # each kept value: 4 bytes -> 1 byte (+ 4 per scale)
    assert fp32.output_bytes - res.output_bytes > 2.5 * kept
