"""``cumsum`` in GPU builds: the row-scan kernel that replaces TVM's racing scan (issue #13).

RoBERTa's position ids are ``cumsum`` over the padding mask. TVM's GPU scan raced on PoCL: a
mask of twelve ones and four zeros gave ``[1..8, 13..16, 20, 20, 20, 20]``. Every case here is
built through the Mali pipeline's own scheduling, run on PoCL, and compared with numpy:
integers exactly, floats to the bit (the kernel adds in index order, as numpy does). Skipped
only where no OpenCL platform can be had.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.kernels.cumsum_gpu import KERNEL_NAME, row_scan_layout  # noqa: E402
from blockprune.backends.tvm.pipeline.gpu_compile import schedule_for_gpu  # noqa: E402
from blockprune.backends.tvm.targets.gpu_presets import get_gpu_preset  # noqa: E402
from blockprune.backends.tvm.verify import opencl_verify as ov  # noqa: E402

MALI = get_gpu_preset("mali")
_REASON = ov.opencl_unavailable_reason()
needs_opencl = pytest.mark.skipif(_REASON is not None, reason=f"no OpenCL platform: {_REASON}")


def cumsum_module(shape: tuple[int, ...], dtype: str, axis: int, out_dtype: str | None = None,
                  exclusive: bool = False):
    """A Relax module whose ``main`` is one ``cumsum``, as the ONNX importer emits it."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.cumsum(x, axis=axis, dtype=out_dtype, exclusive=exclusive))
        bb.emit_func_output(y)
    return bb.get()


def scheduled_prim_funcs(mod) -> dict:
    """The PrimFuncs of ``mod`` after the Mali pipeline's legalization and dlight scheduling."""
    scheduled, _ = schedule_for_gpu(mod, MALI)
    return {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def run_gpu_cumsum(x: np.ndarray, axis: int, out_dtype: str | None = None, exclusive: bool = False) -> np.ndarray:
    """``cumsum(x)`` built for Mali and run on PoCL, in ``x``'s shape."""
    funcs = scheduled_prim_funcs(cumsum_module(x.shape, str(x.dtype), axis, out_dtype, exclusive))
    assert list(funcs) == [KERNEL_NAME], list(funcs)
    func = funcs[KERNEL_NAME]
    (a_name, a_shape, _), (o_name, o_shape, o_dtype) = ov._param_buffers(func)
    lowered = ov.lower_for_opencl(tvm.IRModule({KERNEL_NAME: func}), MALI)
    arrays = {a_name: x.reshape([int(d) for d in a_shape]),
              o_name: np.full([int(d) for d in o_shape], -7, dtype=o_dtype)}  # not zeros: every slot must be written
    out, launched = ov.run_on_opencl(lowered, KERNEL_NAME, arrays, {}, MALI)
    assert launched, "the scan launched no kernel"
    return out[o_name].reshape(x.shape)


def padded_mask(batch: int, seq: int, dtype: str) -> np.ndarray:
    """Attention masks with ones then trailing zeros, a different length per row."""
    lengths = [max(1, seq - 4 - 3 * b) for b in range(batch)]
    return np.array([[1] * n + [0] * (seq - n) for n in lengths], dtype=dtype)


# ---- the race the kernel replaces ---------------------------------------------------------------
def test_tvm_scan_is_not_in_gpu_builds():
    funcs = scheduled_prim_funcs(cumsum_module((1, 16), "int64", 1))
    assert set(funcs) == {KERNEL_NAME}  # no gpu_2d_continuous_cumsum and its shared-memory scan
    func = funcs[KERNEL_NAME]
    assert "shared" not in func.script() and func.attrs["tirx.is_scheduled"]


def test_layout_covers_rows_with_a_small_group():
    assert row_scan_layout((1, 16), 1, MALI).launch.block == (1, 1, 1)
    big = row_scan_layout((300, 16), -1, MALI)
    assert (big.outer, big.n, big.inner) == (300, 16, 1) and big.group == 64 and big.launch.grid[0] == 5
    mid = row_scan_layout((2, 5, 3), 1, MALI)
    assert (mid.outer, mid.n, mid.inner, mid.group) == (2, 5, 3, 8)
    flat = row_scan_layout((2, 5, 3), None, MALI)
    assert (flat.outer, flat.n, flat.inner) == (1, 30, 1)


# ---- exact results on PoCL ----------------------------------------------------------------------
@needs_opencl
@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_position_ids_of_a_mask_with_trailing_zeros_are_exact(dtype):
    mask = padded_mask(1, 16, dtype)
    got = run_gpu_cumsum(mask, 1)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got[0], [*range(1, 13), 12, 12, 12, 12])


@needs_opencl
def test_many_rows_int32_mask_into_int64_is_exact():
    mask = padded_mask(7, 16, "int32")
    got = run_gpu_cumsum(mask, -1, out_dtype="int64")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.cumsum(mask, axis=1, dtype=np.int64))


@needs_opencl
def test_float_scan_matches_the_sequential_sum_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    got = run_gpu_cumsum(x, 1)
    np.testing.assert_array_equal(got, np.cumsum(x, axis=1, dtype=np.float32))


@needs_opencl
def test_middle_axis_and_exclusive_scans():
    x = np.random.default_rng(1).integers(-5, 6, size=(2, 5, 3)).astype(np.int64)
    np.testing.assert_array_equal(run_gpu_cumsum(x, 1), np.cumsum(x, axis=1))
    excl = np.cumsum(x, axis=2) - x
    np.testing.assert_array_equal(run_gpu_cumsum(x, 2, exclusive=True), excl)
