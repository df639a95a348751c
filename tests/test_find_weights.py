"""find_weights: the exact prunable layers of each architecture, and the weight forms it must see."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blockprune.models.registry import ROLES
from blockprune.passes.find_weights import find_weights
from tests.conftest import EXPORTERS, TINY


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", TINY)
def test_exact_count_and_roles_encoder(exports, spec, exporter):
    ws = find_weights(onnx.load(str(exports.path(spec, exporter))))
    assert len(ws) == 6 * 2  # six Linears per layer, two layers
    assert sorted((w.layer, w.role) for w in ws) == sorted((i, r) for i in range(2) for r in ROLES)
    by_role = {w.role: w.shape for w in ws if w.layer == 0}
    assert by_role["q"] == by_role["attn_out"] == (64, 64)
    assert by_role["ffn_in"] == (128, 64) and by_role["ffn_out"] == (64, 128)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_heads_found_in_classification_models(exports, exporter):
    for spec, heads in [("bert-tiny", {"pooler", "classifier"})]:
        ws = find_weights(onnx.load(str(exports.path(spec, exporter, head="classification"))))
        assert len(ws) == 12 + 2
        assert {w.role for w in ws if w.layer is None} == heads
        assert [w.shape for w in ws if w.role == "classifier"] == [(2, 64)]


def _linear_graph(kind: str) -> onnx.ModelProto:
    """x[2,8] times a constant weight in one of the three forms the analysis must recognise."""
    rng = np.random.default_rng(0)
    w_out_in = rng.standard_normal((6, 8)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    other = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])
    nodes, inits = [], []
    if kind == "matmul":
        inits.append(numpy_helper.from_array(w_out_in.T.copy(), "W"))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    elif kind == "transpose":
        inits.append(numpy_helper.from_array(w_out_in, "W"))
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t"))
        nodes.append(helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"))
    elif kind == "gemm":
        inits.append(numpy_helper.from_array(w_out_in, "W"))
        nodes.append(helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="gemm"))
    # an activation x activation MatMul (like attention scores): not a weight
    nodes.append(helper.make_node("MatMul", ["x", "xt"], ["z"], name="act"))
    nodes.insert(0, helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="tx"))
    g = helper.make_graph(nodes, "g", [x], [y, other], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w_out_in


@pytest.mark.parametrize("kind,layout", [("matmul", "in_out"), ("transpose", "out_in"), ("gemm", "out_in")])
def test_weight_forms(kind, layout):
    model, w_out_in = _linear_graph(kind)
    ws = find_weights(model)
    assert len(ws) == 1
    w = ws[0]
    assert (w.initializer, w.layout, w.shape) == ("W", layout, (6, 8))
    stored = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(w.to_out_in(stored), w_out_in)
    assert w.hf_name is None and w.role is None


def test_bundled_minilm_has_36_prunable_layers(minilm_demo):
    ws = find_weights(onnx.load(minilm_demo["dense_model"]))
    assert len(ws) == 36
    assert {w.shape for w in ws} == {(384, 384), (1536, 384), (384, 1536)}
    assert all(w.role in ROLES for w in ws)
