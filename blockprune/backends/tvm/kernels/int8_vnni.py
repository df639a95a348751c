"""The x86 VNNI int8 matmul: ``vpdpbusd`` with lanes along the *outputs* (dense and BSR).

Same contract as :mod:`.int8_kernel`::

    Y[m, o] = xs * w_scale[o] * sum_k (xq[m, k] - xz) * Wq[o, k]   (+ bias[o], GELU, + R[m, o])

Why a kernel of its own: on CPUs with AVX512-VNNI (or AVX-VNNI) ``vpdpbusd`` multiplies 4 uint8 by
4 int8 and adds the four products *into int32* in one instruction, exactly (no int16 step, unlike
``vpmaddubsw``), so it does 4x the work of the ``vpmaddwd`` + ``vpaddd`` pair per instruction on
half the bytes. onnxruntime uses it (or AMX) on such machines, so the AVX2 kernel cannot keep up
there. It reads X as the quantizer's uint8 ``xq`` itself (packed form ``u8p``) and subtracts the
zero point in the epilogue, ``acc - xz * rowsum(Wq)[o]``, still in int32.

Why lanes along the outputs (the AVX2 kernel has them along the rows): each accumulator then is
``L`` consecutive outputs of one row, so the epilogue (dequantize, bias, GELU, residual) works on
the accumulator as it is and stores it straight into ``Y[m, o:o+L]``; no staging buffer and no
transposition, which at 80% sparsity would cost as much as the products. The four features
``xq[m, 4g:4g+4]`` are one int32 of the packed X (:mod:`.int8_quantize`), broadcast to all
lanes; the weights are re-laid out offline as ``[.., K/4, L]`` int32 words (``L`` outputs x 4
features), one vector load each. A 16x4 block is exactly one 512-bit vector.

Register tile: ``rows`` rows of X x ``vecs`` output vectors (``rows * vecs`` accumulators, at most
24 of the 32 vector registers, leaving room for the weight vectors and a broadcast). Dense:
parallel over groups of ``vecs * L`` outputs; BSR: over block rows, ``r / L`` vectors per block
row (blocks need ``r`` a multiple of ``L``; :func:`~.int8_kernel.choose_int8_schedule` gives the
others to the AVX2 kernel).

Signature: ``name(xp, xs, xz, W[, indices, indptr], w_scale, wsum[, bias][, R], Y)`` with ``W``
int32 ``[N/L, K/4, L]`` (dense) or ``[nnzb, r/L, c/4, L]`` (BSR); :func:`pack_vnni_weight` packs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.kernels.int8_quantize import ROW_BLOCK, padded_rows

VNNI_INTRIN = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
MAX_ACCUMULATORS = 24


@dataclass(frozen=True)
class VnniTile:
    """Register tile of the VNNI kernel: ``rows`` X rows x ``vecs`` vectors of ``lanes`` outputs."""

    lanes: int  # 16 (AVX512-VNNI, zmm) or 8 (AVX-VNNI, ymm)
    rows: int
    vecs: int

    def check(self) -> None:
        if self.lanes not in VNNI_INTRIN:
            raise BlockpruneError(f"VNNI vectors of {self.lanes} lanes", "use 16 (AVX512-VNNI) or 8 (AVX-VNNI)")
        if self.rows < 1 or self.vecs < 1 or self.rows * self.vecs > MAX_ACCUMULATORS:
            raise BlockpruneError(f"VNNI tile {self.rows} rows x {self.vecs} vectors",
                                  f"at most {MAX_ACCUMULATORS} accumulators (32 vector registers)")


def vnni_tile(m: int, vecs_available: int, lanes: int) -> VnniTile:
    """The tile for ``m`` rows when a task has ``vecs_available`` output vectors side by side.

    At least ~10 independent accumulators hide ``vpdpbusd``'s latency (5 cycles, 2 per cycle);
    one output vector (a 16-row block) therefore takes 16 rows, two take 8 x 2, more take 6 x 4.
    """
    vecs = 4 if vecs_available % 4 == 0 else (2 if vecs_available % 2 == 0 else 1)
    rows = {1: 16, 2: 8, 4: 6}[vecs]
    return VnniTile(lanes, max(1, min(rows, m)), vecs)


def pack_vnni_weight(w: np.ndarray, lanes: int) -> np.ndarray:
    """``w[..., r, c]`` int8 -> ``[..., r/L, c/4, L]`` int32 words of (L outputs x 4 features)."""
    *lead, r, c = w.shape
    if r % lanes or c % 4:
        raise BlockpruneError(f"weight rows {r} / columns {c} are not multiples of {lanes} / 4",
                              "use the AVX2 int8 kernel for this block shape")
    t = np.asarray(w, np.int8).reshape(*lead, r // lanes, lanes, c // 4, 4)
    t = np.ascontiguousarray(np.moveaxis(t, -3, -2))  # [..., r/L, c/4, L, 4]
    return t.view(np.int32).reshape(*lead, r // lanes, c // 4, lanes)


class VnniBuilder:
    """Emits the loop nest with TVM's IRBuilder; the register tile is unrolled in Python."""

    def __init__(self, spec, tile: VnniTile) -> None:
        from tvm import tirx

        tile.check()
        self.tirx, self.spec, self.tile = tirx, spec, tile
        self.L = tile.lanes
        self.dense = spec.block is None
        self.r = tile.vecs * self.L if self.dense else spec.block.rows
        self.c = spec.k if self.dense else spec.block.cols
        if self.r % (tile.vecs * self.L) or spec.n % self.r:
            raise BlockpruneError(f"{spec.n} outputs / block height {self.r} do not split into {tile.vecs} "
                                  f"vectors of {self.L}", "use choose_int8_schedule()")
        self.nb = spec.n // self.r

    def build(self, name: str):
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder import tirx as T

        tirx, spec, L = self.tirx, self.spec, self.L
        self.T = T
        m, k, n = spec.m, spec.k, spec.n
        with IRBuilder() as ib:
            with T.prim_func():
                T.func_name(name)
                T.func_attr({"tirx.noalias": True, "global_symbol": name})
                xp = T.arg("xp", T.buffer((padded_rows(m) // ROW_BLOCK, k // 4, ROW_BLOCK * 4), "uint8"))
                self.XS = T.arg("xs", T.buffer((1,), "float32"))
                self.XZ = T.arg("xz", T.buffer((1,), "uint8"))
                if self.dense:
                    self.W = T.arg("W", T.buffer((n // L, k // 4, L), "int32"))
                else:
                    nnzb = tirx.Var("nnzb", "int32")
                    self.W = T.arg("data", T.buffer((nnzb, self.r // L, self.c // 4, L), "int32"))
                    self.I = T.arg("indices", T.buffer((nnzb,), "int32"))
                    self.P = T.arg("indptr", T.buffer((self.nb + 1,), "int32"))
                self.WS = T.arg("w_scale", T.buffer((n,), "float32"))
                self.WSUM = T.arg("wsum", T.buffer((n,), "int32"))
                self.B = T.arg("bias", T.buffer((n,), "float32")) if spec.bias else None
                r_arg = T.arg("R", T.buffer(spec.y_shape, "float32")) if spec.residual else None
                y_arg = T.arg("Y", T.buffer(spec.y_shape, spec.out_dtype))
                # the four uint8 features of a row in a group are one int32 word (broadcast as such)
                self.X = T.decl_buffer((padded_rows(m) // ROW_BLOCK, k // 4, ROW_BLOCK), "int32", data=xp.data)
                self.Y = T.decl_buffer((m, n), spec.out_dtype, data=y_arg.data)
                self.R = T.decl_buffer((m, n), "float32", data=r_arg.data) if r_arg is not None else None
                self._body()
        return ib.get()

    # ---- loops -------------------------------------------------------------------------------
    def _body(self) -> None:
        T, tile, m = self.T, self.tile, self.spec.m
        n_full, tail = m // tile.rows, m % tile.rows
        with T.parallel(0, self.nb) as br:
            self.acc = T.alloc_buffer((tile.rows * tile.vecs, self.L), "int32", scope="global")
            if n_full:
                with T.serial(0, n_full) as mt:
                    self._tile(br, mt * tile.rows, tile.rows)
            if tail:
                self._tile(br, n_full * tile.rows, tail)

    def _tile(self, br, m0, rows: int) -> None:
        for ps in range(self.r // (self.tile.vecs * self.L)):
            self._accumulate(br, ps, m0, rows)
            self._epilogue(br, ps, m0, rows)

    def _accumulate(self, br, ps: int, m0, rows: int) -> None:
        T, tirx, L, V = self.T, self.tirx, self.L, self.tile.vecs
        zero = tirx.Broadcast(tirx.IntImm("int32", 0), L)
        for a in range(rows * V):
            T.buffer_store(self.acc, zero, [a, tirx.Ramp(0, 1, L)])

        def group(xg, wvec):
            """One group of 4 features: V weight vectors x ``rows`` broadcast X words."""
            ws = [wvec(v) for v in range(V)]
            for i in range(rows):
                mr = m0 + i
                xb = tirx.Broadcast(tirx.BufferLoad(self.X, [mr // ROW_BLOCK, xg, mr % ROW_BLOCK]), L)
                for v in range(V):
                    idx = [i * V + v, tirx.Ramp(0, 1, L)]
                    acc = tirx.BufferLoad(self.acc, idx)
                    T.buffer_store(self.acc, self._dot(acc, xb, ws[v]), idx)

        if self.dense:
            with T.serial(0, self.spec.k // 4) as g:
                group(g, lambda v: tirx.BufferLoad(self.W, [br * V + v, g, tirx.Ramp(0, 1, L)]))
        else:
            ngrp = self.c // 4
            with T.serial(tirx.BufferLoad(self.P, [br]), tirx.BufferLoad(self.P, [br + 1])) as b:
                col = tirx.BufferLoad(self.I, [b])
                loop = T.unroll(0, ngrp) if ngrp <= 4 else T.serial(0, ngrp)
                with loop as g:
                    group(col * ngrp + g, lambda v: tirx.BufferLoad(self.W, [b, ps * V + v, g, tirx.Ramp(0, 1, L)]))

    def _dot(self, acc, xb, w):
        """``acc + sum of 4 (uint8 x int8) products`` per lane; LLVM's intrinsic takes the bytes."""
        tirx, L = self.tirx, self.L
        a, b = (tirx.reinterpret(f"int8x{4 * L}", e) for e in (xb, w))
        return tirx.call_llvm_pure_intrin(f"int32x{L}", VNNI_INTRIN[L], acc, a, b)

    def _epilogue(self, br, ps: int, m0, rows: int) -> None:
        """Zero point, dequantize, bias, GELU, residual on each accumulator; one store into Y."""
        from blockprune.backends.tvm.kernels.int8_kernel import gelu_expr

        T, tirx, spec, L, V = self.T, self.tirx, self.spec, self.L, self.tile.vecs
        xs = tirx.BufferLoad(self.XS, [0])
        xz = tirx.Broadcast(tirx.Cast("int32", tirx.BufferLoad(self.XZ, [0])), L)
        for v in range(V):
            n0 = br * self.r + (ps * V + v) * L
            cols = tirx.Ramp(n0, 1, L)
            corr = xz * tirx.BufferLoad(self.WSUM, [cols])
            scale = tirx.Broadcast(xs, L) * tirx.BufferLoad(self.WS, [cols])
            for i in range(rows):
                s = tirx.BufferLoad(self.acc, [i * V + v, tirx.Ramp(0, 1, L)]) - corr
                row = m0 + i
                if spec.out_dtype == "int32":
                    T.buffer_store(self.Y, s, [row, cols])
                    continue
                y = tirx.Cast(f"float32x{L}", s) * scale
                if self.B is not None:
                    y = y + tirx.BufferLoad(self.B, [cols])
                if spec.gelu:
                    y = gelu_expr(tirx, y, L)
                if self.R is not None:
                    y = y + tirx.BufferLoad(self.R, [row, cols])
                T.buffer_store(self.Y, y, [row, cols])
