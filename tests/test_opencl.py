"""Mobile GPU backend: generated OpenCL kernels run on PoCL and match the CPU build.

Tolerance: ``1e-5 + 1e-5 * max|reference|`` on every buffer (float32 sums over at most 64
terms, reordered by the GPU schedule, differ by a few ulps). The BSR kernels are also checked
against numpy's dense ``x @ W.T + b`` so that a wrong reference cannot hide a wrong kernel.
Shapes are tiny: PoCL compiles and runs every kernel on the loaded CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from blockprune.bsr import bsr_to_dense, dense_to_bsr
from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.verify import opencl_verify as ov  # noqa: E402
from blockprune.backends.tvm.kernels.bsr_gpu_kernel import (  # noqa: E402
    GPUBSRSchedule,
    build_gpu_bsr_module,
    choose_gpu_schedule,
    gpu_kernel_inputs,
)
from blockprune.backends.tvm.targets.gpu_presets import (  # noqa: E402
    LaunchConfig,
    check_launch,
    get_gpu_preset,
    resolve_gpu_target,
)

_REASON = ov.opencl_unavailable_reason()
needs_opencl = pytest.mark.skipif(_REASON is not None, reason=f"no OpenCL platform: {_REASON}")
if _REASON is not None:
    print(f"test_opencl: OpenCL tests skipped: {_REASON}")

FUNC = "bsr_matmul_gpu"


def _pruned(n: int, k: int, block: tuple[int, int], density: float, seed: int) -> np.ndarray:
    """A random W[n, k] with whole r x c blocks zeroed (about 1 - density of them)."""
    rng = np.random.default_rng(seed)
    r, c = block
    keep = rng.random((n // r, k // c)) < density
    keep[0, :] = False  # one empty block row: the kernel must write bias only there
    keep[1, 0] = True
    return (rng.standard_normal((n, k)) * np.kron(keep, np.ones((r, c)))).astype(np.float32)


# ---- presets and limits --------------------------------------------------------------------------
def test_presets_carry_device_limits_and_aarch64_host():
    for name in ("mali", "adreno"):
        preset = get_gpu_preset(name)
        tgt = preset.target()
        assert tgt.kind.name == "opencl" and name in list(tgt.keys)
        assert int(tgt.attrs["max_num_threads"]) == preset.limits.max_num_threads
        assert int(tgt.attrs["max_shared_memory_per_block"]) == 32 * 1024
        assert "aarch64" in str(tgt.host.attrs["mtriple"])


def test_launch_check_names_the_exceeded_limit():
    mali = resolve_gpu_target("mali")
    check_launch(mali, LaunchConfig((4, 1, 1), (16, 16, 1), 4096))  # fits: no error
    with pytest.raises(BlockpruneError, match=r"512 work-items per group > 256"):
        check_launch(mali, LaunchConfig((1, 1, 1), (32, 16, 1)), "k")
    with pytest.raises(BlockpruneError, match=r"local memory > 32768"):
        check_launch(mali, LaunchConfig((1, 1, 1), (8, 1, 1), 40000), "k")


def test_bad_inputs_are_refused():
    with pytest.raises(BlockpruneError, match="unknown GPU target"):
        resolve_gpu_target("powervr")
    with pytest.raises(BlockpruneError, match="more than the 256 work-items"):
        choose_gpu_schedule(8, 512, "512x1", "mali")
    with pytest.raises(BlockpruneError, match="does not divide"):
        build_gpu_bsr_module((4, 30), 16, "4x4")
    with pytest.raises(BlockpruneError, match="cannot launch on mali"):
        build_gpu_bsr_module((64, 16), 16, "16x1", schedule=GPUBSRSchedule(16, 32, 1, False))


# ---- BSR kernels on PoCL ---------------------------------------------------------------------------
@needs_opencl
@pytest.mark.parametrize("block, m, target", [
    ((1, 8), 20, "mali"),  # 1xw: work-items over rows of X, X staged, 2 M tiles with a tail
    ((8, 1), 6, "mali"),  # hx1: lanes over the column segment, no staging
    ((4, 4), 20, "adreno"),  # rxc: both
])
def test_bsr_gpu_kernel_matches_cpu_and_numpy(block, m, target):
    n, k = 16, 32
    w = _pruned(n, k, block, density=0.4, seed=sum(block) + m)
    bsr = dense_to_bsr(w, block)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    gpu, ref, sch, spec = build_gpu_bsr_module((m, k), n, block, bias=True, target=target)
    inputs = gpu_kernel_inputs(x, bsr, bias)

    rows = ov.verify_module(gpu, ref, target, {FUNC: inputs})
    assert len(rows) == 1 and rows[0].ok, ov.format_table(rows)
    assert rows[0].launch == sch.launch(spec)  # derived from TIR == what the schedule intended
    assert rows[0].launch.grid[0] == n // block[0]

    # The PoCL result itself against numpy (the reference could share a bug with the kernel).
    lowered = ov.lower_for_opencl(gpu, target)
    arrays = dict(inputs, Y=np.full((m, n), np.nan, np.float32))
    out, _ = ov.run_on_opencl(lowered, FUNC, arrays, {"nnzb": bsr.nnzb}, resolve_gpu_target(target))
    expect = x @ bsr_to_dense(bsr).T + bias
    np.testing.assert_allclose(out["Y"], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["Y"][:, : block[0]], np.broadcast_to(bias[: block[0]], (m, block[0])))


@needs_opencl
def test_bsr_kernel_source_signature_order_is_by_name():
    gpu, _, _, _ = build_gpu_bsr_module((4, 16), 8, "4x4", bias=True)
    lowered = ov.lower_for_opencl(gpu, "mali")
    names = [p for _, p in lowered.signatures[f"{FUNC}_kernel"]]
    assert names == sorted(names)  # X, Y, bias, data, indices, indptr: not the PrimFunc order
    assert "barrier(CLK_LOCAL_MEM_FENCE)" in lowered.source


# ---- dense ops scheduled by dlight ---------------------------------------------------------------------
def _tiny_relax_module():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 32), "float32"))
    g = relax.Var("g", relax.TensorType((32,), "float32"))
    b = relax.Var("b", relax.TensorType((32,), "float32"))
    with bb.function("main", [x, w, g, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            s = bb.emit(relax.op.nn.softmax(y, axis=-1))
            z = bb.emit_output(relax.op.nn.layer_norm(s, g, b, axes=[-1]))
        bb.emit_func_output(z)
    return bb.get()


@needs_opencl
def test_dlight_dense_kernels_match_cpu_kernel_by_kernel():
    gpu, ref = ov.dlight_gpu_modules(_tiny_relax_module(), "mali")
    rows = ov.verify_module(gpu, ref, "mali")
    assert {r.func for r in rows} == {"matmul", "softmax", "layer_norm"}, ov.format_table(rows)
    assert all(r.ok for r in rows), ov.format_table(rows)
    assert all(r.launch.threads_per_group > 1 for r in rows)  # really scheduled for a GPU


@needs_opencl
def test_unscheduled_function_is_refused_by_name():
    _, ref = ov.dlight_gpu_modules(_tiny_relax_module(), "mali")
    with pytest.raises(BlockpruneError, match="launch configuration of 'matmul'"):
        ov.verify_module(ref, ref, "mali")


@needs_opencl
def test_index_arrays_must_be_given():
    gpu, ref, _, _ = build_gpu_bsr_module((4, 16), 8, "4x4")
    with pytest.raises(BlockpruneError, match="integer parameter 'indices' needs real values"):
        ov.verify_module(gpu, ref, "mali", {FUNC: {"X": np.zeros((4, 16), np.float32),
                                                   "data": np.zeros((2, 4, 4), np.float32)}})


def test_missing_opencl_platform_says_how_to_install(without_pyopencl):
    with pytest.raises(BlockpruneError, match="apt-get install pocl-opencl-icd ocl-icd-opencl-dev"):
        ov._opencl_context()


@needs_opencl
def test_a_new_context_does_not_reuse_programs_built_in_the_old_one():
    """CI failed with INVALID_CONTEXT: a test that hides pyopencl drops the cached context, and a
    later run of an already-built source got the old context's program on the new queue."""
    m, n, k = 4, 8, 16
    w = _pruned(n, k, (4, 4), density=0.5, seed=3)
    bsr = dense_to_bsr(w, (4, 4))
    x = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
    gpu, _, _, _ = build_gpu_bsr_module((m, k), n, "4x4", bias=False, target="mali")
    lowered = ov.lower_for_opencl(gpu, "mali")
    inputs = gpu_kernel_inputs(x, bsr, None)
    expect = x @ bsr_to_dense(bsr).T
    for _ in range(2):  # the second run builds in a fresh context
        arrays = dict(inputs, Y=np.full((m, n), np.nan, np.float32))
        out, _ = ov.run_on_opencl(lowered, FUNC, arrays, {"nnzb": bsr.nnzb}, resolve_gpu_target("mali"))
        np.testing.assert_allclose(out["Y"], expect, rtol=1e-5, atol=1e-5)
        ov._opencl_context.cache_clear()
