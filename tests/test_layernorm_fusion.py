"""Spelled-out LayerNorms (plain torch.onnx exports below opset 17) become one node for TVM.

Each spelling is built as a small graph, fused, and both graphs are run in onnxruntime: the
fused graph must compute the same values, and look-alikes must be left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from blockprune.backends.tvm.onnx_import.layernorm_fusion import fuse_layer_norms

C = 24


def _graph(square="pow", divide="div", affine=True, axis=-1, axes_input=False, leak=False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1e-12), "eps"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "beta")]
    opset = 18 if axes_input else 17

    def mean(src, dst):
        if axes_input:
            if "axes" not in {t.name for t in inits}:
                inits.append(numpy_helper.from_array(np.array([axis], np.int64), "axes"))
            return h.make_node("ReduceMean", [src, "axes"], [dst])
        return h.make_node("ReduceMean", [src], [dst], axes=[axis])

    nodes = [mean("X", "mu"), h.make_node("Sub", ["X", "mu"], ["d"])]
    nodes.append(h.make_node("Pow", ["d", "two"], ["d2"]) if square == "pow" else h.make_node("Mul", ["d", "d"], ["d2"]))
    nodes += [mean("d2", "var"), h.make_node("Add", ["var", "eps"], ["ve"]), h.make_node("Sqrt", ["ve"], ["s"])]
    if divide == "div":
        nodes.append(h.make_node("Div", ["d", "s"], ["n"]))
    else:
        nodes += [h.make_node("Reciprocal", ["s"], ["rs"]), h.make_node("Mul", ["rs", "d"], ["n"])]
    out = "n"
    if affine:
        nodes += [h.make_node("Mul", ["n", "gamma"], ["ng"]), h.make_node("Add", ["beta", "ng"], ["Y"])]
        out = "Y"
    outputs = [h.make_tensor_value_info(out, TensorProto.FLOAT, [2, 5, C])]
    if leak:  # the centred tensor is also used outside the LayerNorm
        nodes.append(h.make_node("Identity", ["d"], ["d_out"]))
        outputs.append(h.make_tensor_value_info("d_out", TensorProto.FLOAT, [2, 5, C]))
    graph = h.make_graph(nodes, "ln", [h.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5, C])], outputs,
                         initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})


def _shapes(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}


@pytest.mark.parametrize("kw", [{}, {"square": "mul"}, {"divide": "reciprocal"}, {"affine": False},
                                {"axes_input": True}, {"axis": 2}])
def test_spelled_out_layernorm_is_fused_and_computes_the_same(kw):
    model = _graph(**kw)
    x = (np.random.default_rng(1).standard_normal((2, 5, C)) * 3 + 1).astype(np.float32)
    ref = _run(model, x)[0]
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_layer_norms(fused, _shapes(model)) == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["LayerNormalization"], ops
    got = _run(fused, x)[0]
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("kw", [{"axis": 1}, {"leak": True}])
def test_look_alikes_are_left_alone(kw):
    model = _graph(**kw)
    before = [n.op_type for n in model.graph.node]
    assert fuse_layer_norms(model, _shapes(model)) == 0
    assert [n.op_type for n in model.graph.node] == before
