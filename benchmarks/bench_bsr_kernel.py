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

import numpy as np

M = 128
SHAPES = [(768, 3072), (3072, 768), (768, 768)]
BLOCKS = ["1x32", "16x1", "4x4", "32x32"]
SPARSITIES = [0.5, 0.75, 0.9]
RESULTS = Path(__file__).resolve().parent / "results" / "bsr_kernel.md"


@dataclass
class Row:
    k: int
    n: int
    engine: str
    block: str
    sparsity: float  # fraction of weights that are zero (measured)
    seconds: float
    layout: str = ""

    @property
    def useful_gflops(self) -> float:
        return 2.0 * M * self.k * self.n * (1.0 - self.sparsity) / self.seconds / 1e9


def block_sparse_weight(rng: np.random.Generator, n: int, k: int, block: str, sparsity: float) -> np.ndarray:
    """W[n, k] with exactly round(sparsity * blocks) blocks zeroed, chosen uniformly."""
    r, c = (int(v) for v in block.split("x"))
    gr, gc = n // r, k // c
    keep = np.ones(gr * gc, dtype=bool)
    keep[rng.permutation(gr * gc)[: round(sparsity * gr * gc)]] = False
    mask = np.repeat(np.repeat(keep.reshape(gr, gc), r, 0), c, 1)
    return rng.standard_normal((n, k)).astype(np.float32) * mask


def ort_dense_seconds(w: np.ndarray, x: np.ndarray, threads: int, runs: int) -> float:
    """Median seconds of an onnxruntime MatMul(x, W^T) with W^T a constant initializer."""
    import onnx
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
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def tvm_seconds(w: np.ndarray, x: np.ndarray, block: str, runs: int) -> tuple[float, str, float]:
    """Median seconds of our kernel (+ its layout/tile and max error vs numpy)."""
    from blockprune.backends.tvm.bsr_kernel import build_bsr_kernel
    from blockprune.bsr import dense_to_bsr

    bsr = dense_to_bsr(w, block)
    kernel = build_bsr_kernel(x.shape, w.shape[0], block)
    err = float(np.abs(kernel(x, bsr) - x @ w.T).max())
    samples = kernel.time(x, bsr, number=3, repeat=runs)
    s = kernel.schedule
    return float(np.median(samples)), f"{s.layout} {s.isa} TI={s.tile_rows}", err


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[Row], threads: int, runs: int, header: str) -> str:
    out = [header, ""]
    for k, n in SHAPES:
        shape_rows = [r for r in rows if (r.k, r.n) == (k, n)]
        if not shape_rows:
            continue
        dense = [r for r in shape_rows if r.sparsity == 0.0]
        peak = max(r.useful_gflops for r in dense)
        ort_t = next(r.seconds for r in shape_rows if r.engine == "onnxruntime dense")
        out += [f"### M={M}, K={k}, N={n} (dense peak measured: {peak:.1f} GFLOP/s)", "",
                "| engine | block | sparsity | schedule | median ms | useful GFLOP/s | % dense peak | vs ORT dense |",
                "|---|---|---|---|---:|---:|---:|---:|"]
        for r in shape_rows:
            out.append(
                f"| {r.engine} | {r.block or '-'} | {r.sparsity:.0%} | {r.layout or '-'} | {r.seconds * 1e3:.3f} | "
                f"{r.useful_gflops:.1f} | {100 * r.useful_gflops / peak:.0f}% | {ort_t / r.seconds:.2f}x |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
    ap.add_argument("--runs", type=int, default=25, help="timed runs per measurement (median; >= 20)")
    ap.add_argument("--quick", action="store_true", help="one shape, 75%% only (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts its thread pool

    import onnxruntime
    import tvm

    shapes = SHAPES[:1] if args.quick else SHAPES
    sparsities = [0.75] if args.quick else SPARSITIES
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    for k, n in shapes:
        x = rng.standard_normal((M, k)).astype(np.float32)
        w_dense = rng.standard_normal((n, k)).astype(np.float32)
        t = ort_dense_seconds(w_dense, x, args.threads, args.runs)
        rows.append(Row(k, n, "onnxruntime dense", "", 0.0, t))
        print(f"K={k} N={n} onnxruntime dense {t * 1e3:.3f} ms {rows[-1].useful_gflops:.1f} GFLOP/s", flush=True)
        for block in BLOCKS:
            t, sched, err = tvm_seconds(w_dense, x, block, args.runs)
            rows.append(Row(k, n, "TVM dense GEMM (our kernel, no zeros)", block, 0.0, t, sched))
            print(f"  {block} dense {t * 1e3:.3f} ms {rows[-1].useful_gflops:.1f} GFLOP/s err {err:.1e}", flush=True)
        for block in BLOCKS:
            for s in sparsities:
                w = block_sparse_weight(rng, n, k, block, s)
                t, sched, err = tvm_seconds(w, x, block, args.runs)
                sparsity = 1.0 - np.count_nonzero(w) / w.size
                rows.append(Row(k, n, "TVM BSR", block, sparsity, t, sched))
                print(f"  {block} {sparsity:.0%} {t * 1e3:.3f} ms {rows[-1].useful_gflops:.1f} GFLOP/s "
                      f"err {err:.1e} [{sched}]", flush=True)
    header = (
        f"## BSR kernel vs onnxruntime dense\n\n"
        f"CPU: {cpu_name()} ({os.cpu_count()} cores visible), threads: {args.threads} for both engines "
        f"(TVM_NUM_THREADS, ORT intra_op_num_threads); medians of {args.runs} timed runs "
        f"(TVM: time_evaluator, 3 calls per sample; ORT: session.run wall time).\n"
        f"apache-tvm {tvm.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}. Weights: random values, blocks pruned uniformly at random.\n"
        f"Useful GFLOP/s = 2*M*K*N*(1-sparsity)/time. Dense peak = best dense GFLOP/s of this shape."
    )
    table = markdown(rows, args.threads, args.runs, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
