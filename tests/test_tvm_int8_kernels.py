"""int8 kernels (issue #15): the quantizer equals onnxruntime's DynamicQuantizeLinear bit for bit,
the int32 sums equal numpy's exactly, and the float outputs match the contract to 1e-5.

Contract: ``Y[m, o] = xs * w_scale[o] * sum_k (xq[m, k] - xz) * Wq[o, k]`` (+ bias, GELU, + R).
Shapes are small (M <= 24, K <= 128, N <= 96) so each compile stays well under a second.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.kernels import int8_api as ia  # noqa: E402
from blockprune.backends.tvm.kernels import int8_kernel as ik  # noqa: E402
from blockprune.backends.tvm.kernels import int8_quantize as iq  # noqa: E402

M, K, N = 13, 64, 96  # 13: not a multiple of any register tile
BLOCKS = ["1x4", "4x4", "16x4", "32x32"]
HAS_VNNI = ik.vnni_lanes("host") > 0
# x86 kernel families this host runs: avx2 always, vnni where the CPU has it
X86_ISAS = ["avx2", pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX512-VNNI/AVX-VNNI"))]


def sparse_int8(rng, n: int, k: int, block: str | None, sparsity: float = 0.5) -> np.ndarray:
    wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    if block is None:
        return wq
    b = BlockShape.parse(block)
    keep = rng.random((n // b.rows, k // b.cols)) >= sparsity
    keep[0] = False  # an empty block row
    return (wq * np.repeat(np.repeat(keep, b.rows, 0), b.cols, 1)).astype(np.int8)


def compiled(wq, ws, x_shape, **kw):
    return ia.compile_int8_layer(ia.int8_layer(wq, ws, x_shape, **kw))


# ---- quantizer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_dql():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto
    from onnx import helper as h

    def run(x):
        g = h.make_graph([h.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                         [h.make_tensor_value_info("q", TensorProto.UINT8, list(x.shape)),
                          h.make_tensor_value_info("s", TensorProto.FLOAT, []),
                          h.make_tensor_value_info("z", TensorProto.UINT8, [])])
        model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})

    return run


def quantize_tvm(x: np.ndarray, fmt: str):
    spec = iq.QuantizeSpec(x.shape, fmt)
    ex = tvm.compile(tvm.IRModule({"q": iq.quantize_primfunc(spec, "q")}),
                     target=ia.resolve_target("host").target())
    out = tvm.runtime.tensor(np.zeros(spec.out_shape, spec.out_dtype))
    xs, xz = tvm.runtime.tensor(np.zeros(1, np.float32)), tvm.runtime.tensor(np.zeros(1, np.uint8))
    ex.jit()["q"](tvm.runtime.tensor(x), out, xs, xz)
    return out.numpy(), xs.numpy()[0], xz.numpy()[0]


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "ties", "batch"])
def test_quantizer_equals_onnxruntime(case, ort_dql):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = (rng.standard_normal((M, K)) * 3 + 0.5).astype(np.float32)
    if case == "positive":
        x = np.abs(x)
    elif case == "negative":
        x = -np.abs(x)
    elif case == "zeros":
        x = np.zeros_like(x)
    elif case == "ties":  # exact halves of the scale: round half to even must match
        x = (rng.integers(-200, 200, (M, K)) * 0.5).astype(np.float32)
        x[0, 0], x[0, 1] = -127.5, 127.5  # scale = 1.0
    elif case == "batch":
        x = x.reshape(1, M, K)
    q, s, z = ort_dql(x)
    rq, rs, rz = iq.dynamic_quantize_np(x)
    assert np.array_equal(rq, q) and rs == s and rz == z  # the numpy reference is ONNX's
    for fmt in iq.X_FORMATS:
        got, gs, gz = quantize_tvm(x, fmt)
        assert gs == s and gz == z, fmt
        assert np.array_equal(got, iq.pack_x_np(q, z, fmt)), fmt


def test_packed_layout_is_documented_one():
    xq = np.arange(12 * 8, dtype=np.int32).reshape(12, 8).astype(np.uint8)
    xp = iq.pack_x_np(xq, 3, "i16")
    assert xp.shape == (32 // 8, 8 // 4, 32) and xp.dtype == np.int16
    m, k = 9, 6
    assert xp[m // 8, k // 4, 4 * (m % 8) + k % 4] == int(xq[m, k]) - 3
    assert (xp[1, :, 4 * 4:] == 0).all() and (xp[2:] == 0).all()  # padding rows 12..31
    assert iq.pack_x_np(xq, 3, "s8")[m // 8, k // 4, 4 * (m % 8) + k % 4] == int(xq[m, k]) - 128


# ---- exact integer sums ------------------------------------------------------------------------
@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("block", [None] + BLOCKS)
def test_int32_sums_are_exact(block, isa):
    rng = np.random.default_rng(zlib.crc32(str(block).encode()))
    x = rng.standard_normal((M, K)).astype(np.float32)
    wq = sparse_int8(rng, N, K, block)
    layer = compiled(wq, np.ones(N, np.float32), x.shape, block=block, out_dtype="int32", isa=isa)
    acc, _ = ia.int8_reference(x, wq, np.ones(N, np.float32))
    assert np.array_equal(layer(x), acc)


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("block", [None, "1x4", "16x4"])
def test_no_int16_saturation_at_the_extremes(block, isa):
    """xq - xz = -255 against Wq = -127 everywhere: every pair of products is 64770 > 32767.

    ``vpmaddubsw`` (u8 x s8 pairs summed in int16) would saturate here; our int16 x int16 ->
    int32 ``vpmaddwd`` must give the exact K * 255 * 127.
    """
    x = np.full((M, K), -1.0, np.float32)
    x[:, 1::2] = -0.5  # not all at the minimum: xq spans 0..128
    x[0] = 0.0  # X max = 0 -> xz = 255
    wq = np.full((N, K), -127, np.int8)
    wq[1::2] = 127
    layer = compiled(wq, np.ones(N, np.float32), x.shape, block=block, out_dtype="int32", isa=isa)
    acc, _ = ia.int8_reference(x, wq, np.ones(N, np.float32))
    xq, _, xz = iq.dynamic_quantize_np(x)
    assert xz == 255 and xq.min() == 0
    assert acc[1, 0] == (np.int64(xq[1]) - 255) @ np.full(K, -127) and acc[1:, 0].max() > 32767 * 8
    assert np.array_equal(layer(x), acc)


# ---- float epilogue ----------------------------------------------------------------------------
def assert_close(y, ref, rtol=1e-5):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("block", [None] + BLOCKS)
@pytest.mark.parametrize("epilogue", ["bias", "bias+gelu", "bias+residual", "none"])
def test_dequantized_output_matches_contract(block, epilogue):
    rng = np.random.default_rng(zlib.crc32(f"{block}/{epilogue}".encode()))
    x = rng.standard_normal((2, 8, K)).astype(np.float32)  # [B, S, K]
    wq = sparse_int8(rng, N, K, block)
    ws = (rng.random(N) * 0.02 + 0.001).astype(np.float32)
    bias = None if epilogue == "none" else rng.standard_normal(N).astype(np.float32)
    gelu, resid = "gelu" in epilogue, "residual" in epilogue
    r = rng.standard_normal((2, 8, N)).astype(np.float32) if resid else None
    layer = compiled(wq, ws, x.shape, block=block, bias=bias, gelu=gelu, residual=resid)
    y = layer(x, r)
    _, ref = ia.int8_reference(x, wq, ws, bias, gelu, r)
    assert y.shape == (2, 8, N) and y.dtype == np.float32
    # GELU uses the fp32 kernels' erf fit (3.5e-7 absolute in erf)
    assert_close(y.reshape(ref.shape), ref, rtol=1e-5)


def test_empty_weight_gives_the_bias():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = compiled(np.zeros((N, K), np.int8), np.ones(N, np.float32), x.shape, block="4x4", bias=bias)(x)
    assert np.array_equal(y, np.broadcast_to(bias, y.shape))


def test_bsr_storage_is_exact_and_schedules_split_work():
    rng = np.random.default_rng(5)
    wq = sparse_int8(rng, N, K, "16x4")
    bsr = ia.int8_bsr_from_dense(wq, "16x4")
    assert bsr.data.dtype == np.int8 and np.array_equal(bsr.to_dense(), wq)
    x = rng.standard_normal((24, K)).astype(np.float32)
    for sch in [ik.Int8Schedule("avx2", 1, 4, 2, 8), ik.Int8Schedule("avx2", 4, 2, 1, 4)]:
        layer = ia.compile_int8_layer(ia.int8_layer(bsr, np.ones(N, np.float32), x.shape, schedule=sch,
                                                    out_dtype="int32"))
        assert np.array_equal(layer(x), ia.int8_reference(x, wq, np.ones(N, np.float32))[0])


# ---- refusals, schedules, targets ------------------------------------------------------------------
def test_blocks_without_4_input_features_are_refused():
    with pytest.raises(BlockpruneError) as err:
        ia.int8_layer(np.zeros((N, K), np.int8), np.ones(N, np.float32), (M, K), block="16x1")
    assert "multiple of 4" in err.value.problem and "1x4" in err.value.fix
    with pytest.raises(BlockpruneError, match="multiple of 4"):
        ia.int8_layer(np.zeros((N, 30), np.int8), np.ones(N, np.float32), (M, 30))
    with pytest.raises(BlockpruneError, match="int8"):
        ia.int8_layer(np.zeros((N, K), np.float32), np.ones(N, np.float32), (M, K))


def test_isa_per_target():
    assert ik.int8_isa("x86-64") == ("vnni" if HAS_VNNI else "avx2")
    assert ik.int8_isa("cortex-a72") == "neon"
    assert ik.int8_isa("cortex-a76") == "sdot"
    spec = ik.Int8KernelSpec((128, 384), 384, BlockShape.parse("1x4"))
    s = ik.choose_int8_schedule(spec, "cortex-a76")
    assert s.x_format == "s8" and s.w_dtype == "int8"
    assert ik.choose_int8_schedule(spec, "cortex-a72").x_format == "i16"


def test_x86_kernel_uses_vpmaddwd():
    rng = np.random.default_rng(1)
    layer = compiled(sparse_int8(rng, N, K, None), np.ones(N, np.float32), (M, K), isa="avx2")
    asm = layer.assembly()
    # with AVX512-VNNI, LLVM fuses vpmaddwd + vpaddd into vpdpwssd (the same exact int16 pairs)
    assert ("vpmaddwd" in asm or "vpdpwssd" in asm) and "vpmaddubsw" not in asm


# ---- VNNI (x86 vpdpbusd, lanes along the outputs) ----------------------------------------------
def test_vnni_weight_layout_is_documented_one():
    from blockprune.backends.tvm.kernels.int8_vnni import pack_vnni_weight

    w = np.arange(32 * 8).reshape(32, 8).astype(np.int8)
    p = pack_vnni_weight(w, 16)
    assert p.shape == (2, 2, 16) and p.dtype == np.int32
    o, k = 21, 6  # output 21 = vector 1 lane 5; feature 6 = group 1 byte 2
    assert p[o // 16, k // 4, o % 16:o % 16 + 1].view(np.int8)[k % 4] == w[o, k]
    with pytest.raises(BlockpruneError, match="multiples"):
        pack_vnni_weight(np.zeros((4, 4), np.int8), 16)


def test_vnni_schedules_fall_back_to_avx2_for_short_blocks():
    if not HAS_VNNI:
        pytest.skip("no AVX512-VNNI/AVX-VNNI")
    for block, isa in [(None, "vnni"), ("16x4", "vnni"), ("32x32", "vnni"), ("4x4", "avx2"), ("1x4", "avx2")]:
        spec = ik.Int8KernelSpec((128, 384), 384, BlockShape.parse(block) if block else None)
        sch = ik.choose_int8_schedule(spec, "host")
        assert sch.isa == isa, block
        assert sch.x_format == ("u8p" if isa == "vnni" else "i16")


@pytest.mark.skipif(not HAS_VNNI, reason="no AVX512-VNNI/AVX-VNNI")
@pytest.mark.parametrize("lanes", [16, 8])
def test_vnni_kernel_is_exact_and_uses_vpdpbusd(lanes):
    """Both vector widths (zmm: AVX512-VNNI, ymm: what AVX-VNNI-only CPUs get) with every epilogue."""
    rng = np.random.default_rng(lanes)
    x = rng.standard_normal((2, 9, K)).astype(np.float32)
    wq = sparse_int8(rng, N, K, "16x4")
    ws = (rng.random(N) * 0.02 + 0.001).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    r = rng.standard_normal((2, 9, N)).astype(np.float32)
    for block in (None, "16x4"):
        sch = ik.Int8Schedule("vnni", 5, 1, 1, lanes)  # 18 rows: 3 tiles of 5 and a tail of 3
        sums = compiled(wq, np.ones(N, np.float32), x.shape, block=block, out_dtype="int32", schedule=sch)
        assert np.array_equal(sums(x).reshape(-1, N), ia.int8_reference(x, wq, np.ones(N, np.float32))[0])
        layer = compiled(wq, ws, x.shape, block=block, bias=bias, gelu=True, residual=True, schedule=sch)
        _, ref = ia.int8_reference(x, wq, ws, bias, True, r)
        assert_close(layer(x, r).reshape(ref.shape), ref)
        assert "vpdpbusd" in layer.assembly() and ("zmm" if lanes == 16 else "ymm") in layer.assembly()


# ---- aarch64: cross-compiled, run under qemu ----------------------------------------------------
@pytest.mark.parametrize("target,instr", [("cortex-a72", "smlal"), ("cortex-a76", "sdot")])
def test_aarch64_layer_runs_under_qemu(tmp_path, target, instr, aarch64_qemu):
    from blockprune.backends.tvm.runtime import runner
    from blockprune.backends.tvm.runtime.artifact import Manifest
    from blockprune.backends.tvm.targets.presets import export_fcompile

    rng = np.random.default_rng(11)
    x = rng.standard_normal((M, K)).astype(np.float32)
    wq = sparse_int8(rng, N, K, "4x4")
    ws = (rng.random(N) * 0.02 + 0.001).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    layer = ia.int8_layer(wq, ws, x.shape, block="4x4", bias=bias, gelu=True, target=target)
    preset = ia.resolve_target(target)
    ex = tvm.compile(ia.relax_module(layer), target=preset.target())
    asm = ex.mod.inspect_source("asm") + "".join(m.inspect_source("asm") for m in ex.mod.imports
                                                  if hasattr(m, "inspect_source"))
    assert instr in asm
    ex.export_library(str(tmp_path / "model.so"), fcompile=export_fcompile(preset))
    manifest = Manifest(target={"name": preset.name, "arch": "aarch64", "config": dict(preset.config)},
                        inputs=[{"name": "X", "shape": list(x.shape), "dtype": "float32"}],
                        outputs=[{"name": "Y", "shape": [M, N], "dtype": "float32"}],
                        source={}, batch=1, seq=M)
    manifest.write(tmp_path)
    y = runner.run_qemu(tmp_path, manifest, [x])["Y"]
    _, ref = ia.int8_reference(x, wq, ws, bias, gelu=True)
    assert_close(y, ref)
