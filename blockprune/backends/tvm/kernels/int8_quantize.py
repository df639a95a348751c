"""Dynamic per-tensor activation quantization (ONNX ``DynamicQuantizeLinear``) as a TensorIR kernel.

The contract (shared with the ONNX side, issue #15)::

    lo, hi = min(0, min X), max(0, max X);   xs = (hi - lo) / 255
    xz = clip(round_half_even(-lo / xs), 0, 255)
    xq = clip(round_half_even(X / xs) + xz, 0, 255)            (uint8)

``X / xs`` is a true division, not a multiply by ``1 / xs``: onnxruntime (MLAS) divides, and one
ulp of difference moves values that sit on a rounding boundary. An all-zero ``X`` gives
``xs = 1, xz = 0, xq = 0`` as onnxruntime does (checked in the tests; the ONNX reference
would divide by zero).

Why the kernel does not stop at ``xq``: the int8 matmul (:mod:`.int8_kernel`) wants X in a
*packed* form it can read with one vector load per four rows, so the same pass writes

* ``"u8"``:  ``xq[M, K]`` uint8 as ONNX has it (for tests and for other consumers),
* ``"i16"``: ``xp[Mp/8, K/4, 32]`` int16 holding ``xq - xz`` (centred, exact in [-255, 255]):
  element ``(m, k)`` at ``[m // 8, k // 4, 4 * (m % 8) + k % 4]``: blocks of 8 rows, in each
  block the K/4 groups of (8 rows x 4 features) one after the other. A register tile of 8 rows
  reads one contiguous stream. (A plain ``[K/4, Mp*4]`` layout puts a tile's groups 1 KB
  apart; at that power-of-two stride its cache lines fall into 4 of L1's 64 sets.) x86 (``vpmaddwd``) and NEON without dot
  product (``smlal``) multiply this by int16-widened weights with no correction term.
* ``"s8"``:  the same layout in int8 holding ``xq - 128`` (exact in [-128, 127]), for the
  signed dot product ``sdot``; the kernel adds ``-(xz - 128) * rowsum(Wq)`` per output.
* ``"u8p"``: the same layout in uint8 holding ``xq`` itself, for x86 ``vpdpbusd`` (uint8 x int8);
  the kernel (:mod:`.int8_vnni`) adds ``-xz * rowsum(Wq)`` per output.

Rows ``M..Mp`` of the packed forms are zero padding (``Mp`` = M rounded up to
:data:`ROW_ALIGN`) so that every register tile of the matmul reads whole vectors.
Signature: ``name(X, xq_or_xp, xs[1] float32, xz[1] uint8)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blockprune.errors import BlockpruneError

# Packed X rows are padded to a multiple of this: the largest register tile (8 vectors x 4 rows).
ROW_ALIGN = 32
ROW_BLOCK = 8  # rows stored together per group of 4 features (see the module doc)
X_FORMATS = ("u8", "i16", "s8", "u8p")


def padded_rows(m: int) -> int:
    """Rows of the packed X: ``m`` rounded up to :data:`ROW_ALIGN`."""
    return -(-m // ROW_ALIGN) * ROW_ALIGN


@dataclass(frozen=True)
class QuantizeSpec:
    """Static shape and output form of one activation quantizer."""

    x_shape: tuple[int, ...]  # [..., K]; leading dims flatten to M
    x_format: str = "i16"  # "u8" | "i16" | "s8" (see module doc)

    @property
    def m(self) -> int:
        return int(math.prod(self.x_shape[:-1]))

    @property
    def k(self) -> int:
        return int(self.x_shape[-1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.x_format == "u8":
            return (self.m, self.k)
        return (padded_rows(self.m) // ROW_BLOCK, self.k // 4, ROW_BLOCK * 4)

    @property
    def out_dtype(self) -> str:
        return {"u8": "uint8", "i16": "int16", "s8": "int8", "u8p": "uint8"}[self.x_format]

    def check(self) -> None:
        if self.x_format not in X_FORMATS:
            raise BlockpruneError(f"unknown packed-X format {self.x_format!r}", f"use one of {X_FORMATS}")
        if len(self.x_shape) < 2 or any(int(d) < 1 for d in self.x_shape):
            raise BlockpruneError(f"input shape {self.x_shape} is not [M, K] or [B, S, K] with static sizes",
                                  "compile one kernel per static input shape")
        if self.x_format != "u8" and self.k % 4:
            raise BlockpruneError(f"K={self.k} is not a multiple of 4, which the int8 kernels read at once",
                                  "keep this layer in float32 or pad its input features")


# --------------------------------------------------------------------------------------------
# numpy reference (the contract) and packing
# --------------------------------------------------------------------------------------------
def dynamic_quantize_np(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX ``DynamicQuantizeLinear`` in numpy float32: ``(xq uint8, xs, xz)``."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.minimum(np.float32(0), x.min())
    hi = np.maximum(np.float32(0), x.max())
    xs = np.float32((hi - lo) / np.float32(255))
    if xs == 0:  # onnxruntime: scale 1 when the range is empty
        return np.zeros(x.shape, np.uint8), np.float32(1), np.uint8(0)
    xz = np.uint8(np.clip(np.rint(np.float32(-lo) / xs), 0, 255))
    xq = np.clip(np.rint(x / xs) + np.float32(xz), 0, 255).astype(np.uint8)
    return xq, xs, xz


def pack_x_np(xq: np.ndarray, xz: int, x_format: str) -> np.ndarray:
    """``xq[..., K]`` uint8 -> the packed form the kernel writes (reference for tests)."""
    k = xq.shape[-1]
    q = xq.reshape(-1, k).astype(np.int32)
    m, mp = q.shape[0], padded_rows(q.shape[0])
    if x_format == "u8":
        return xq.reshape(m, k).astype(np.uint8)
    dtype = {"i16": np.int16, "s8": np.int8, "u8p": np.uint8}[x_format]
    centred = q - {"i16": int(xz), "s8": 128, "u8p": 0}[x_format]
    full = np.zeros((mp, k), np.int32)
    full[:m] = centred
    blocks = full.reshape(mp // ROW_BLOCK, ROW_BLOCK, k // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks.reshape(mp // ROW_BLOCK, k // 4, ROW_BLOCK * 4)).astype(dtype)


# --------------------------------------------------------------------------------------------
# PrimFunc
# --------------------------------------------------------------------------------------------
def quantize_primfunc(spec: QuantizeSpec, name: str = "dyn_quantize"):
    """Build ``name(X, out, xs, xz)``: min/max, scale and zero point, then round and pack.

    One thread does the min/max (a few microseconds at 128 x 384); the rounding pass runs in
    parallel over rows, 16 lanes (four packed groups) at a time when K allows.
    """
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    spec.check()
    m, k = spec.m, spec.k
    fmt = spec.x_format
    # 16: one AVX-512 vector (two AVX2 ones elsewhere), four packed groups per step
    lanes = next(n for n in (16, 8, 4, 1) if k % n == 0)
    total = m * k
    red = next(n for n in (32, 16, 8) if total % n == 0) if total % 8 == 0 else lanes  # min/max: independent chains

    def f32(v):
        return tirx.FloatImm("float32", v)

    def vec(v, n):
        return v if n == 1 else tirx.Broadcast(v, n)

    def ramp(b, n):
        return b if n == 1 else tirx.Ramp(b, 1, n)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "global_symbol": name})
            x_arg = T.arg("X", T.buffer(spec.x_shape, "float32"))
            out = T.arg("xp", T.buffer(spec.out_shape, spec.out_dtype))
            xs_buf = T.arg("xs", T.buffer((1,), "float32"))
            xz_buf = T.arg("xz", T.buffer((1,), "uint8"))
            # A root block: Relax's reshape-pattern check (run on one-input call_tir) needs one.
            with T.sblock("root"):
                flat = T.decl_buffer((total,), "float32", data=x_arg.data)
                X = T.decl_buffer((m, k), "float32", data=x_arg.data)
                mm = T.alloc_buffer((2, red), "float32", scope="global")  # running min / max vectors
                T.buffer_store(mm, vec(f32(0.0), red), [0, ramp(0, red)])
                T.buffer_store(mm, vec(f32(0.0), red), [1, ramp(0, red)])
                with T.serial(0, total // red) as i:
                    v = tirx.BufferLoad(flat, [ramp(i * red, red)])
                    T.buffer_store(mm, tirx.Min(tirx.BufferLoad(mm, [0, ramp(0, red)]), v), [0, ramp(0, red)])
                    T.buffer_store(mm, tirx.Max(tirx.BufferLoad(mm, [1, ramp(0, red)]), v), [1, ramp(0, red)])
                lo = tirx.BufferLoad(mm, [0, 0])
                hi = tirx.BufferLoad(mm, [1, 0])
                for j in range(1, red):
                    lo = tirx.Min(lo, tirx.BufferLoad(mm, [0, j]))
                    hi = tirx.Max(hi, tirx.BufferLoad(mm, [1, j]))
                # scalars through a small buffer: [lo, hi, scale, divisor, zero point]
                sc = T.alloc_buffer((5,), "float32", scope="global")
                T.buffer_store(sc, lo, [0])
                T.buffer_store(sc, hi, [1])
                scale = (tirx.BufferLoad(sc, [1]) - tirx.BufferLoad(sc, [0])) / f32(255.0)
                T.buffer_store(sc, scale, [2])
                s = tirx.BufferLoad(sc, [2])
                T.buffer_store(sc, tirx.Select(s == f32(0.0), f32(1.0), s), [3])
                div = tirx.BufferLoad(sc, [3])
                zp = tirx.Max(tirx.Min(tirx.nearbyint(f32(0.0) - tirx.BufferLoad(sc, [0]) / div), f32(255.0)), f32(0.0))
                T.buffer_store(sc, zp, [4])
                T.buffer_store(xs_buf, div, [0])
                zpf = tirx.BufferLoad(sc, [4])
                T.buffer_store(xz_buf, tirx.Cast("uint8", zpf), [0])
                # Each row: q = clip(rint(x / div) + zp, 0, 255), then centre and pack.
                with T.parallel(0, m) as row:
                    with T.serial(0, k // lanes) as g:
                        xv = tirx.BufferLoad(X, [row, ramp(g * lanes, lanes)])
                        q = tirx.nearbyint(xv / vec(div, lanes)) + vec(zpf, lanes)
                        q = tirx.Max(tirx.Min(q, vec(f32(255.0), lanes)), vec(f32(0.0), lanes))
                        idt = "int32" if lanes == 1 else f"int32x{lanes}"
                        qi = tirx.Cast(idt, q)
                        if fmt == "u8":
                            odt = "uint8" if lanes == 1 else f"uint8x{lanes}"
                            T.buffer_store(out, tirx.Cast(odt, qi), [row, ramp(g * lanes, lanes)])
                        else:
                            if fmt == "u8p":
                                packed = tirx.Cast(f"uint8x{lanes}", qi)
                            else:
                                base = vec(tirx.Cast("int32", zpf), lanes) if fmt == "i16" else vec(tirx.IntImm("int32", 128), lanes)
                                packed = tirx.Cast(f"{spec.out_dtype}x{lanes}", qi - base)
                            for h in range(lanes // 4):  # each 4 features go to their own group
                                part = packed if lanes == 4 else tirx.Shuffle([packed], list(range(4 * h, 4 * h + 4)))
                                T.buffer_store(out, part, [row // ROW_BLOCK, g * (lanes // 4) + h,
                                                           ramp((row % ROW_BLOCK) * 4, 4)])
                if fmt != "u8" and padded_rows(m) > m:
                    pad = padded_rows(m) - m
                    zero = tirx.Broadcast(tirx.IntImm(spec.out_dtype, 0), 4)
                    with T.serial(0, k // 4) as g:
                        with T.serial(0, pad) as pr:
                            rr = m + pr
                            T.buffer_store(out, zero, [rr // ROW_BLOCK, g, ramp((rr % ROW_BLOCK) * 4, 4)])
    return ib.get()
