"""The int8 layer API for the importer: numpy weights + spec in, PrimFuncs + packed constants out.

One quantized Linear is two kernels: the activation quantizer (:mod:`.int8_quantize`, shared by
every layer reading the same X, e.g. Q/K/V) and the matmul (:mod:`.int8_kernel`)::

    layer = int8_layer(wq, w_scale, x_shape=(1, 128, 384), bias=b, block="16x4", target="x86-64")
    # Relax: xp, xs, xz = call_tir(layer.quantize_func, [X], out=layer.quantize_outputs)
    #        Y = call_tir(layer.matmul_func, [xp, xs, xz, *map(relax.const, layer.constants)], out=...)

``wq`` is the int8 ``Wq[out, in]`` (symmetric per output channel, in [-127, 127]) and
``w_scale[out]`` its float32 scales, as the ONNX int8 form stores them. With ``block`` the
weight is stored block-sparse: all-zero blocks of ``wq`` are dropped (exact).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.bsr import dense_to_bsr
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.kernels.int8_kernel import (Int8KernelSpec, Int8Schedule, choose_int8_schedule,
                                                         int8_matmul_primfunc)
from blockprune.backends.tvm.kernels.int8_quantize import QuantizeSpec, dynamic_quantize_np, quantize_primfunc
from blockprune.backends.tvm.kernels.int8_vnni import pack_vnni_weight
from blockprune.backends.tvm.targets.presets import TargetPreset, export_fcompile, resolve_target  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Int8BSR:
    """int8 block-sparse weight: ``data[nnzb, r, c]`` int8, ``indices``, ``indptr`` (as :mod:`blockprune.bsr`)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block: BlockShape

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    def to_dense(self) -> np.ndarray:
        r, c = self.block.rows, self.block.cols
        w = np.zeros(self.shape, np.int8)
        rows = np.repeat(np.arange(self.shape[0] // r), np.diff(self.indptr))
        for b, (i, j) in enumerate(zip(rows, self.indices)):
            w[i * r:(i + 1) * r, j * c:(j + 1) * c] = self.data[b]
        return w


def int8_bsr_from_dense(wq: np.ndarray, block: "BlockShape | str") -> Int8BSR:
    """Keep the blocks of ``wq[out, in]`` (int8) with a nonzero element; exact."""
    wq = np.asarray(wq)
    if wq.dtype != np.int8:
        raise BlockpruneError(f"weights are {wq.dtype}, expected int8", "quantize them first (symmetric int8)")
    bsr = dense_to_bsr(wq.astype(np.float32), block)
    return Int8BSR(bsr.data.astype(np.int8), bsr.indices, bsr.indptr, bsr.shape, bsr.block)


def pack_weights(weight: "np.ndarray | Int8BSR", w_scale: np.ndarray, spec: Int8KernelSpec,
                 schedule: Int8Schedule, bias: np.ndarray | None = None) -> list[np.ndarray]:
    """The matmul's constant arguments in order: ``W[, indices, indptr], w_scale[, wsum][, bias]``.

    Weights are widened to int16 for ``avx2``/``neon`` (the multiply works on int16), kept int8
    for ``sdot`` and re-laid out as int32 words of (L outputs x 4 features) for ``vnni``
    (:func:`.int8_vnni.pack_vnni_weight`); ``wsum`` is the per-output row sum of ``Wq`` (the
    zero-point term of ``sdot`` and ``vnni``, whose X is not centred).
    """
    vnni = schedule.isa == "vnni"
    wdt = np.int16 if schedule.w_dtype == "int16" else np.int8
    if isinstance(weight, Int8BSR):
        if spec.block != weight.block or weight.shape != (spec.n, spec.k):
            raise BlockpruneError(f"BSR weight {weight.shape} block {weight.block} does not match the spec "
                                  f"({spec.n}x{spec.k}, block {spec.block})", "build the spec from the weight")
        data = pack_vnni_weight(weight.data, schedule.out_lanes) if vnni else weight.data.astype(wdt)
        arrays = [np.ascontiguousarray(data), np.ascontiguousarray(weight.indices, np.int32),
                  np.ascontiguousarray(weight.indptr, np.int32)]
        dense = weight.to_dense() if schedule.needs_wsum else None
    else:
        wq = np.asarray(weight)
        if wq.dtype != np.int8 or wq.shape != (spec.n, spec.k):
            raise BlockpruneError(f"weight {wq.dtype}{list(wq.shape)} is not int8 [{spec.n}, {spec.k}]",
                                  "pass Wq[out, in] as int8")
        if spec.block is not None:
            raise BlockpruneError("a dense weight given to a block-sparse spec", "use int8_bsr_from_dense()")
        packed = pack_vnni_weight(wq, schedule.out_lanes) if vnni else wq.astype(wdt)
        arrays, dense = [np.ascontiguousarray(packed)], wq
    arrays.append(np.ascontiguousarray(w_scale, np.float32).reshape(spec.n))
    if schedule.needs_wsum:
        arrays.append(dense.astype(np.int32).sum(axis=1).astype(np.int32))
    if spec.bias:
        if bias is None:
            raise BlockpruneError("the spec has a bias but none was given", "pass bias or build with bias=False")
        arrays.append(np.ascontiguousarray(bias, np.float32).reshape(spec.n))
    elif bias is not None:
        raise BlockpruneError("bias given to a spec without one", "build the spec with bias=True")
    return arrays


@dataclass
class Int8Layer:
    """What the importer needs for one int8 Linear.

    ``quantize_func(X, xp, xs, xz)`` outputs ``quantize_outputs`` (shape, dtype);
    ``matmul_func(xp, xs, xz, *constants[, R], Y)`` outputs ``Y[spec.y_shape]`` in ``spec.out_dtype``.
    """

    spec: Int8KernelSpec
    schedule: Int8Schedule
    quantize_spec: QuantizeSpec
    quantize_func: Any
    matmul_func: Any
    constants: list[np.ndarray]
    quantize_outputs: list[tuple[tuple[int, ...], str]] = field(default_factory=list)


def int8_layer(weight: "np.ndarray | Int8BSR", w_scale: np.ndarray, x_shape: Sequence[int], *,
               bias: np.ndarray | None = None, block: "BlockShape | str | None" = None,
               gelu: bool = False, residual: bool = False, target: Any = "host",
               schedule: Int8Schedule | None = None, out_dtype: str = "float32",
               name: str = "int8_matmul", isa: str | None = None) -> Int8Layer:
    """PrimFuncs and packed constants of an int8 layer (dense, or BSR with ``block``/an Int8BSR).

    ``isa`` forces a kernel family (e.g. ``avx2`` on a VNNI machine, for tests and benchmarks);
    by default the target's best (:func:`.int8_kernel.int8_isa`).
    """
    if isinstance(weight, Int8BSR):
        block = weight.block
    elif block is not None:
        weight = int8_bsr_from_dense(weight, block)
    shape = weight.shape if isinstance(weight, Int8BSR) else np.asarray(weight).shape
    spec = Int8KernelSpec(tuple(int(d) for d in x_shape), int(shape[0]),
                          BlockShape.parse(block) if block is not None else None,
                          bias is not None, gelu, residual, out_dtype)
    spec.check()
    if spec.k != shape[1]:
        raise BlockpruneError(f"input has {spec.k} features but the weight expects {shape[1]}",
                              "pass X[..., in] for a weight W[out, in]")
    schedule = schedule or choose_int8_schedule(spec, target, isa=isa)
    qspec = QuantizeSpec(spec.x_shape, schedule.x_format)
    consts = pack_weights(weight, w_scale, spec, schedule, bias)
    return Int8Layer(spec, schedule, qspec, quantize_primfunc(qspec, f"{name}_quantize"),
                     int8_matmul_primfunc(spec, schedule, name), consts,
                     [(qspec.out_shape, qspec.out_dtype), ((1,), "float32"), ((1,), "uint8")])


# --------------------------------------------------------------------------------------------
# Compiled layer (tests, benchmarks)
# --------------------------------------------------------------------------------------------
@dataclass
class CompiledInt8Layer:
    """Both kernels compiled into one module for one target; call it on float32 X."""

    layer: Int8Layer
    preset: TargetPreset
    executable: Any

    @functools.cached_property
    def _module(self):
        if self.preset.is_cross:
            raise BlockpruneError(f"compiled for {self.preset.name}, which cannot run here",
                                  "export_library() and run it on the board or under qemu")
        return self.executable.jit()

    def prepare(self, x: np.ndarray, residual: np.ndarray | None = None):
        """Device tensors for ``x`` (and R): ``(quantize_fn, matmul_fn, y)`` no-argument callables."""
        import tvm

        L = self.layer
        dev = tvm.cpu()
        xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32).reshape(L.spec.x_shape), dev)
        qouts = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in L.quantize_outputs]
        consts = [tvm.runtime.tensor(c, dev) for c in L.constants]
        if L.spec.residual:
            if residual is None:
                raise BlockpruneError("this layer adds a residual; pass it", "call with residual=R")
            consts.append(tvm.runtime.tensor(np.ascontiguousarray(residual, np.float32).reshape(L.spec.y_shape), dev))
        y = tvm.runtime.tensor(np.zeros(L.spec.y_shape, L.spec.out_dtype), dev)
        qf = self._module[L.quantize_func.attrs["global_symbol"]]
        mf = self._module[L.matmul_func.attrs["global_symbol"]]
        return (lambda: qf(xt, *qouts)), (lambda: mf(*qouts, *consts, y)), y, qouts

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        q, mm, y, _ = self.prepare(x, residual)
        q()
        mm()
        return y.numpy()

    def export_library(self, path: str) -> str:
        fcompile = export_fcompile(self.preset)
        if fcompile is None:
            self.executable.export_library(path)
        else:
            self.executable.export_library(path, fcompile=fcompile)
        return path

    def assembly(self) -> str:
        return self.executable.mod.inspect_source("asm")


def compile_int8_layer(layer: Int8Layer, target: Any = "host") -> CompiledInt8Layer:
    """Compile the quantizer and the matmul of ``layer`` into one module for ``target``."""
    import tvm

    preset = resolve_target(target)
    qname = layer.quantize_func.attrs["global_symbol"]
    mname = layer.matmul_func.attrs["global_symbol"]
    mod = tvm.IRModule({qname: layer.quantize_func, mname: layer.matmul_func})
    return CompiledInt8Layer(layer, preset, tvm.compile(mod, target=tvm.target.Target(json.loads(preset.to_json()))))


# --------------------------------------------------------------------------------------------
# numpy reference of the contract
# --------------------------------------------------------------------------------------------
def int8_reference(x: np.ndarray, wq: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None = None,
                   gelu: bool = False, residual: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(acc int64 [M, N], y float64)``: exact integer sums and the contract's output.

    ``y`` uses exact erf (scipy-free: ``math.erf``), so compare a GELU output with the kernel's
    erf approximation's tolerance (6e-7 absolute in erf).
    """
    import math

    k = x.shape[-1]
    xq, xs, xz = dynamic_quantize_np(x)
    acc = (xq.reshape(-1, k).astype(np.int64) - int(xz)) @ wq.astype(np.int64).T
    y = acc.astype(np.float64) * (np.float64(np.float32(xs)) * w_scale.astype(np.float64))
    if bias is not None:
        y = y + bias.astype(np.float64)
    if gelu:
        y = 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))
    if residual is not None:
        y = y + residual.reshape(y.shape).astype(np.float64)
    return acc, y


def relax_module(layer: Int8Layer):
    """A Relax ``main(X) -> Y`` calling both kernels with the constants embedded.

    This is the wiring the importer does per layer (and what the aarch64 test runs under qemu):
    one ``call_tir`` for the quantizer with three outputs, one for the matmul.
    """
    from tvm import relax

    spec = layer.spec
    bb = relax.BlockBuilder()
    x = relax.Var("X", relax.TensorType(spec.x_shape, "float32"))
    params = [x]
    if spec.residual:
        params.append(relax.Var("R", relax.TensorType(spec.y_shape, "float32")))
    with bb.function("main", params):
        gq = bb.add_func(layer.quantize_func, layer.quantize_func.attrs["global_symbol"])
        gm = bb.add_func(layer.matmul_func, layer.matmul_func.attrs["global_symbol"])
        with bb.dataflow():
            q = bb.emit(relax.call_tir(gq, relax.Tuple([x]),
                                       out_ty=[relax.TensorType(s, d) for s, d in layer.quantize_outputs]))
            args = [bb.emit(relax.TupleGetItem(q, i)) for i in range(3)]
            args += [relax.const(c) for c in layer.constants] + params[1:]
            y = bb.emit(relax.call_tir(gm, relax.Tuple(args), out_ty=relax.TensorType(spec.y_shape, spec.out_dtype)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()
