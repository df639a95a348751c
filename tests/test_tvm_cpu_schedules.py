"""CPU schedule rules for the dense parts of an encoder: every rule computes what numpy does.

Each rule gets a small Relax graph of the op it targets (Linear + bias + GELU, attention
scores with scale and mask, P @ V, softmax, layernorm, reshape + transpose), compiled through
``compile_relax``, checked against numpy within 1e-4, and the scheduled module is checked for
the rule that handled each PrimFunc. Then a 2-layer tiny BERT matches onnxruntime, with every
PrimFunc scheduled and every matmul handled by the matmul rule; and the same pipeline
cross-compiles for aarch64 (NEON fmla in the assembly).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from blockprune.backends.tvm.pipeline.cpu_schedules import (compile_relax, schedule_relax,  # noqa: E402
                                                   schedule_report)
from blockprune.backends.tvm.pipeline.schedules import CpuInfo, choose_matmul_tile  # noqa: E402
from blockprune.backends.tvm.pipeline.schedules.matmul import choose_padded_tile  # noqa: E402
from blockprune.backends.tvm.targets.presets import get_preset, host_preset  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def host_target():
    return host_preset().target()


def _module(inputs: dict[str, tuple], body) -> tvm.IRModule:
    """Relax ``main`` over float32 inputs, its output from ``body(bb, *vars)``."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, target, *arrays) -> np.ndarray:
    vm = relax.VirtualMachine(compile_relax(mod, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    return out.numpy()


def _rules(mod, target) -> dict[str, str | None]:
    return {s.name: s.rule for s in schedule_report(schedule_relax(mod, target))}


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


# ---- tile choice -----------------------------------------------------------------------------
def test_tile_fits_registers_and_stack():
    avx2 = CpuInfo(lanes=8, registers=16, max_acc=12, cores=2, isa="avx2")
    neon = CpuInfo(lanes=4, registers=32, max_acc=24, cores=4, isa="neon")
    t = choose_matmul_tile(128, 3072, avx2)
    assert (t.rows, t.vectors, t.lanes) == (4, 3, 8)  # 12 accumulators + 3 B + 1 broadcast
    for m, n, info in [(128, 768, neon), (16, 64, avx2), (128, 64, neon), (7, 5, avx2), (1, 128, neon)]:
        t = choose_matmul_tile(m, n, info)
        assert m % t.rows == 0 and n % t.cols == 0
        assert t.rows * t.vectors <= info.max_acc and t.rows * t.vectors + t.vectors + 1 <= info.registers
        assert t.rows * t.cols * 4 < 1024  # stack-allocated accumulator


def test_padded_tile_is_full_width_for_compacted_sizes():
    """N = 77 / 307 (a compacted Linear) get a full-width tile over padded N, not 1 lane; sizes
    that tile exactly keep the exact tile."""
    avx2 = CpuInfo(lanes=8, registers=16, max_acc=12, cores=2, isa="avx2")
    neon = CpuInfo(lanes=4, registers=32, max_acc=24, cores=4, isa="neon")
    for info in (avx2, neon):
        for m, n in [(128, 77), (128, 307), (128, 13), (7, 77), (7, 13), (13, 5)]:
            t, m_pad, n_pad = choose_padded_tile(m, n, info)
            assert t.lanes == info.lanes and m_pad % t.rows == 0 and n_pad % t.cols == 0
            assert m <= m_pad < m + t.rows and n <= n_pad < n + t.cols
            assert t.rows * t.vectors <= info.max_acc and t.rows * t.vectors + t.vectors + 1 <= info.registers
            assert t.rows * t.cols * 4 < 1024
        for m, n in [(128, 384), (128, 3072), (128, 64), (16, 64)]:
            assert choose_padded_tile(m, n, info) == (choose_matmul_tile(m, n, info), m, n)


# ---- one rule at a time ----------------------------------------------------------------------
def test_dense_matmul_bias_gelu_matches_numpy(host_target):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 32)).astype(np.float32)
    # N = 192 is wider than one register tile on AVX2 (8 lanes) and AVX-512 (16 lanes) alike, so the
    # weight is re-laid out in panels (a weight one panel wide is already contiguous and stays as is)
    w = (rng.standard_normal((32, 192)) * 0.3).astype(np.float32)
    b = rng.standard_normal(192).astype(np.float32)

    def body(bb, xv):
        y = bb.emit(relax.op.add(relax.op.matmul(xv, relax.const(w)), relax.const(b)))
        half = relax.const(np.float32(0.5))
        erf = relax.op.erf(relax.op.multiply(y, relax.const(np.float32(1 / math.sqrt(2)))))
        return bb.emit(relax.op.multiply(relax.op.multiply(y, half), relax.op.add(erf, relax.const(np.float32(1)))))

    mod = _module({"x": (1, 16, 32)}, body)
    h = x.astype(np.float64) @ w + b
    ref = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
    np.testing.assert_allclose(_run(mod, host_target, x), ref, atol=ATOL, rtol=0)
    rules = _rules(mod, host_target)
    packed = [n for n in rules if n.endswith("_packed")]
    assert packed and all(rules[n] == "matmul" for n in packed), rules  # weight re-laid out


@pytest.mark.parametrize("m,k,n", [(128, 384, 77), (128, 384, 307), (128, 384, 13),
                                   (7, 384, 77), (7, 384, 307), (7, 37, 13)])
def test_matmul_with_n_and_m_tails_matches_numpy(host_target, m, k, n):
    """Compacted Linear sizes (N not a multiple of the tile, odd M, odd K): handled by the
    matmul rule over padded tiles (constant weight packed with zero columns), exact."""
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)

    def body(bb, xv):
        return bb.emit(relax.op.add(relax.op.matmul(xv, relax.const(w)), relax.const(b)))

    mod = _module({"x": x.shape}, body)
    np.testing.assert_allclose(_run(mod, host_target, x), x.astype(np.float64) @ w + b, atol=ATOL, rtol=0)
    scheduled = schedule_relax(mod, host_target)
    report = schedule_report(scheduled)
    assert [s.rule for s in report if s.has_matmul] == ["matmul"], report
    assert all(s.rule == "matmul" for s in report), report
    assert all(_padded_product(scheduled, s.name) for s in report), "fell back to the exact (narrow) tile"


def test_matmul_tails_with_gelu_and_unpacked_operands_match_numpy(host_target):
    """A GELU epilogue on a padded tile, and a product of two activations (both operands get a
    padded copy instead of a packed constant): N = 13 and M = 7."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 7, 40)).astype(np.float32)
    w = (rng.standard_normal((40, 13)) * 0.3).astype(np.float32)
    y = rng.standard_normal((1, 40, 13)).astype(np.float32)

    def body(bb, xv, yv):
        h = bb.emit(relax.op.nn.gelu(relax.op.matmul(xv, relax.const(w))))
        return bb.emit(relax.op.add(h, relax.op.matmul(xv, yv)))

    mod = _module({"x": x.shape, "y": y.shape}, body)
    h = x.astype(np.float64) @ w
    ref = 0.5 * h * (1 + _erf(h / math.sqrt(2))) + x.astype(np.float64) @ y
    np.testing.assert_allclose(_run(mod, host_target, x, y), ref, atol=ATOL, rtol=0)
    scheduled = schedule_relax(mod, host_target)
    report = schedule_report(scheduled)
    matmuls = [s for s in report if s.has_matmul]
    assert len(matmuls) == 2 and all(s.rule == "matmul" for s in matmuls), report
    assert all(_padded_product(scheduled, s.name) for s in matmuls)


def _padded_product(mod, name: str) -> bool:
    """The matmul rule ran the product over padded tiles (``pad_einsum``'s ``*_pad`` buffers)."""
    return "_pad = T.sblock_alloc_buffer" in mod[name].script()


def test_attention_scores_scale_mask_and_context_match_numpy(host_target):
    rng = np.random.default_rng(1)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 2, 16, 8), (1, 2, 8, 16), (1, 2, 16, 8)])
    mask = np.where(rng.random((1, 1, 1, 16)) < 0.2, -1e4, 0).astype(np.float32)

    def body(bb, qv, kv, vv, mv):
        s = bb.emit(relax.op.add(relax.op.multiply(relax.op.matmul(qv, kv), relax.const(np.float32(0.125))), mv))
        p = bb.emit(relax.op.nn.softmax(s, axis=-1))
        return bb.emit(relax.op.matmul(p, vv))

    mod = _module({"q": q.shape, "kt": kt.shape, "v": v.shape, "mask": mask.shape}, body)
    s = (q.astype(np.float64) @ kt) * 0.125 + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(_run(mod, host_target, q, kt, v, mask), p @ v, atol=ATOL, rtol=0)
    rules = _rules(mod, host_target)
    assert sorted(rules.values()) == ["matmul", "matmul", "row_reduction"], rules


def test_layernorm_matches_numpy(host_target):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 16, 64)) * 3 + 1).astype(np.float32)
    g, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)

    def body(bb, xv):
        return bb.emit(relax.op.nn.layer_norm(xv, relax.const(g), relax.const(beta), axes=[-1], epsilon=1e-12))

    mod = _module({"x": x.shape}, body)
    xd = x.astype(np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-12) * g + beta
    np.testing.assert_allclose(_run(mod, host_target, x), ref, atol=ATOL, rtol=0)
    assert list(_rules(mod, host_target).values()) == ["row_reduction"]


def test_fused_elementwise_reshape_transpose_matches_numpy(host_target):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)

    def body(bb, xv):
        y = relax.op.reshape(relax.op.add(xv, relax.const(b)), (1, 16, 4, 16))
        return bb.emit(relax.op.permute_dims(relax.op.exp(y), [0, 2, 1, 3]))

    mod = _module({"x": x.shape}, body)
    ref = np.exp((x + b).reshape(1, 16, 4, 16)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(_run(mod, host_target, x), ref, atol=ATOL, rtol=1e-5)
    assert set(_rules(mod, host_target).values()) == {"elementwise"}


# ---- a whole model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert():
    pytest.importorskip("onnxruntime")
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model

    loaded = load_model("bert-tiny")
    model = export_onnx(loaded, None, exporter="legacy").model
    return loaded, model


def _import(model, seq: int = 16):
    from tvm.relax.frontend.onnx import from_onnx

    names = [i.name for i in model.graph.input]
    mod = from_onnx(model, shape_dict={n: [1, seq] for n in names}, dtype_dict={n: "int64" for n in names},
                    keep_params_in_input=False)
    return mod, names


def test_tiny_bert_matches_onnxruntime_and_every_func_is_scheduled(tiny_bert, host_target):
    import onnxruntime as ort

    loaded, model = tiny_bert
    mod, names = _import(model)
    rng = np.random.default_rng(4)
    feeds = {n: np.zeros((1, 16), np.int64) for n in names}
    feeds["input_ids"] = rng.integers(0, int(loaded.config.vocab_size), (1, 16)).astype(np.int64)
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.array([[1] * 12 + [0] * 4], np.int64)  # padding exercises the mask
    model.ir_version = 10  # onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = _run(mod, host_target, *[feeds[n] for n in names])
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)

    report = schedule_report(schedule_relax(mod, host_target))
    assert report and all(s.rule is not None for s in report), report
    matmuls = [s for s in report if s.has_matmul]
    assert len(matmuls) >= 5 and all(s.rule == "matmul" for s in matmuls), matmuls
    assert any(s.rule == "row_reduction" for s in report)  # softmax, layernorm


def test_tiny_bert_cross_compiles_for_aarch64_neon(tiny_bert):
    _, model = tiny_bert
    mod, _ = _import(model)
    ex = compile_relax(mod, get_preset("cortex-a72").target())
    lib = ex.mod.imports[0] if ex.mod.imports else ex.mod
    asm = lib.inspect_source("asm")
    assert "fmla" in asm and "v0.4s" in asm.replace("V0.4S", "v0.4s")


def test_hand_written_kernels_are_left_alone(host_target):
    """A module mixing the IRBuilder BSR kernel with a legalized op: only the op is scheduled."""
    from blockprune.backends.tvm.kernels.bsr_kernel import BSRKernelSpec, bsr_matmul_primfunc, choose_schedule
    from blockprune.backends.tvm.pipeline.cpu_schedules import PRESCHEDULED, apply_cpu_schedules
    from blockprune.blocks import BlockShape

    spec = BSRKernelSpec((1, 16, 64), 96, BlockShape.parse("16x1"), True)
    bsr = bsr_matmul_primfunc(spec, choose_schedule(16, 96, spec.block, host_target, k=64))
    mod = _module({"x": (16, 64)}, lambda bb, x: relax.op.nn.softmax(x, axis=-1))
    with host_target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(mod)
    mod["bsr_matmul"] = bsr
    rules = {s.name: s.rule for s in schedule_report(apply_cpu_schedules(mod, host_target))}
    assert rules.pop("bsr_matmul") == PRESCHEDULED
    assert set(rules.values()) == {"row_reduction"}, rules
