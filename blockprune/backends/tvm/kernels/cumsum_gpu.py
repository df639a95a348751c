"""Race-free ``cumsum`` for the OpenCL (Mali/Adreno) pipeline: one work-item scans one row.

Why this exists: for a scan over the last axis TVM's GPU dispatch (``DispatchSortScan``)
substitutes ``gpu_2d_continuous_cumsum``, whose in-group step reads a neighbour's slot of
``__local`` memory and writes its own with no barrier in between. That is only correct when
every work-item of a row runs in lockstep; PoCL does not (a mask of twelve ones and four zeros
scans to ``[1..8, 13..16, 20, 20, 20, 20]``), and a Mali GPU need not either (16-wide hardware
warp, 64+-wide groups). RoBERTa builds its position ids from ``cumsum`` over the padding
mask, so the race turned into wrong embeddings.

What replaces it: :func:`row_scan_pass` (:func:`rewrite_cumsum`), run before TVM's dispatch,
rewrites every ``relax.cumsum`` into ``reshape -> call_tir(row scan) -> reshape`` around an
``[outer, n, inner]`` view of the input (the scan axis in the middle). Each work-item owns one
``(outer, inner)`` pair and adds along the axis serially in a private accumulator, so no two
work-items touch the same element and no barrier is needed. The sums are taken in index order
(the CPU order), so integer results are exact and float results match the CPU scan bit for bit.
The scans we meet are short (the sequence length, one row per batch item); the serial loop
costs ``n`` adds per work-item, negligible next to the encoder's matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from blockprune.backends.tvm.targets.gpu_presets import GPUPreset, LaunchConfig, check_launch

KERNEL_NAME = "blockprune_cumsum_rows"
# What gpu_verify reads to build the CPU reference of the kernel (axis of the [outer, n, inner] view).
SCAN_ATTR = "blockprune.cumsum"
MAX_GROUP = 64  # work-items per group: enough rows per group for large batches, within every preset


@dataclass(frozen=True)
class RowScanLayout:
    """How one ``cumsum`` call maps onto the kernel: ``[outer, n, inner]`` and its launch."""

    outer: int
    n: int
    inner: int
    group: int  # work-items per group

    @property
    def rows(self) -> int:
        return self.outer * self.inner

    @property
    def launch(self) -> LaunchConfig:
        return LaunchConfig((max(1, math.ceil(self.rows / self.group)), 1, 1), (self.group, 1, 1))


def row_scan_layout(shape: tuple[int, ...], axis: int | None, preset: GPUPreset) -> RowScanLayout:
    """The ``[outer, n, inner]`` view of a static ``shape`` scanned along ``axis`` (None: flattened).

    The group is the smallest power of two covering the rows (at most ``MAX_GROUP`` and the
    preset's limit), so a batch-1 scan launches a handful of work-items, not a full group.
    """
    if axis is None:
        outer, n, inner = 1, math.prod(shape), 1
    else:
        axis = axis + len(shape) if axis < 0 else axis
        outer, n, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    cap = min(MAX_GROUP, preset.limits.max_num_threads, preset.limits.max_work_item_sizes[0])
    group = min(cap, 1 << max(0, (outer * inner - 1).bit_length()))
    return RowScanLayout(outer, n, inner, group)


def row_scan_primfunc(layout: RowScanLayout, in_dtype: str, out_dtype: str, exclusive: bool):
    """The scheduled kernel ``(A[outer, n, inner], Out[outer, n, inner])`` for ``layout``.

    Exclusive scans store the running sum before adding the element (ONNX ``exclusive=1``).
    Marked ``tirx.is_scheduled`` so dlight leaves its thread binding alone.
    """
    from tvm.script import tirx as T

    outer, n, inner, group = layout.outer, layout.n, layout.inner, layout.group
    rows, blocks = layout.rows, layout.launch.grid[0]
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, SCAN_ATTR: {"axis": 1, "exclusive": int(exclusive)}}

    @T.prim_func(private=True, s_tir=True)
    def scan(a: T.Buffer((outer, n, inner), in_dtype), out: T.Buffer((outer, n, inner), out_dtype)):
        T.func_attr(attrs)
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(group, thread="threadIdx.x"):
                with T.sblock("scan"):
                    acc = T.sblock_alloc_buffer((1,), out_dtype, scope="local")
                    row: T.let[T.int32] = bx * group + tx
                    if row < rows:
                        acc[0] = T.Cast(out_dtype, 0)
                        for k in T.serial(n):
                            if exclusive:
                                out[row // inner, k, row % inner] = acc[0]
                                acc[0] = acc[0] + T.Cast(out_dtype, a[row // inner, k, row % inner])
                            else:
                                acc[0] = acc[0] + T.Cast(out_dtype, a[row // inner, k, row % inner])
                                out[row // inner, k, row % inner] = acc[0]

    return scan


def _static_shape(ty) -> tuple[int, ...] | None:
    """The shape of a Relax tensor type when every dimension is a constant, else None."""
    import tvm

    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = [d for d in shape.values]
    if not all(isinstance(d, (int, tvm.tirx.IntImm)) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def rewrite_cumsum(mod, preset: GPUPreset):
    """``mod`` with every static-shaped ``relax.cumsum`` replaced by the row-scan kernel.

    A cumsum with a symbolic shape is refused (a BlockpruneError): our builds fix batch and
    sequence, and TVM's scan for it is the one that races.
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from blockprune.errors import BlockpruneError

    cumsum_op = tvm.ir.Op.get("relax.cumsum")

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(cumsum_op)):
                return call
            x = call.args[0]
            shape = _static_shape(x.ty)
            if shape is None:
                raise BlockpruneError(f"cumsum over a tensor of symbolic shape {x.ty} in a GPU build",
                                      "compile with a fixed batch and sequence length (--batch, --seq)")
            attrs = call.attrs
            axis = None if attrs.axis is None else int(attrs.axis)
            in_dtype = str(x.ty.dtype)
            out_dtype = str(attrs.dtype) if attrs.dtype is not None and str(attrs.dtype) else in_dtype
            layout = row_scan_layout(shape, axis, preset)
            check_launch(preset, layout.launch, f"{KERNEL_NAME} for cumsum of {list(shape)}")
            func = row_scan_primfunc(layout, in_dtype, out_dtype, bool(int(attrs.exclusive or 0)))
            gv = self.builder_.add_func(func, KERNEL_NAME)
            view = relax.ShapeExpr([layout.outer, layout.n, layout.inner])
            vdevice = getattr(call.ty, "vdevice", None)
            x3 = self.builder_.emit(relax.call_pure_packed(
                "vm.builtin.reshape", x, view, ty_args=relax.TensorType(view, in_dtype, vdevice=vdevice)))
            y3 = self.builder_.emit(relax.call_tir(
                gv, x3, out_ty=relax.TensorType(view, out_dtype, vdevice=vdevice)))
            return relax.call_pure_packed("vm.builtin.reshape", y3, call.ty.shape, ty_args=call.ty)

    rewriter = _Rewrite(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def row_scan_pass(preset: GPUPreset) -> Any:
    """:func:`rewrite_cumsum` as a module pass, for the GPU pipeline (before TVM's dispatch)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="blockprune_row_scan_cumsum")
    def _pass(mod, _ctx):
        return rewrite_cumsum(mod, preset)

    return _pass
