"""OpenCL (mobile GPU) TensorIR kernel for ``Y = X @ W^T (+ bias)`` with ``W[N, K]`` in BSR.

Same computation and signature as the CPU kernel in :mod:`.bsr_kernel` (``X[M, K]`` or
``[B, S, K]``, ``W`` in the PyTorch ``[out, in]`` layout, block ``r x c``), mapped to a GPU:

* **Block rows over work-groups** (``blockIdx.x``), **M tiles** over ``blockIdx.y``. All
  work-items of a group walk the same block row, so the block loop bounds (``indptr``) are
  uniform: no divergence, and barriers inside the loop are legal.
* **Output lanes over work-items** (``threadIdx.x``, one per output row of the block). The
  block data is stored transposed, ``[nnzb, c, r]`` (like the CPU ``n-lanes`` layout), so for
  one input feature the ``r`` work-items of a row read ``r`` consecutive floats: one
  coalesced transaction. ``Y`` is written the same way. ``threadIdx.y`` spans rows of ``X``;
  each work-item keeps ``rows_per_thread`` rows of accumulators in registers, so one weight
  load feeds several FMAs.
* **Local-memory staging** of the ``X`` tile (``rows x c``) of each block when the block is
  wide (``c >= 4``): the group loads it once, coalesced along ``c``, and each value is then
  reused by all ``r`` lanes. For ``hx1`` blocks the tile is one column; staging would cost a
  barrier pair per block for no reuse, so those kernels read ``X`` directly (the ``r`` lanes
  of a row read the same address, which the cache broadcasts).

The three block modes fall out of one generator: ``1xw`` (``r = 1``: work-items over rows of
``X``, weights broadcast, ``X`` staged), ``hx1`` (``c = 1``: lanes over the column segment,
no staging), ``rxc`` (both). ``nnzb`` stays symbolic, as on the CPU.

Kernel signature: ``name(X, data, indices, indptr[, bias], Y)`` with the arrays from
:func:`gpu_kernel_arrays`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.kernels.bsr_kernel import BSRKernelSpec
from blockprune.backends.tvm.targets.gpu_presets import GPUPreset, LaunchConfig, resolve_gpu_target

# Work-items per group we aim for: big enough to hide latency on Mali (which schedules
# threads in warps of 4-16) and Adreno (waves of 64-128), small enough to give many groups.
_TARGET_GROUP_SIZE = 128
_MAX_ROWS_PER_THREAD = 4  # register tile along M: accumulators per work-item
_STAGE_MIN_COLS = 4  # stage X in local memory when a block is at least this wide


@dataclass(frozen=True)
class GPUBSRSchedule:
    """Work-group geometry of the GPU kernel; :func:`choose_gpu_schedule` picks one."""

    lanes: int  # threadIdx.x extent: output rows of a block (= r)
    row_threads: int  # threadIdx.y extent: rows of X per work-group pass
    rows_per_thread: int  # accumulators per work-item (rows row_threads apart)
    stage_x: bool  # stage the X tile of each block in local memory

    def __post_init__(self) -> None:
        if min(self.lanes, self.row_threads, self.rows_per_thread) < 1:
            raise BlockpruneError(f"invalid GPU BSR schedule {self}",
                                  "lanes, row_threads and rows_per_thread must be >= 1")

    @property
    def group_size(self) -> int:
        return self.lanes * self.row_threads

    @property
    def m_tile(self) -> int:
        """Rows of X one work-group computes."""
        return self.row_threads * self.rows_per_thread

    def launch(self, spec: BSRKernelSpec) -> LaunchConfig:
        """Grid and work-group sizes of the kernel for ``spec`` (what the TIR binds)."""
        grid = (spec.n // spec.block.rows, math.ceil(spec.m / self.m_tile), 1)
        return LaunchConfig(grid=grid, block=(self.lanes, self.row_threads, 1),
                            local_bytes=self.local_bytes(spec.block))

    def local_bytes(self, block: BlockShape) -> int:
        return 4 * self.m_tile * block.cols if self.stage_x else 0


def choose_gpu_schedule(m: int, n: int, block: "BlockShape | str", target: Any = "mali") -> GPUBSRSchedule:
    """Work-group shape for ``M x N`` outputs with ``r x c`` blocks on a GPU preset.

    ``lanes = r`` (one work-item per output of a block row); rows of X fill the group up to
    ~128 work-items; a register tile of up to 4 rows per work-item; staging when ``c >= 4``
    and the tile fits the preset's local memory. Refuses blocks taller than a work-group.
    """
    block = BlockShape.parse(block)
    preset = resolve_gpu_target(target)
    r, c = block.rows, block.cols
    max_threads = preset.limits.max_num_threads
    if r > max_threads or r > preset.limits.max_work_item_sizes[0]:
        raise BlockpruneError(
            f"block {block} has {r} output rows, more than the {max_threads} work-items of a "
            f"work-group on {preset.name}",
            "use blocks at most that tall on GPUs (e.g. 32x1, 16x16, 1x32)",
        )
    budget = max(1, min(max_threads, _TARGET_GROUP_SIZE) // r)
    row_threads = 1
    while row_threads * 2 <= budget and row_threads < m:
        row_threads *= 2
    rows_per_thread = max(1, min(_MAX_ROWS_PER_THREAD, math.ceil(m / row_threads)))
    stage = c >= _STAGE_MIN_COLS
    if stage and 4 * row_threads * rows_per_thread * c > preset.limits.max_shared_memory_per_block:
        stage = False  # the tile would not fit: read X from global memory instead
    return GPUBSRSchedule(r, row_threads, rows_per_thread, stage)


def bsr_gpu_primfunc(spec: BSRKernelSpec, schedule: GPUBSRSchedule, name: str = "bsr_matmul_gpu"):
    """Build the thread-bound TensorIR PrimFunc ``name(X, data, indices, indptr[, bias], Y)``."""
    spec.check()
    if schedule.lanes != spec.block.rows:
        raise BlockpruneError(
            f"schedule has {schedule.lanes} lanes but the block {spec.block} has {spec.block.rows} rows",
            "use choose_gpu_schedule(), which sets lanes = block rows",
        )
    return _GPUKernelBuilder(spec, schedule).build(name)


def bsr_reference_primfunc(spec: BSRKernelSpec, name: str = "bsr_matmul_gpu"):
    """The same computation and signature as plain serial loops: the CPU (llvm) reference.

    The GPU kernel cannot be compiled for a CPU (thread bindings, local memory, barriers), so
    :mod:`.opencl_verify` compares it with this function, which shares the argument layout
    and has no schedule that could hide a bug.
    """
    spec.check()
    return _GPUKernelBuilder(spec, None).build(name)


def gpu_kernel_arrays(bsr: BSRMatrix) -> list[np.ndarray]:
    """``[data [nnzb, c, r], indices, indptr]`` as the GPU kernel takes them."""
    data = np.ascontiguousarray(bsr.data.transpose(0, 2, 1), dtype=np.float32)
    return [data, np.ascontiguousarray(bsr.indices), np.ascontiguousarray(bsr.indptr)]


def gpu_kernel_inputs(x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The kernel's inputs by parameter name, for :func:`.opencl_verify.verify_module`.

    Random ``indices``/``indptr`` would read out of bounds, so BSR kernels need real ones.
    """
    data, indices, indptr = gpu_kernel_arrays(bsr)
    inputs = {"X": np.ascontiguousarray(x, dtype=np.float32), "data": data,
              "indices": indices, "indptr": indptr}
    if bias is not None:
        inputs["bias"] = np.ascontiguousarray(bias, dtype=np.float32).reshape(bsr.shape[0])
    return inputs


class _GPUKernelBuilder:
    """Emits the kernel with TVM's IRBuilder; ``sch=None`` gives the serial reference."""

    def __init__(self, spec: BSRKernelSpec, sch: GPUBSRSchedule | None) -> None:
        from tvm import tirx

        self.tirx, self.spec, self.sch = tirx, spec, sch
        self.r, self.c = spec.block.rows, spec.block.cols
        self.nb = spec.n // self.r

    def build(self, name: str):
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder import tirx as T

        spec, r, c = self.spec, self.r, self.c
        m, k, n = spec.m, spec.k, spec.n
        self.T = T
        nnzb = self.tirx.Var("nnzb", "int32")
        with IRBuilder() as ib:
            with T.prim_func():
                T.func_name(name)
                T.func_attr({"tirx.noalias": True, "global_symbol": name})
                x_arg = T.arg("X", T.buffer(spec.x_shape, "float32"))
                self.D = T.arg("data", T.buffer((nnzb, c, r), "float32"))
                self.I = T.arg("indices", T.buffer((nnzb,), "int32"))
                self.P = T.arg("indptr", T.buffer((self.nb + 1,), "int32"))
                self.B = T.arg("bias", T.buffer((n,), "float32")) if spec.bias else None
                y_arg = T.arg("Y", T.buffer(spec.y_shape, "float32"))
                if len(spec.x_shape) == 2:
                    self.X, self.Y = x_arg, y_arg
                else:  # [B, S, K] -> [M, K] views of the same memory
                    self.X = T.decl_buffer((m, k), "float32", data=x_arg.data)
                    self.Y = T.decl_buffer((m, n), "float32", data=y_arg.data)
                if self.sch is None:
                    self._reference_body()
                else:
                    self._gpu_body()
        return ib.get()

    def _f32(self, v: float):
        return self.tirx.FloatImm("float32", v)

    def _load(self, buf, idx: list):
        return self.tirx.BufferLoad(buf, idx)

    def _start(self, out):
        return self._load(self.B, [out]) if self.B is not None else self._f32(0.0)

    # ---- reference: Y[i, j] = bias[j] + sum over kept blocks, serial ---------------------------
    def _reference_body(self) -> None:
        T, r, c = self.T, self.r, self.c
        acc = T.alloc_buffer((1,), "float32", scope="global")
        with T.serial(0, self.spec.m) as i:
            with T.serial(0, self.nb) as br:
                with T.serial(0, r) as lane:
                    T.buffer_store(acc, self._start(br * r + lane), [0])
                    with T.serial(self._load(self.P, [br]), self._load(self.P, [br + 1])) as b:
                        with T.serial(0, c) as kk:
                            x = self._load(self.X, [i, self._load(self.I, [b]) * c + kk])
                            w = self._load(self.D, [b, kk, lane])
                            T.buffer_store(acc, self._load(acc, [0]) + x * w, [0])
                    T.buffer_store(self.Y, self._load(acc, [0]), [i, br * r + lane])

    # ---- GPU kernel -----------------------------------------------------------------------------
    def _gpu_body(self) -> None:
        T, sch, spec, r, c = self.T, self.sch, self.spec, self.r, self.c
        m = spec.m
        tile, rpt, ty_n = sch.m_tile, sch.rows_per_thread, sch.row_threads
        guard_m = m % tile != 0
        with T.launch_thread("blockIdx.x", self.nb) as br:
            with T.launch_thread("blockIdx.y", math.ceil(m / tile)) as mt:
                with T.launch_thread("threadIdx.x", sch.lanes) as lane:
                    with T.launch_thread("threadIdx.y", ty_n) as ty:
                        acc = T.alloc_buffer((rpt,), "float32", scope="local")
                        xs = (T.alloc_buffer((tile * c,), "float32", scope="shared")
                              if sch.stage_x else None)
                        out = br * r + lane
                        m0 = mt * tile
                        for j in range(rpt):
                            T.buffer_store(acc, self._start(out), [j])
                        with T.serial(self._load(self.P, [br]), self._load(self.P, [br + 1])) as b:
                            col = self._load(self.I, [b])
                            if xs is not None:
                                self._stage(xs, col, m0, lane, ty, guard_m)
                            with T.serial(0, c) as kk:
                                w = self._load(self.D, [b, kk, lane])
                                for j in range(rpt):
                                    row = ty + j * ty_n
                                    if xs is not None:
                                        x = self._load(xs, [row * c + kk])
                                    else:
                                        mi = m0 + row
                                        x = self._load(self.X, [T.min(mi, m - 1) if guard_m else mi, col * c + kk])
                                    T.buffer_store(acc, self._load(acc, [j]) + x * w, [j])
                            if xs is not None:  # the next block's tile must not overwrite this one early
                                T.evaluate(T.tvm_storage_sync("shared"))
                        for j in range(rpt):
                            mi = m0 + ty + j * ty_n
                            if guard_m:
                                with T.If(mi < m):
                                    with T.Then():
                                        T.buffer_store(self.Y, self._load(acc, [j]), [mi, out])
                            else:
                                T.buffer_store(self.Y, self._load(acc, [j]), [mi, out])

    def _stage(self, xs, col, m0, lane, ty, guard_m: bool) -> None:
        """Cooperatively copy X[m0 : m0+tile, col*c : col*c+c] into local memory, coalesced."""
        T, sch, c, m = self.T, self.sch, self.c, self.spec.m
        total, group = sch.m_tile * c, sch.group_size
        tid = ty * sch.lanes + lane
        for step in range(math.ceil(total / group)):
            e = tid + step * group
            row, kk = e // c, e % c
            # Rows past M (last tile) load row M-1: harmless, their outputs are never stored.
            src = self._load(self.X, [T.min(m0 + row, m - 1) if guard_m else m0 + row, col * c + kk])
            if (step + 1) * group > total:
                with T.If(e < total):
                    with T.Then():
                        T.buffer_store(xs, src, [e])
            else:
                T.buffer_store(xs, src, [e])
        T.evaluate(T.tvm_storage_sync("shared"))


def build_gpu_bsr_module(x_shape, n: int, block: "BlockShape | str", *, bias: bool = False,
                         target: Any = "mali", schedule: GPUBSRSchedule | None = None,
                         name: str = "bsr_matmul_gpu"):
    """``(gpu IRModule, reference IRModule, schedule, spec)`` for one static shape.

    The GPU module's launch configuration is checked against the preset's limits here, so a
    schedule that a phone would refuse fails at build time with the limit named.
    """
    import tvm

    from blockprune.backends.tvm.targets.gpu_presets import check_launch

    preset: GPUPreset = resolve_gpu_target(target)
    spec = BSRKernelSpec(tuple(int(d) for d in x_shape), int(n), BlockShape.parse(block), bool(bias))
    spec.check()
    schedule = schedule or choose_gpu_schedule(spec.m, spec.n, spec.block, preset)
    check_launch(preset, schedule.launch(spec), name)
    gpu = tvm.IRModule({name: bsr_gpu_primfunc(spec, schedule, name)})
    ref = tvm.IRModule({name: bsr_reference_primfunc(spec, name)})
    return gpu, ref, schedule, spec
