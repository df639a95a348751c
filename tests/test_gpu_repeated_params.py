"""PoCL harness: PrimFuncs whose parameters share a name (``topi.split``) get one buffer per parameter.

Why: TVM names every output of ``split`` ``T_split``; the harness matched arrays, OpenCL buffers
and kernel arguments by name, so all three outputs of the fused ``Attention``'s q/k/v split
landed in one buffer, on PoCL and in the CPU reference alike. Every kernel "matched" while the
whole-model run of the ``ort-optimized`` exports was off by 6e-2 (issue #13). The compiled
artifact was never affected: the TVM runtime passes distinct pointers.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.verify import opencl_verify as ov  # noqa: E402

_REASON = ov.opencl_unavailable_reason()
needs_opencl = pytest.mark.skipif(_REASON is not None, reason=f"no OpenCL platform: {_REASON}")


def test_distinct_names_follow_tvmscript_renaming():
    assert ov.distinct_names(["lv", "T", "T", "T"]) == ["lv", "T", "T_1", "T_2"]
    assert ov.distinct_names(["a", "b"]) == ["a", "b"]
    assert ov.distinct_names(["T", "T_1", "T"]) == ["T", "T_1", "T_2"]


def _split_module():
    """x[4, 24] -> split into three [4, 8] (q/k/v of a packed projection) -> each plus 1."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            parts = bb.emit(relax.op.split(x, 3, axis=-1))
            outs = [bb.emit(relax.op.add(relax.TupleGetItem(parts, i), relax.const(1.0, "float32"))) for i in range(3)]
            y = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(y)
    return bb.get()


def _split_func(mod):
    name, func = next((gv.name_hint, f) for gv, f in mod.functions.items() if "split" in gv.name_hint)
    return name, func


@needs_opencl
def test_each_split_output_is_its_own_buffer_on_pocl():
    gpu, ref = ov.dlight_gpu_modules(_split_module(), "mali")
    name, func = _split_func(gpu)
    assert len({p.name for p in func.params}) < len(func.params)  # TVM really repeats the name
    lowered = ov.lower_for_opencl(gpu, "mali")
    x = np.arange(4 * 24, dtype=np.float32).reshape(4, 24)
    params = [p[0] for p in ov._param_buffers(func)]
    assert len(set(params)) == len(params)
    arrays, env = ov._bind_inputs(name, func, {params[0]: x}, np.random.default_rng(0))
    gpu_out, _ = ov.run_on_opencl(lowered, name, arrays, env, "mali")
    cpu_out = ov.run_on_cpu(ov.compile_reference(ref), name, arrays, params)
    want = np.split(x, 3, axis=-1)
    for i, pname in enumerate(params[1:]):
        np.testing.assert_array_equal(gpu_out[pname], want[i])
        np.testing.assert_array_equal(cpu_out[pname], want[i])


@needs_opencl
def test_split_kernels_verify_against_their_reference():
    gpu, ref = ov.dlight_gpu_modules(_split_module(), "mali")
    rows = ov.verify_module(gpu, ref, "mali")
    assert any("split" in r.func for r in rows) and all(r.ok for r in rows), ov.format_table(rows)
