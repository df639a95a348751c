"""Issue #13, any ONNX in: the graphs users actually have go through prune -> compress -> compile -> run.

Routes (``blockprune.models.foreign``): blockprune's own exports, plain ``torch.onnx.export``
(legacy opset 14, dynamo) without our metadata, and onnxruntime's transformer-optimized graph.
Bad inputs each get one ``BlockpruneError`` (exit 2, a fix) and leave no output behind.
Sizes are tiny (hidden 64, 2 layers) and seq 16 so the whole file stays around two minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import blockprune as bp
from blockprune.cli import main
from blockprune.errors import BlockpruneError
from blockprune.models.registry import ROLES

SEQ = 16


class _Routes:
    """Export each (model, route, head) once per session."""

    def __init__(self, root: Path) -> None:
        self.root, self.cache, self.loaded = root, {}, {}

    def load(self, spec: str, head: str = "encoder"):
        from blockprune.models.zoo import load_model

        if (spec, head) not in self.loaded:
            self.loaded[(spec, head)] = load_model(spec, head=head)
        return self.loaded[(spec, head)]

    def __call__(self, spec: str, route: str, head: str = "encoder") -> Path:
        from blockprune.models.foreign import export_route

        key = (spec, route, head)
        if key not in self.cache:
            self.cache[key] = export_route(self.load(spec, head), route, self.root / f"{spec}-{route}-{head}.onnx")
        return self.cache[key]


@pytest.fixture(scope="session")
def routes(tmp_path_factory) -> _Routes:
    return _Routes(tmp_path_factory.mktemp("routes"))


def _ort_optimizer_available() -> bool:
    try:
        from onnxruntime.transformers.optimizer import optimize_model  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ------------------------------------------------------------------------------------------------
# the whole flow, per route
# ------------------------------------------------------------------------------------------------
def test_whole_flow_through_the_python_api(tmp_path):
    """export -> prune -> compress -> compile -> run -> bench, only through ``blockprune.*``."""
    exp = bp.export("bert-tiny", tmp_path / "model.onnx", exporter="legacy")
    assert exp.path.is_file() and max(exp.max_abs_diff.values()) <= 1e-4
    pr = bp.prune(exp.path, tmp_path / "pruned.onnx", block="1x32", sparsity=0.5)
    cr = bp.compress(pr.output, tmp_path / "small.onnx", break_even=0.6)
    assert cr.output.stat().st_size < exp.path.stat().st_size
    art = bp.compile(cr.output, tmp_path / "art", target="x86-64", batch=1, seq=SEQ)
    assert art.directory.is_dir() and art.verified["how"] == "native"
    out = bp.run(art.directory, compare=cr.output)
    assert list(out.outputs["last_hidden_state"].shape) == [1, SEQ, 64]
    assert max(out.max_abs_diff.values()) <= 1e-4
    times = bp.bench(art.directory, number=1, repeat=2)
    assert len(times) == 2 and all(t > 0 for t in times)


FLOW = [("bert-tiny", "bp-dynamo"), ("bert-tiny", "torch-legacy"),
        ("bert-tiny", "torch-dynamo"), ("roberta-tiny", "torch-legacy"), ("roberta-tiny", "torch-dynamo"),
        ("distilbert-tiny", "torch-legacy"), ("distilbert-tiny", "torch-dynamo")]


@pytest.mark.parametrize("spec,route", FLOW, ids=[f"{s}-{r}" for s, r in FLOW])
def test_prune_compress_compile_run(routes, tmp_path, spec, route):
    src = routes(spec, route)
    pruned, small, art_dir = tmp_path / "pruned.onnx", tmp_path / "small.onnx", tmp_path / "x86"
    pr = bp.prune(src, pruned, block="1x32", sparsity=0.5)
    assert pr.verify.max_abs_diff <= 1e-4
    assert len(pr.masks.masks) == 12  # the 2 x 6 encoder Linears, found with or without metadata
    cr = bp.compress(pruned, small, break_even=0.6)  # a fixed policy: BSR at density 0.5
    bsr = next(s.report for s in cr.stages if s.name == "block-sparse")
    assert bsr.changed >= 10, f"only {bsr.changed} layers rewritten to BSR"
    assert all(s.max_abs_diff <= 1e-4 for s in cr.stages if s.max_abs_diff is not None)
    art = bp.compile(small, art_dir, target="x86-64", batch=1, seq=SEQ)
    assert art.verified is not None and art.verified["runs"] == 2
    assert max(art.verified["max_abs_diff"].values()) <= 1e-4
    manifest = json.loads((art_dir / "manifest.json").read_text())
    assert manifest["verified"]["atol"] == 1e-4
    assert sum(layer["form"] == "bsr" for layer in manifest["layers"]) == bsr.changed
    out = bp.run(art_dir, compare=small)
    assert max(out.max_abs_diff.values()) <= 1e-4


@pytest.mark.skipif(not _ort_optimizer_available(), reason="onnxruntime.transformers.optimizer not importable")
@pytest.mark.parametrize("spec", ["bert-tiny", "roberta-tiny", "distilbert-tiny"])
def test_ort_optimized_graph_through_the_whole_flow(routes, tmp_path, spec):
    """Fused (Embed)LayerNormalization/Attention/SkipLayerNormalization/BiasGelu: pruned, compressed,
    lowered to standard ops for TVM and verified against onnxruntime running the fused graph.
    (RoBERTa's optimised graph has LayerNormalization at opset 14: repaired on load.)"""
    src = routes(spec, "ort-optimized")
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops
    pr = bp.prune(src, tmp_path / "pruned.onnx", block="1x32", sparsity=0.5)
    assert len(pr.masks.masks) == 6  # q/k/v are packed inside the fused Attention node
    cr = bp.compress(tmp_path / "pruned.onnx", tmp_path / "small.onnx", break_even=0.6)
    assert next(s.report for s in cr.stages if s.name == "block-sparse").changed == 6
    art = bp.compile(tmp_path / "small.onnx", tmp_path / "art", seq=SEQ)
    assert max(art.verified["max_abs_diff"].values()) <= 1e-4
    assert sum(layer["form"] == "bsr" for layer in art.manifest.layers) == 6


def test_unsupported_contrib_variant_is_refused_by_name(tmp_path, capsys):
    h = 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((h, 3 * h)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(3 * h).astype(np.float32), "b")]
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], name="causal_attention", domain="com.microsoft",
                            num_heads=2, unidirectional=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", h])], inits)
    src = tmp_path / "causal.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                  helper.make_opsetid("com.microsoft", 1)]), str(src))
    _expect_clean_error(capsys, ["compile", str(src), "-o", str(tmp_path / "art"), "--seq", "4"],
                        "com.microsoft::Attention (node 'causal_attention')", tmp_path / "art")


@pytest.mark.skipif(not _ort_optimizer_available(), reason="onnxruntime.transformers.optimizer not importable")
def test_ort_optimized_classifier_is_a_head_left_dense(routes, tmp_path):
    """The issue's `compress --block 16x1 --sparsity 0.8` on a fused BERT with a 2-label classifier."""
    src = routes("bert-tiny", "ort-optimized", head="classification")
    from blockprune.passes.find_weights import find_weights

    roles = {w.shape: w.role for w in find_weights(onnx.load(str(src)))}
    assert roles[(2, 64)] == "classifier"
    bp.compress(src, tmp_path / "small.onnx", block="16x1", sparsity=0.8)
    model = onnx.load(str(tmp_path / "small.onnx"))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    classifier = [v for v in consts.values() if v.ndim == 2 and sorted(v.shape) == [2, 64]]  # + type embeddings
    assert classifier and all(np.count_nonzero(v) == v.size for v in classifier)


# ------------------------------------------------------------------------------------------------
# layer roles and block structure without metadata
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["bert-tiny", "roberta-tiny", "distilbert-tiny"])
def test_roles_from_structure_match_the_names(routes, spec):
    """On our own exports the names give the roles: the structural guess must agree with them,
    and on plain exports (no names) it must find every encoder role of both layers."""
    import dataclasses

    from blockprune.passes.base import PassContext
    from blockprune.passes.find_weights import find_weights, find_weights_in_graph
    from blockprune.passes.graph_roles import infer_roles

    for route in ("bp-legacy", "bp-dynamo"):
        model = onnx.load(str(routes(spec, route)))
        named = find_weights(model)
        assert len(named) == 12 and all(w.role for w in named)
        bare = [dataclasses.replace(w, role=None, layer=None, hf_name=None) for w in named]
        infer_roles(PassContext(model).graph, bare)
        assert [(w.role, w.layer) for w in bare] == [(w.role, w.layer) for w in named], route
    for route in ("torch-legacy", "torch-dynamo"):
        ctx = PassContext(onnx.load(str(routes(spec, route))))
        found = find_weights_in_graph(ctx.graph, {})
        assert sorted((w.role, w.layer) for w in found) == sorted((r, i) for r in ROLES for i in (0, 1)), route


def test_detect_block_finds_the_pruning_block():
    from blockprune.passes.detect_blocks import detect_block

    rng = np.random.default_rng(0)
    for r, c in [(1, 32), (32, 1), (4, 4), (16, 1), (1, 16)]:
        keep = rng.random((128 // r, 256 // c)) > 0.7
        w = rng.standard_normal((128, 256)) * np.repeat(np.repeat(keep, r, 0), c, 1)
        d = detect_block(w)
        assert (d.block.rows, d.block.cols) == (r, c)
        assert abs(d.density - keep.mean()) < 1e-9
    assert detect_block(rng.standard_normal((64, 64))).block is None  # dense
    unstructured = rng.standard_normal((64, 64)) * (rng.random((64, 64)) > 0.5)
    assert detect_block(unstructured).block is None


def test_compress_rewrites_a_plain_export_pruned_outside_blockprune(routes, tmp_path):
    """The issue's first report, at tiny size: 80% in 1x32 by numpy, no metadata -> BSR layers."""
    from blockprune.passes.find_weights import find_weights

    model = onnx.load(str(routes("bert-tiny", "torch-legacy")))
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(1)
    for w in find_weights(model):
        oi = w.to_out_in(numpy_helper.to_array(inits[w.initializer]))
        keep = rng.random((oi.shape[0], oi.shape[1] // 32)) > 0.8
        oi = oi * np.repeat(keep, 32, axis=1)
        inits[w.initializer].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.from_out_in(oi)), w.initializer))
    src = tmp_path / "p80.onnx"
    onnx.save(model, str(src))
    cr = bp.compress(src, tmp_path / "small.onnx", break_even=0.6)
    stages = {s.name: s.report for s in cr.stages}
    assert set(stages["detect-blocks"].details["blocks"].values()) == {"1x32"}
    assert stages["block-sparse"].changed == 12
    assert stages["compact"].changed >= 1  # the FFN chain of Constant-node scalars is matched now
    assert not any("no layer roles" in n for n in stages["reorder"].notes)


# ------------------------------------------------------------------------------------------------
# masks follow the checkpoint
# ------------------------------------------------------------------------------------------------
def test_masks_of_a_classifier_checkpoint_fit_its_export(routes, tmp_path):
    loaded = routes.load("bert-tiny", "classification")
    ckpt = tmp_path / "ckpt"
    loaded.model.save_pretrained(str(ckpt))
    res = bp.export(str(ckpt), tmp_path / "cls.onnx", exporter="legacy")  # head from config.architectures
    from blockprune.onnx_io import get_meta

    assert get_meta(res.model, "head") == "classification"
    names = {t.name for t in res.model.graph.initializer}
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    bp.prune(tmp_path / "cls.onnx", tmp_path / "p.onnx", sparsity=0.5, save_masks=tmp_path / "m.safetensors")
    enc = bp.export(str(ckpt), tmp_path / "enc.onnx", exporter="legacy", head="encoder")
    assert "encoder.layer.0.attention.self.query.weight" in {t.name for t in enc.model.graph.initializer}
    pr = bp.prune(tmp_path / "enc.onnx", tmp_path / "enc-p.onnx", masks=tmp_path / "m.safetensors")
    assert len(pr.masks.masks) == 12 and pr.verify.max_abs_diff <= 1e-4


# ------------------------------------------------------------------------------------------------
# compile: verification, normalisation, importer errors
# ------------------------------------------------------------------------------------------------
def test_failed_verification_publishes_nothing(routes, tmp_path, monkeypatch):
    from blockprune.backends.tvm.runtime import runner

    src = routes("bert-tiny", "torch-legacy")
    good = bp.compile(src, tmp_path / "art", seq=SEQ)
    before = (tmp_path / "art" / "manifest.json").read_text()
    monkeypatch.setattr(runner, "paired_with_onnx",  # what verify_artifact compares: off by 0.5
                        lambda result, model: {"output": (np.full(4, 0.5, np.float32), np.zeros(4, np.float32))})
    with pytest.raises(BlockpruneError, match="differs from onnxruntime"):
        bp.compile(src, tmp_path / "art", seq=SEQ)
    with pytest.raises(BlockpruneError):
        bp.compile(src, tmp_path / "new", seq=SEQ)
    assert (tmp_path / "art" / "manifest.json").read_text() == before and good.verified
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    art = bp.compile(src, tmp_path / "unchecked", seq=SEQ, verify=False)
    assert art.verified is None


def test_shape_folding_honours_shape_start_end():
    from blockprune.backends.tvm.onnx_import.normalize import normalize_for_tvm

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
             helper.make_node("Concat", ["s", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = normalize_for_tvm(m, batch=3, seq=5)
    assert [n.op_type for n in out.graph.node] == ["Reshape"]
    shape = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1]))
    assert shape.tolist() == [5, -1]  # Shape(start=1, end=2) of [3, 5, 8] is [5], not [3, 5, 8]


def test_elementwise_contrib_ops_are_lowered_exactly():
    import onnxruntime as ort

    from blockprune.backends.tvm.onnx_import.normalize import normalize_for_tvm

    h = 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), n) for n in ("g", "b", "bias")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b"], ["n", "", "", "residual"],
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("BiasGelu", ["n", "bias"], ["a"], domain="com.microsoft"),
             helper.make_node("FastGelu", ["a"], ["y"], domain="com.microsoft")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, h]) for n in ("x", "skip")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, h]) for n in ("y", "residual")]
    g = helper.make_graph(nodes, "g", vi, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    lowered = normalize_for_tvm(m, 2, 3)
    assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node)
    feeds = {"x": rng.standard_normal((2, 3, h)).astype(np.float32),
             "skip": rng.standard_normal((2, 3, h)).astype(np.float32)}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert max(float(np.max(np.abs(r - o))) for r, o in zip(ref, got)) < 1e-5


def test_importer_failure_names_the_node(monkeypatch):
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    from blockprune.backends.tvm.onnx_import.importer import import_onnx
    from blockprune.backends.tvm.onnx_import.normalize import importer_errors

    def broken(*args, **kwargs):
        raise ValueError("broadcast_to expects the input shape to have the number of ndim at least ...")

    monkeypatch.setattr(fe.Relu, "_impl_v13", classmethod(broken))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="my_relu")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BlockpruneError, match=r"node 'my_relu' \(op Relu\).*broadcast_to"):
        with importer_errors():
            import_onnx(m, 1, 4)


# ------------------------------------------------------------------------------------------------
# bad inputs: one clear error, no output
# ------------------------------------------------------------------------------------------------
def _expect_clean_error(capsys, argv: list[str], needle: str, output: Path) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and "fix:" in err and "Traceback" not in err
    assert not output.exists()


def test_truncated_and_missing_external_data(routes, tmp_path, capsys):
    data = routes("bert-tiny", "torch-legacy").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 3])
    for cmd in ("compress", "compile"):
        _expect_clean_error(capsys, [cmd, str(cut), "-o", str(tmp_path / f"{cmd}.out")], "truncated",
                            tmp_path / f"{cmd}.out")
    model = onnx.load(str(routes("bert-tiny", "torch-legacy")))
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save_model(model, str(ext), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "ext" / "m.onnx.data").unlink()
    for cmd in ("compress", "compile"):
        _expect_clean_error(capsys, [cmd, str(ext), "-o", str(tmp_path / f"x{cmd}.out")], "m.onnx.data",
                            tmp_path / f"x{cmd}.out")


def test_fp16_weights_are_refused_with_the_fix(routes, tmp_path, capsys):
    float16 = pytest.importorskip("onnxruntime.transformers.float16")
    model = float16.convert_float_to_float16(onnx.load(str(routes("bert-tiny", "torch-legacy"))), keep_io_types=True)
    src = tmp_path / "fp16.onnx"
    onnx.save(model, str(src))
    _expect_clean_error(capsys, ["compress", str(src), "-o", str(tmp_path / "c.onnx"), "--sparsity", "0.5"],
                        "float16", tmp_path / "c.onnx")
    _expect_clean_error(capsys, ["compile", str(src), "-o", str(tmp_path / "art"), "--seq", str(SEQ)],
                        "float16", tmp_path / "art")


def test_no_prunable_matmul_and_dynamic_batch(routes, tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "relu.onnx"
    onnx.save(m, str(src))
    _expect_clean_error(capsys, ["compress", str(src), "-o", str(tmp_path / "c.onnx")], "no prunable MatMul",
                        tmp_path / "c.onnx")
    model = str(routes("bert-tiny", "torch-legacy"))
    for batch in ("dynamic", "-1", "0"):
        _expect_clean_error(capsys, ["compile", model, "-o", str(tmp_path / "art"), "--batch", batch],
                            "static", tmp_path / "art")
    with pytest.raises(BlockpruneError, match="not a static size"):
        bp.compile(model, tmp_path / "art", batch=None)
    assert not (tmp_path / "art").exists()


def test_int32_token_ids_compile_and_verify(routes, tmp_path):
    """int32 ids are valid ONNX (Gather takes them): compiled and verified with int32 inputs."""
    model = onnx.load(str(routes("bert-tiny", "torch-legacy")))
    for vi in model.graph.input:
        vi.type.tensor_type.elem_type = TensorProto.INT32
    src = tmp_path / "int32.onnx"
    onnx.save(model, str(src))
    art = bp.compile(src, tmp_path / "art", seq=SEQ)
    assert {i["dtype"] for i in art.manifest.inputs} == {"int32"}
    assert max(art.verified["max_abs_diff"].values()) <= 1e-4
