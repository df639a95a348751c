"""onnxruntime dense MatMul vs our TVM block-sparse kernel, one Linear at a time.

Why this benchmark: "I pruned the model and it is not faster" is the complaint every sparsity
tool hears. This measures, on this machine and at one thread count for both engines, where
block sparsity pays off for the Linear shapes of BERT-base (M = 128 tokens):
``(K, N)`` = (768, 3072) FFN up, (3072, 768) FFN down, (768, 768) attention projections.

Reported per row: median time, GFLOP/s of *useful* work (2*M*K*N*density / t, i.e. the
flops a dense GEMM would spend on the nonzeros only), % of the measured dense peak (the best of
onnxruntime dense and our kernel run fully dense) and speedup over onnxruntime dense.

TVM_NUM_THREADS is set from --threads before tvm is imported (TVM's pool otherwise uses
hardware_concurrency/2 threads), and onnxruntime gets intra_op_num_threads = --threads.

Clock: each call is timed with both the wall clock and the process CPU clock. On a shared
machine (other jobs running), wall time measures the other jobs as much as ours; with one
thread, the CPU time of a call is what it takes on a core of its own, so ``--clock cpu`` (the
default with --threads 1) is the fair comparison. With more threads CPU time sums the threads
(and counts spin-waiting), so the wall clock is used. Both medians are in the table.

Usage: python benchmarks/bench_bsr_kernel.py [--threads 1] [--runs 25] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from blockprune.bench_timing import cpu_name, time_calls

M = 128
SHAPES = [(768, 3072), (3072, 768), (768, 768)]
BLOCKS = ["1x32", "16x1", "4x4", "32x32"]
SPARSITIES = [0.5, 0.75, 0.9]
RESULTS = Path(__file__).resolve().parent / "results" / "bsr_kernel.md"
ORT = "onnxruntime dense"
TVM_DENSE = "TVM dense GEMM (our kernel, no zeros)"


@dataclass
class Row:
    k: int
    n: int
    engine: str
    block: str
    sparsity: float  # fraction of weights that are zero (measured)
    wall: float  # median seconds, wall clock
    cpu: float  # median seconds, process CPU clock
    schedule: str = ""
    max_err: float = 0.0

    def seconds(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall

    def useful_gflops(self, clock: str) -> float:
        return 2.0 * M * self.k * self.n * (1.0 - self.sparsity) / self.seconds(clock) / 1e9


def block_sparse_weight(rng: np.random.Generator, n: int, k: int, block: str, sparsity: float) -> np.ndarray:
    """W[n, k] with exactly round(sparsity * blocks) blocks zeroed, chosen uniformly."""
    r, c = (int(v) for v in block.split("x"))
    gr, gc = n // r, k // c
    keep = np.ones(gr * gc, dtype=bool)
    keep[rng.permutation(gr * gc)[: round(sparsity * gr * gc)]] = False
    mask = np.repeat(np.repeat(keep.reshape(gr, gc), r, 0), c, 1)
    return rng.standard_normal((n, k)).astype(np.float32) * mask


def ort_dense(w: np.ndarray, x: np.ndarray, threads: int, runs: int) -> tuple[float, float]:
    """onnxruntime MatMul(x, W^T) with W^T a constant initializer (what an exported Linear is)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape[1], w.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")],
    )
    # ir_version 8: onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses (max 13)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return time_calls(lambda: sess.run(None, feed), runs)


def tvm_bsr(w: np.ndarray, x: np.ndarray, block: str, runs: int) -> tuple[tuple[float, float], str, float]:
    """(wall, cpu) medians of our kernel, its schedule, and its max error vs numpy."""
    from blockprune.backends.tvm.kernels.bsr_kernel import build_bsr_kernel
    from blockprune.bsr import dense_to_bsr

    bsr = dense_to_bsr(w, block)
    kernel = build_bsr_kernel(x.shape, w.shape[0], block)
    err = float(np.abs(kernel(x, bsr) - x @ w.T).max())
    s = kernel.schedule
    return time_calls(kernel.prepared_call(x, bsr), runs), f"{s.layout} {s.isa} TI={s.tile_rows}", err


def markdown(rows: list[Row], clock: str, header: str) -> str:
    out = [header, ""]
    for k, n in SHAPES:
        shape_rows = [r for r in rows if (r.k, r.n) == (k, n)]
        if not shape_rows:
            continue
        peak = max(r.useful_gflops(clock) for r in shape_rows if r.sparsity == 0.0)
        ort_t = next(r.seconds(clock) for r in shape_rows if r.engine == ORT)
        out += [f"### M={M}, K={k}, N={n} (dense peak measured: {peak:.1f} GFLOP/s)", "",
                f"| engine | block | sparsity | schedule | {clock} ms | wall ms | useful GFLOP/s | "
                "% dense peak | vs ORT dense |",
                "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in shape_rows:
            t = r.seconds(clock)
            out.append(
                f"| {r.engine} | {r.block or '-'} | {r.sparsity:.0%} | {r.schedule or '-'} | {t * 1e3:.3f} | "
                f"{r.wall * 1e3:.3f} | {r.useful_gflops(clock):.1f} | {100 * r.useful_gflops(clock) / peak:.0f}% | "
                f"{ort_t / t:.2f}x |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
    ap.add_argument("--runs", type=int, default=25, help="timed runs per measurement (median; >= 20)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="clock for the GFLOP/s columns (default: cpu with 1 thread, else wall)")
    ap.add_argument("--quick", action="store_true", help="one shape, 75%% only (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts its thread pool

    import onnxruntime
    import tvm

    shapes = SHAPES[:1] if args.quick else SHAPES
    sparsities = [0.75] if args.quick else SPARSITIES
    rng = np.random.default_rng(0)
    rows: list[Row] = []

    def report(row: Row) -> None:
        rows.append(row)
        print(f"K={row.k} N={row.n} {row.engine} {row.block} {row.sparsity:.0%}: cpu {row.cpu * 1e3:.3f} ms, "
              f"wall {row.wall * 1e3:.3f} ms, {row.useful_gflops(clock):.1f} GFLOP/s ({clock}) "
              f"{row.schedule} err {row.max_err:.1e}", flush=True)

    for k, n in shapes:
        x = rng.standard_normal((M, k)).astype(np.float32)
        w_dense = rng.standard_normal((n, k)).astype(np.float32)
        report(Row(k, n, ORT, "", 0.0, *ort_dense(w_dense, x, args.threads, args.runs)))
        for block in BLOCKS:
            (wall, cpu), sched, err = tvm_bsr(w_dense, x, block, args.runs)
            report(Row(k, n, TVM_DENSE, block, 0.0, wall, cpu, sched, err))
        for block in BLOCKS:
            for s in sparsities:
                w = block_sparse_weight(rng, n, k, block, s)
                (wall, cpu), sched, err = tvm_bsr(w, x, block, args.runs)
                report(Row(k, n, "TVM BSR", block, 1.0 - np.count_nonzero(w) / w.size, wall, cpu, sched, err))
    header = (
        f"## BSR kernel vs onnxruntime dense\n\n"
        f"CPU: {cpu_name()} ({os.cpu_count()} cores visible); threads: {args.threads} for both engines "
        f"(TVM_NUM_THREADS, ORT intra_op_num_threads); medians of {args.runs} timed calls after 3 warm-up "
        f"calls; GFLOP/s from the **{clock}** clock (see the benchmark's docstring).\n"
        f"apache-tvm {tvm.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}. Weights: random values, blocks pruned uniformly at random; "
        f"all TVM results within {max(r.max_err for r in rows):.1e} of numpy.\n"
        f"Useful GFLOP/s = 2*M*K*N*(1-sparsity)/time. Dense peak = best dense GFLOP/s of this shape."
    )
    table = markdown(rows, clock, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
