"""Epilogue fusion: the BSR kernel applies bias, GELU and the residual add on its way out.

Checked at three levels: the kernel against numpy (both layouts, with and without K slices);
the ONNX matcher on every spelling of GELU we meet (and not on look-alikes); and whole tiny
models, whose compiled outputs must match onnxruntime while the manifest shows what was fused.
Also the Compact pass keeps FFN widths a multiple of the block, so compacted layers stay BSR.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as h

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.kernels import bsr_kernel as bk  # noqa: E402
from blockprune.backends.tvm.onnx_import.epilogue import GraphIndex, absorb_epilogue  # noqa: E402
from blockprune.blocks import BlockShape  # noqa: E402
from blockprune.bsr import dense_to_bsr  # noqa: E402

_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def test_erf_approximation_is_accurate_and_exact_in_the_tails():
    x = np.linspace(-8, 8, 40001).astype(np.float32)
    got = bk.erf_approx_np(x)
    assert np.abs(got - _erf(x.astype(np.float64))).max() < 5e-7
    assert np.all(got[x >= bk.ERF_ONE_BEYOND] == 1.0) and np.all(got[x <= -bk.ERF_ONE_BEYOND] == -1.0)
    # GELU of large negatives must be ~0, not x/2 times the erf error (it would add up over neurons)
    neg = np.linspace(-30, -6, 1000).astype(np.float32)
    assert np.abs(neg * 0.5 * (1 + bk.erf_approx_np(neg / np.float32(math.sqrt(2))))).max() < 1e-6


@pytest.mark.parametrize("block,k", [("16x1", 64), ("16x1", 3072), ("1x32", 96), ("4x4", 64)])
@pytest.mark.parametrize("gelu,residual", [(True, False), (False, True), (True, True)])
def test_kernel_epilogue_matches_numpy(block, k, gelu, residual):
    rng = np.random.default_rng(0)
    b, n = BlockShape.parse(block), 32
    w = rng.standard_normal((n, k)).astype(np.float32) * (2.0 / math.sqrt(k))
    keep = rng.random((n // b.rows, k // b.cols)) < 0.4
    w *= np.kron(keep, np.ones((b.rows, b.cols))).astype(np.float32)
    x = rng.standard_normal((1, 13, k)).astype(np.float32) * 2
    bias = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((1, 13, n)).astype(np.float32)
    kern = bk.build_bsr_kernel(x.shape, n, b, bias=True, gelu=gelu, residual=residual)
    got = kern(x, dense_to_bsr(w, b), bias, r if residual else None)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    ref = _gelu(ref) if gelu else ref
    ref = ref + r if residual else ref
    assert np.abs(got - ref).max() < 2e-5
    if k == 3072 and block == "16x1":
        assert kern.schedule.k_chunk, "the long-K case must exercise the K-sliced epilogue"


def _linear_graph(tail: str) -> onnx.ModelProto:
    """X -> MatMul(W) -> Add(b) -> <tail>, with tail one of the GELU spellings or a look-alike."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    consts = [w, b]
    nodes = [h.make_node("MatMul", ["X", "W"], ["y"], name="mm"), h.make_node("Add", ["y", "b"], ["hb"], name="bias")]

    def c(name, v):
        consts.append(numpy_helper.from_array(np.array(v, np.float32), name))
        return name

    if tail == "erf-div":  # the dynamo / HF spelling
        nodes += [h.make_node("Div", ["hb", c("s2", math.sqrt(2))], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                  h.make_node("Add", ["e", c("one", 1.0)], ["e1"]), h.make_node("Mul", ["hb", "e1"], ["m"]),
                  h.make_node("Mul", ["m", c("half", 0.5)], ["out"])]
    elif tail == "half-first":
        nodes += [h.make_node("Mul", ["hb", c("half", 0.5)], ["hh"]),
                  h.make_node("Mul", ["hb", c("is2", 1 / math.sqrt(2))], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                  h.make_node("Add", [c("one", 1.0), "e"], ["e1"]), h.make_node("Mul", ["hh", "e1"], ["out"])]
    elif tail == "gelu-op":
        nodes += [h.make_node("Gelu", ["hb"], ["out"])]
    elif tail == "tanh-gelu":  # a look-alike that must not be fused as erf GELU
        nodes += [h.make_node("Gelu", ["hb"], ["out"], approximate="tanh")]
    elif tail == "sigmoid-ish":  # x * (0.5 + 0.5*erf(x)): erf without the 1/sqrt2
        nodes += [h.make_node("Erf", ["hb"], ["e"]), h.make_node("Add", ["e", c("one", 1.0)], ["e1"]),
                  h.make_node("Mul", ["hb", "e1"], ["m"]), h.make_node("Mul", ["m", c("half", 0.5)], ["out"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
                         [h.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=consts)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])


@pytest.mark.parametrize("tail,fused", [("erf-div", True), ("half-first", True), ("gelu-op", True),
                                        ("tanh-gelu", False), ("sigmoid-ish", False)])
def test_gelu_is_recognised_by_what_it_computes(tail, fused):
    model = _linear_graph(tail)
    mm = model.graph.node[0]
    ep, removed = absorb_epilogue(GraphIndex(model.graph), mm, 16)
    assert ep.bias is not None and ep.gelu is fused
    if fused:
        assert mm.output[0] == "out" and len(removed) == len(model.graph.node) - 1
    else:
        assert mm.output[0] == "hb" and len(removed) == 1


def test_bias_shared_with_another_consumer_is_not_fused():
    model = _linear_graph("erf-div")
    model.graph.node.append(h.make_node("Identity", ["y"], ["y2"]))  # y now has two consumers
    ep, removed = absorb_epilogue(GraphIndex(model.graph), model.graph.node[0], 16)
    assert ep.empty and removed == []


@pytest.fixture(scope="module")
def bsr_tiny(exports):
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    dense = exports("bert-tiny", "dynamo", "encoder")[1].model
    return compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.8), form="bsr", verify=False).model


def test_model_with_fused_epilogues_matches_onnxruntime(bsr_tiny, tmp_path):
    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact

    res = compile_model(bsr_tiny, tmp_path / "a", batch=2, seq=16, verify=False)
    epilogues = {layer["name"].split(".")[-2] + "." + layer["name"].split(".")[-3]: layer.get("epilogue")
                 for layer in res.manifest.layers if layer["form"] == "bsr"}
    kinds = set(epilogues.values())
    assert "bias+gelu" in kinds, epilogues  # FFN in
    assert "bias+residual" in kinds, epilogues  # FFN out and attention output
    assert "bias" in kinds, epilogues  # q, k, v (followed by a reshape)
    out = run_artifact(tmp_path / "a")
    diffs = compare_with_onnx(out, bsr_tiny)
    assert max(diffs.values()) < 1e-4, diffs


def test_compact_removes_only_whole_blocks_of_neurons(exports):
    """Compaction never adds nonzero blocks, and compacted widths stay a multiple of the block."""
    import json

    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig
    from blockprune.passes.compact import aligned_groups
    from blockprune.prune_api import prune_model

    dead = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
    assert aligned_groups(dead, 4).tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert aligned_groups(dead, 1).tolist() == dead.tolist()
    dense = exports("bert-tiny", "legacy", "encoder")[1].model
    for block in ("16x1", "1x32"):
        pruned = prune_model(dense, PruneConfig(block=block, sparsity=0.8))
        before = {s.initializer: s.nonzero_blocks for s in pruned.stats.layers}
        res = compress_model(pruned.model, form="compact", verify=True, reorder=False)
        after = {s.initializer: s.nonzero_blocks for s in res.stats.layers}
        assert all(after[k] <= before[k] for k in before), (block, before, after)
        layers = json.loads({p.key: p.value for p in res.model.metadata_props}["blockprune.layers"])
        b = BlockShape.parse(block)
        for name, info in layers.items():
            if info.get("compacted") and "intermediate" in name:
                assert info["compacted"][1][0] % b.rows == 0, (name, info)
            if info.get("compacted") and "output.dense" in name and "attention" not in name:
                assert info["compacted"][1][1] % b.cols == 0, (name, info)


def _skip_graph(broadcast: bool) -> onnx.ModelProto:
    """X -> MatMul(W, 80% zero 16x1 blocks) -> Add(b) -> Add(r): the skip tensor ``r`` is made
    *after* the matmul in node order (an exporter may do so), full-shape or broadcasting."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 32)).astype(np.float32)  # [in, out] -> W^T [32, 16]
    keep = rng.random((32 // 16, 16)) < 0.3
    w *= np.repeat(keep, 16, axis=0).T
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
             numpy_helper.from_array(np.float32(2.0), "two")]
    nodes = [h.make_node("MatMul", ["X", "W"], ["y"], name="mm"), h.make_node("Add", ["y", "b"], ["yb"], name="bias"),
             h.make_node("Mul", ["R", "two"], ["r"], name="late_skip"),
             h.make_node("Add", ["yb", "r"], ["out"], name="residual")]
    r_shape = [1, 32] if broadcast else [4, 32]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", TensorProto.FLOAT, [4, 16]),
                                      h.make_tensor_value_info("R", TensorProto.FLOAT, r_shape)],
                         [h.make_tensor_value_info("out", TensorProto.FLOAT, [4, 32])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("broadcast", [False, True])
def test_kernel_converter_fuses_a_late_skip_and_falls_back_on_broadcast(broadcast, tmp_path):
    """The layer reaches TVM as our op (no dense matmul left), its converter is registered only
    during the import, and a residual made later in node order or broadcasting stays correct."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    from blockprune.backends.tvm.onnx_import.importer import KERNEL_OP, import_onnx
    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact

    model = _skip_graph(broadcast)
    imported = import_onnx(model, batch=4, seq=1, lower_dense_below=0.5, dense_block="16x1")
    assert KERNEL_OP not in fe._get_convert_map()
    text = imported.mod.script()
    assert "call_tir" in text and "R.matmul" not in text
    (layer,) = imported.layers
    assert layer.form == "bsr" and layer.epilogue == ("bias" if broadcast else "bias+residual")
    compile_model(model, tmp_path / "a", batch=4, seq=1, lower_dense_below=0.5, dense_block="16x1", verify=False)
    diffs = compare_with_onnx(run_artifact(tmp_path / "a"), model)
    assert max(diffs.values()) < 1e-4, diffs
