"""BSR storage and the TVM block-sparse kernel: exact storage, numerically right products.

Small shapes (M=16, K=64, N=96) keep every compile well under a second; the kernel is checked
against numpy ``x @ W.T (+ b)`` for each block mode we produce (row segments 1xw, column
segments hx1, tiles rxc) and for the awkward cases: no sparsity, empty block rows, an empty
matrix, a batch dimension, and M that the register tile does not divide.
"""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix, bsr_to_dense, dense_to_bsr
from blockprune.errors import BlockpruneError

M, K, N = 16, 64, 96


def block_sparse_weight(rng, n, k, block: str, sparsity: float, empty_rows: int = 0) -> np.ndarray:
    """Random W[n, k] whose zeros are whole blocks; the first `empty_rows` block rows all zero."""
    b = BlockShape.parse(block)
    gr, gc = n // b.rows, k // b.cols
    keep = rng.random((gr, gc)) >= sparsity
    keep[:empty_rows] = False
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w * np.repeat(np.repeat(keep, b.rows, 0), b.cols, 1)


# ---- storage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["1x32", "16x1", "4x4", "32x32", "1x1"])
def test_round_trip_is_exact_and_sizes_add_up(block):
    rng = np.random.default_rng(1)
    w = block_sparse_weight(rng, N, K, block, 0.6, empty_rows=1)
    bsr = dense_to_bsr(w, block)
    b = BlockShape.parse(block)
    kept = (w.reshape(N // b.rows, b.rows, K // b.cols, b.cols) != 0).any(axis=(1, 3))
    assert bsr.nnzb == kept.sum()
    assert np.array_equal(bsr_to_dense(bsr), w)
    assert bsr.data.shape == (bsr.nnzb, b.rows, b.cols)
    assert bsr.indptr.shape == (N // b.rows + 1,) and bsr.indptr[1] == 0  # first row empty
    assert bsr.data_nbytes == bsr.nnzb * b.rows * b.cols * 4
    assert bsr.index_nbytes == bsr.nnzb * 4 + (N // b.rows + 1) * 4
    assert bsr.nbytes == bsr.data_nbytes + bsr.index_nbytes
    assert bsr.dense_nbytes == N * K * 4
    assert bsr.block_density == pytest.approx(kept.mean())


def test_block_with_one_nonzero_is_kept_and_zero_matrix_is_empty():
    w = np.zeros((8, 8), np.float32)
    assert dense_to_bsr(w, "4x4").nnzb == 0
    w[5, 6] = -3.5
    bsr = dense_to_bsr(w, "4x4")
    assert bsr.nnzb == 1 and list(bsr.indices) == [1] and list(bsr.indptr) == [0, 0, 1]
    assert np.array_equal(bsr_to_dense(bsr), w)


def test_indivisible_shape_is_refused_with_a_fix():
    with pytest.raises(BlockpruneError) as err:
        dense_to_bsr(np.ones((10, 64), np.float32), "4x4")
    assert "does not divide" in err.value.problem and "pad" in err.value.fix


def test_inconsistent_arrays_are_refused():
    bsr = dense_to_bsr(np.ones((8, 8), np.float32), "4x4")
    with pytest.raises(BlockpruneError, match="indptr"):
        BSRMatrix(bsr.data, bsr.indices, bsr.indptr[:-1], bsr.shape, bsr.block)
    with pytest.raises(BlockpruneError, match="block-column"):
        BSRMatrix(bsr.data, bsr.indices + 5, bsr.indptr, bsr.shape, bsr.block)


# ---- kernel ----------------------------------------------------------------------------------
tvm = pytest.importorskip("tvm")
from blockprune.backends.tvm.kernels import bsr_kernel as bk  # noqa: E402
from blockprune.backends.tvm.targets import presets as targets  # noqa: E402


def check_kernel(x, w, block, bias=None, target="host"):
    bsr = dense_to_bsr(w, block)
    y = bk.run_bsr_matmul(x, bsr, bias, target=target)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    if bias is not None:
        ref = ref + bias
    assert y.shape == x.shape[:-1] + (w.shape[0],)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)
    return bsr


@pytest.mark.parametrize("block", ["1x32", "16x1", "4x4", "32x32", "1x16", "8x1"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_kernel_matches_numpy(block, sparsity):
    rng = np.random.default_rng(zlib.crc32(f"{block}/{sparsity}".encode()))
    w = block_sparse_weight(rng, N, K, block, sparsity)
    x = rng.standard_normal((M, K)).astype(np.float32)
    check_kernel(x, w, block)


@pytest.mark.parametrize("block", ["1x32", "16x1", "4x4", "32x32"])
def test_empty_block_rows_bias_and_batch(block):
    rng = np.random.default_rng(7)
    b = BlockShape.parse(block)
    w = block_sparse_weight(rng, N, K, block, 0.5, empty_rows=(N // b.rows) // 2)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((2, 8, K)).astype(np.float32)  # [B, S, K] -> M = 16
    bsr = check_kernel(x, w, block, bias)
    assert (bsr.row_nnzb()[: (N // b.rows) // 2] == 0).all()
    # an empty row block gives exactly the bias
    y = bk.run_bsr_matmul(x, bsr, bias)
    np.testing.assert_array_equal(y[..., 0], np.full(y.shape[:-1], bias[0], np.float32))


@pytest.mark.parametrize("block", ["1x32", "4x4", "16x1"])
def test_all_zero_weight_gives_bias(block):
    x = np.random.default_rng(3).standard_normal((M, K)).astype(np.float32)
    bias = np.arange(N, dtype=np.float32)
    bsr = check_kernel(x, np.zeros((N, K), np.float32), block, bias)
    assert bsr.nnzb == 0


@pytest.mark.parametrize("block", ["1x32", "16x1", "4x4", "2x2", "3x5"])
def test_rows_not_divisible_by_the_tile(block):
    rng = np.random.default_rng(11)
    k = 60 if block == "3x5" else K
    w = block_sparse_weight(rng, 48, k, block, 0.4)
    x = rng.standard_normal((13, k)).astype(np.float32)  # 13: prime, always leaves a tail
    check_kernel(x, w, block)


@pytest.mark.parametrize("block,k_chunk", [("1x32", 32), ("16x1", 16), ("4x4", 16), ("32x32", 32), ("1x16", 48)])
def test_k_split_into_passes(block, k_chunk):
    """Long K is walked in slices (X slice kept in L1); partial sums must add up exactly."""
    from dataclasses import replace

    rng = np.random.default_rng(5)
    k = 96
    b = BlockShape.parse(block)
    w = block_sparse_weight(rng, N, k, block, 0.5, empty_rows=1)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((M, k)).astype(np.float32)
    bsr = dense_to_bsr(w, block)
    ptr = bk.chunked_indptr(bsr, k_chunk)
    assert ptr.shape == (N // b.rows, k // k_chunk + 1)
    assert (ptr[:, 0] == bsr.indptr[:-1]).all() and (ptr[:, -1] == bsr.indptr[1:]).all()
    for i, j in [(1, 0), (2, 1), (N // b.rows - 1, k // k_chunk - 1)]:
        cols = bsr.indices[ptr[i, j]:ptr[i, j + 1]] * b.cols
        assert ((cols >= j * k_chunk) & (cols < (j + 1) * k_chunk)).all()
    sch = replace(bk.choose_schedule(M, N, block), k_chunk=k_chunk)
    y = bk.run_bsr_matmul(x, bsr, bias, schedule=sch)
    np.testing.assert_allclose(y, x @ w.T + bias, rtol=0, atol=1e-4)


def test_kernel_runs_inside_a_relax_module():
    """How the ONNX->Relax pass uses it: add the PrimFunc, call_tir with the BSR arrays as constants."""
    from tvm import relax

    rng = np.random.default_rng(9)
    w = block_sparse_weight(rng, N, K, "1x32", 0.5)
    bias = rng.standard_normal(N).astype(np.float32)
    bsr = dense_to_bsr(w, "1x32")
    preset = targets.resolve_target("host")
    spec = bk.BSRKernelSpec((2, 8, K), N, bsr.block, bias=True)
    sch = bk.choose_schedule(spec.m, N, bsr.block, preset, k=K)
    consts = [relax.const(a) for a in bk.kernel_arrays(bsr, sch)] + [relax.const(bias)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, K), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func(bk.bsr_matmul_primfunc(spec, sch, "bsr_layer0"), "bsr_layer0")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, relax.Tuple([x] + consts), out_ty=relax.TensorType((2, 8, N), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), preset.target()), tvm.cpu())
    xv = rng.standard_normal((2, 8, K)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), xv @ w.T + bias, rtol=0, atol=1e-4)


def test_kernel_rejects_a_mismatched_weight():
    kernel = bk.build_bsr_kernel((M, K), N, "4x4")
    other = dense_to_bsr(np.ones((N, K), np.float32), "16x1")
    with pytest.raises(BlockpruneError, match="does not match"):
        kernel(np.zeros((M, K), np.float32), other)


# ---- schedules and targets -------------------------------------------------------------------
def test_schedules_follow_the_vector_unit():
    neon = bk.vector_isa("cortex-a72")
    assert (neon.name, neon.lanes) == ("neon", 4)
    avx512 = bk.vector_isa({"kind": "llvm", "mcpu": "znver5"})
    avx2 = bk.vector_isa({"kind": "llvm", "mcpu": "znver3"})
    assert (avx512.lanes, avx2.lanes) == (16, 8)
    # tall blocks: vectors along the outputs; short ones: along the inputs, reduced at the end
    assert bk.choose_schedule(128, 768, "16x1", isa=avx2, target="x86-64").layout == "n-lanes"
    assert bk.choose_schedule(128, 768, "1x32", isa=avx2, target="x86-64").layout == "k-lanes"
    assert bk.choose_schedule(128, 768, "4x4", isa=avx512, target="x86-64").layout == "k-lanes"
    assert bk.choose_schedule(128, 768, "4x4", target="cortex-a72").layout == "n-lanes"
    s = bk.choose_schedule(128, 768, "32x32", isa=avx512, target="x86-64")
    assert s.lanes == 16 and s.tile_rows * s.slots_per_pass <= avx512.max_acc


@pytest.mark.parametrize("block", ["1x32", "16x1"])
def test_avx512_kernels_compile_to_zmm_fmas(block):
    """This host may lack AVX-512; compiling for znver5 still checks the 16-lane schedules."""
    kernel = bk.build_bsr_kernel((M, K), N, block, target={"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    assert kernel.schedule.isa == "avx512" and kernel.schedule.lanes == 16
    asm = kernel.assembly()
    assert "vfmadd231ps" in asm and "zmm" in asm


def test_unknown_target_lists_the_known_names():
    with pytest.raises(BlockpruneError) as err:
        targets.resolve_target("cortex-a99")
    for name in ("x86-64", "aarch64", "cortex-a53", "cortex-a72", "cortex-a76"):
        assert name in err.value.fix
    with pytest.raises(BlockpruneError, match="JSON"):
        targets.resolve_target("{not json")


def test_presets_build_tvm_targets():
    assert not targets.resolve_target("host").is_cross
    host = targets.resolve_target("x86-64").target()
    assert host.kind.name == "llvm" and int(host.attrs["num-cores"]) >= 1
    a76 = targets.resolve_target("cortex-a76")
    assert a76.arch == "aarch64" and a76.cross_package == "g++-aarch64-linux-gnu"
    assert str(a76.target().attrs["mcpu"]) == "cortex-a76"
    custom = targets.resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert custom.arch == "aarch64" and custom.cross_compiler == "aarch64-linux-gnu-g++"


def test_missing_cross_compiler_names_the_package(monkeypatch):
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(BlockpruneError) as err:
        targets.find_cross_compiler("cortex-a53")
    assert "apt-get install g++-aarch64-linux-gnu" in err.value.fix
    assert targets.find_cross_compiler("x86-64") is None


def test_aarch64_cross_compile_gives_a_neon_elf(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    kernel = bk.build_bsr_kernel((M, K), N, "1x32", bias=True, target="cortex-a72")
    assert kernel.schedule.isa == "neon"
    assert "fmla" in kernel.assembly()  # NEON fused multiply-add
    path = kernel.export_library(str(tmp_path / "bsr_a72.so"))
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit ELF
    assert struct.unpack("<H", header[18:20])[0] == 183  # e_machine = EM_AARCH64
    with pytest.raises(BlockpruneError, match="cannot run here"):
        kernel(np.zeros((M, K), np.float32), dense_to_bsr(np.ones((N, K), np.float32), "1x32"), np.zeros(N))


def test_android_preset_needs_an_ndk(monkeypatch, tmp_path):
    """The Android preset says clearly that it needs an NDK, and finds one where ANDROID_NDK_HOME points."""
    from blockprune.backends.tvm.targets.presets import find_cross_compiler, get_preset

    for var in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    preset = get_preset("android-arm64")
    assert preset.config["mtriple"] == "aarch64-linux-android" and preset.is_cross
    with pytest.raises(BlockpruneError, match="needs the Android NDK") as exc:
        find_cross_compiler(preset)
    assert "ANDROID_NDK_HOME" in exc.value.fix
    fake = tmp_path / "ndk" / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin"
    fake.mkdir(parents=True)
    (fake / preset.cross_compiler).write_text("#!/bin/sh\n")
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path / "ndk"))
    assert find_cross_compiler(preset) == str(fake / preset.cross_compiler)


@pytest.mark.parametrize("block", ["1x32", "16x1"])
def test_x_rows_aliasing_in_l1_are_packed_with_a_pad(block):
    """X rows a multiple of 4 KB long (K = 1024 here, 3072 in BERT-base) are copied into padded
    rows (they would share L1 sets); the schedule says so and the product is unchanged."""
    from dataclasses import replace

    rng = np.random.default_rng(7)
    k = 1024
    sch = bk.choose_schedule(M, N, block, k=k)
    assert sch.x_pad > 0 and bk.choose_schedule(M, N, block, k=768).x_pad == 0
    w = block_sparse_weight(rng, N, k, block, 0.5, empty_rows=1)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((M, k)).astype(np.float32)
    bsr = dense_to_bsr(w, block)
    for schedule in (sch, replace(sch, x_pad=0), replace(sch, k_chunk=256)):
        y = bk.run_bsr_matmul(x, bsr, bias, schedule=schedule)
        np.testing.assert_allclose(y, x @ w.T + bias, rtol=0, atol=1e-4)


# ---- m-lanes (vectors along M; blocks one row tall) ------------------------------------------
def _m_lanes(tm: int, chunk: int, k_chunk: int = 0, lanes: int = 16, isa: str = "avx512"):
    return bk.BSRSchedule("m-lanes", lanes, tm, chunk, isa=isa, k_chunk=k_chunk)


@pytest.mark.parametrize("block,m,tm,chunk,k_chunk", [
    ("1x32", 16, 16, 4, 0),    # one tile, narrow chunk: the per-lane flush
    ("1x32", 13, 16, 4, 0),    # M < one vector: padded X^T, guarded stores
    ("1x32", 40, 32, 16, 32),  # two tiles (the second partial), in-register transposes, K slices
    ("1x16", 20, 16, 16, 32),  # M % 16 != 0: lane-by-lane X^T tail
    ("1x16", 64, 64, 32, 16),  # the transposed flush over several vectors of outputs and tokens
    ("4x4", 40, 16, 3, 16),    # blocks taller than one row: r accumulator sets
    ("1x1", 32, 32, 8, 0),
])
def test_m_lanes_matches_numpy(block, m, tm, chunk, k_chunk):
    """Every shape path of the m-lanes kernel (tiles, tails, slices, flushes) against numpy."""
    rng = np.random.default_rng(zlib.crc32(f"m/{block}/{m}/{tm}".encode()))
    w = block_sparse_weight(rng, N, K, block, 0.5, empty_rows=1)
    x = rng.standard_normal((m, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = bk.run_bsr_matmul(x, dense_to_bsr(w, block), bias, schedule=_m_lanes(tm, chunk, k_chunk))
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(y[:, 0], np.full(m, bias[0], np.float32))  # empty first row


def test_m_lanes_avx2_and_empty_weight():
    """8-lane vectors (AVX2 runs here too), and a weight with no block at all gives the bias."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 24, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    w = block_sparse_weight(rng, N, K, "1x32", 0.6)
    for weight in (w, np.zeros_like(w)):
        y = bk.run_bsr_matmul(x, dense_to_bsr(weight, "1x32"), bias, schedule=_m_lanes(32, 16, 32, 8, "avx2"))
        np.testing.assert_allclose(y, x @ weight.T + bias, rtol=0, atol=1e-4)


def test_m_lanes_is_chosen_for_row_segments_on_x86_with_tokens():
    avx512 = bk.vector_isa({"kind": "llvm", "mcpu": "znver5"})
    avx2 = bk.vector_isa({"kind": "llvm", "mcpu": "znver3"})
    s = bk.choose_schedule(128, 768, "1x32", isa=avx512, target="x86-64", k=3072)
    assert (s.layout, s.lanes, s.tile_rows) == ("m-lanes", 16, 128)
    assert s.k_chunk and 3072 % s.k_chunk == 0 and s.k_chunk * 128 * 4 <= 32 * 1024 and s.x_pad == 0
    s = bk.choose_schedule(128, 768, "1x16", isa=avx512, target="x86-64", k=768)
    assert (s.layout, s.lanes, s.tile_rows, s.k_chunk) == ("m-lanes", 16, 128, 64)
    assert bk.choose_schedule(128, 768, "1x32", isa=avx2, target="x86-64").layout == "k-lanes"  # not faster there
    assert bk.choose_schedule(16, 768, "1x32", isa=avx512, target="x86-64").layout == "k-lanes"  # M < 4 vectors
    assert bk.choose_schedule(128, 768, "1x32", target="cortex-a72").layout == "k-lanes"
    assert bk.choose_schedule(128, 768, "16x1", isa=avx512, target="x86-64").layout == "n-lanes"


def test_m_lanes_default_schedule_bert_shape_with_epilogue():
    """The schedule the default flow gets for BERT-base (M = 128), with bias + GELU + residual."""
    import math

    rng = np.random.default_rng(8)
    k, n = 768, 64
    w = block_sparse_weight(rng, n, k, "1x32", 0.8) * np.float32(2 / math.sqrt(k))
    x = rng.standard_normal((1, 128, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((1, 128, n)).astype(np.float32)
    kern = bk.build_bsr_kernel(x.shape, n, "1x32", bias=True, gelu=True, residual=True)
    if bk.vector_isa("host").name == "avx512":
        assert kern.schedule.layout == "m-lanes" and kern.schedule.k_chunk
    got = kern(x, dense_to_bsr(w, "1x32"), bias, res)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    ref = 0.5 * ref * (1 + np.vectorize(math.erf)(ref / math.sqrt(2))) + res
    assert np.abs(got - ref).max() < 2e-5


def test_m_lanes_compiles_for_neon_and_avx512():
    """Forced m-lanes on NEON (4 lanes) and AVX-512 compile to FMAs on broadcast weights."""
    if shutil.which("aarch64-linux-gnu-g++") is not None:
        kernel = bk.build_bsr_kernel((M * 4, K), N, "1x32", target="cortex-a72", schedule=_m_lanes(32, 8, 32, 4, "neon"))
        assert "fmla" in kernel.assembly()
    kernel = bk.build_bsr_kernel((128, K), N, "1x32", target={"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    assert kernel.schedule.layout == "m-lanes"
    asm = kernel.assembly()
    assert "vfmadd231ps" in asm and "zmm" in asm and "vpermt2ps" in asm  # transposes in registers


def test_m_lanes_arrays_list_each_chunk_by_slice_then_row():
    """The flat per-chunk block lists: every block once, ordered (K slice, row, column)."""
    rng = np.random.default_rng(12)
    w = block_sparse_weight(rng, N, 128, "1x32", 0.5, empty_rows=3)
    bsr = dense_to_bsr(w, "1x32")
    sch = _m_lanes(32, 8, k_chunk=64)
    data, codes, ptr = bk.m_lanes_arrays(bsr, sch)
    ncols = 128 // 32
    assert ptr.shape == (N // 8 + 1,) and ptr[0] == 0 and ptr[-1] == bsr.nnzb
    rebuilt = np.zeros_like(w)
    for ic in range(N // 8):
        seg = codes[ptr[ic]:ptr[ic + 1]]
        rows, cols = ic * 8 + seg // ncols, seg % ncols
        keys = list(zip((cols * 32) // 64, rows, cols))
        assert keys == sorted(keys)
        for b, (row, col) in enumerate(zip(rows, cols)):
            rebuilt[row, col * 32:(col + 1) * 32] = data[ptr[ic] + b]
    np.testing.assert_array_equal(rebuilt, w)
    s = bk.choose_schedule(128, 768, "1x32", isa=bk.vector_isa({"kind": "llvm", "mcpu": "znver5"}),
                           target={"kind": "llvm", "mcpu": "znver5", "num-cores": 2}, k=3072)
    assert s.row_chunk == 128  # X^T of 1.5 MB: long chunks re-read it less often


def test_m_lanes_runs_on_aarch64_under_qemu(tmp_path, aarch64_qemu):
    """m-lanes forced on NEON (4 lanes; the default there stays k-lanes) runs exactly under qemu."""
    from tvm import relax

    from blockprune.backends.tvm.runtime import runner
    from blockprune.backends.tvm.runtime.artifact import Manifest

    rng = np.random.default_rng(21)
    m = 36  # two token tiles of 32, the second partial
    w = block_sparse_weight(rng, N, K, "1x16", 0.5, empty_rows=1)
    bias = rng.standard_normal(N).astype(np.float32)
    bsr = dense_to_bsr(w, "1x16")
    preset = targets.resolve_target("cortex-a72")
    spec = bk.BSRKernelSpec((m, K), N, bsr.block, bias=True, gelu=True)
    sch = _m_lanes(32, 8, 32, 4, "neon")
    consts = [relax.const(a) for a in bk.kernel_arrays(bsr, sch)] + [relax.const(bias)]
    bb = relax.BlockBuilder()
    xv = relax.Var("X", relax.TensorType((m, K), "float32"))
    with bb.function("main", [xv]):
        gv = bb.add_func(bk.bsr_matmul_primfunc(spec, sch, "bsr_layer0"), "bsr_layer0")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, relax.Tuple([xv] + consts), out_ty=relax.TensorType((m, N), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=preset.target())
    ex.export_library(str(tmp_path / "model.so"), fcompile=targets.export_fcompile(preset))
    manifest = Manifest(target={"name": preset.name, "arch": "aarch64", "config": dict(preset.config)},
                        inputs=[{"name": "X", "shape": [m, K], "dtype": "float32"}],
                        outputs=[{"name": "Y", "shape": [m, N], "dtype": "float32"}],
                        source={}, batch=1, seq=m)
    manifest.write(tmp_path)
    x = rng.standard_normal((m, K)).astype(np.float32)
    got = runner.run_qemu(tmp_path, manifest, [x])["Y"]
    import math

    h = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    ref = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    assert np.abs(got - ref).max() < 2e-5
