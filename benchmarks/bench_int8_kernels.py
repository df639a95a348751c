"""int8 Linear layers: our TVM int8 kernels (dense and block-sparse) vs onnxruntime fp32 and int8.

Why: issue #15's bar is what a user gets from ``onnxruntime.quantization.quantize_dynamic`` (1.6x
fp32 on MiniLM); blockprune must match it with int8 dense and beat it with int8 + blocks. This
times one Linear ``Y = X @ W^T + b`` (M = 128 tokens) per engine, on the MiniLM-L6 shapes
(N x K = 384x384 Q/K/V/O, 1536x384 FFN up, 384x1536 FFN down) and BERT-base's (768x768,
3072x768, 768x3072):

* ``ort-fp32``: onnxruntime on a one-node-plus-bias model (MatMul + Add, W a constant).
* ``ort-int8``: that model through ``quantize_dynamic(weight_type=QInt8)``, i.e. what the user's
  one-line quantizer makes (DynamicQuantizeLinear + MatMulInteger + scales, fused by ORT).
* ``tvm-int8-dense``: our activation quantizer + dense int8 matmul (bias epilogue fused); the time
  is both kernels (the quantizer alone is reported too: Q/K/V share one).
* ``tvm-int8-bsr BxB s``: the same with the weight block-sparse at sparsity ``s`` (fraction of
  blocks zero; 0.5 and 0.8 = block density 50% and 20%).
* ``tvm-fp32-bsr BxB s``: the fp32 block-sparse kernel (bsr_kernel.py) on the same weight.

Thread counts 1 and 2 in one process: TVM's pool is resized with ``runtime.config_threadpool``,
onnxruntime gets a session per count. Engines of one shape are timed interleaved (drift hits all
alike); medians of wall-clock calls. Run it through ``scripts/quiet_timing.sh`` (a lock, and the
background grid paused) like every timing here.

Usage: scripts/quiet_timing.sh .venv/bin/python benchmarks/bench_int8_kernels.py [--quick]
Writes benchmarks/results/int8_kernels.{json,md} (``--quick``: *_quick.*, not results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blockprune.bench_timing import cpu_name, interleaved_medians

M = 128
SHAPES = {  # model -> [(name, N, K)]
    "MiniLM": [("qkvo", 384, 384), ("ffn_up", 1536, 384), ("ffn_down", 384, 1536)],
    "BERT-base": [("qkvo", 768, 768), ("ffn_up", 3072, 768), ("ffn_down", 768, 3072)],
}
# per encoder layer: 4 attention projections, one FFN up, one FFN down
LAYER_MIX = {"qkvo": 4, "ffn_up": 1, "ffn_down": 1}
BLOCKS = ["16x4", "1x4"]
SPARSITIES = [0.5, 0.8]
RESULTS = Path(__file__).resolve().parent / "results"


def set_tvm_threads(n: int) -> None:
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, n)


def block_sparse_int8(rng, n: int, k: int, block: str | None, sparsity: float):
    """Random fp32 W[n, k] with whole zero blocks, and its symmetric per-channel int8 form."""
    from blockprune.blocks import BlockShape

    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    if block is not None:
        b = BlockShape.parse(block)
        gr, gc = n // b.rows, k // b.cols
        keep = np.zeros(gr * gc, bool)
        keep[rng.permutation(gr * gc)[: int(round(gr * gc * (1 - sparsity)))]] = True
        w *= np.repeat(np.repeat(keep.reshape(gr, gc), b.rows, 0), b.cols, 1)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    wq = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return w, wq, scale


def ort_sessions(w: np.ndarray, bias: np.ndarray, threads: int, tmp: Path):
    """(fp32 session, int8 session) of ``X @ W^T + b``; int8 from quantize_dynamic."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fp32 = tmp / f"fp32_{n}x{k}.onnx"
    int8 = tmp / f"int8_{n}x{k}.onnx"
    onnx.save(model, fp32)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (fp32, int8)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only, fewer runs (smoke test; *_quick outputs)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import tvm  # noqa: F401  (after argparse: --help stays fast)

    from blockprune.backends.tvm.kernels.bsr_kernel import build_bsr_kernel
    from blockprune.backends.tvm.kernels.int8_api import compile_int8_layer, int8_layer
    from blockprune.bsr import dense_to_bsr

    threads = [int(t) for t in args.threads.split(",")]
    models = {"MiniLM": SHAPES["MiniLM"]} if args.quick else SHAPES
    runs, rounds = (5, 2) if args.quick else (args.runs, args.rounds)
    rng = np.random.default_rng(0)
    rows = []
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    for model, shapes in models.items():
        for lname, n, k in shapes:
            x = rng.standard_normal((M, k)).astype(np.float32)
            bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
            w, wq, ws = block_sparse_int8(rng, n, k, None, 0.0)
            engines = {}  # name -> (callable, prepare info)
            t0 = time.time()
            dense = compile_int8_layer(int8_layer(wq, ws, x.shape, bias=bias))
            q, mm, _, _ = dense.prepare(x)
            engines["tvm-int8-dense"] = lambda q=q, mm=mm: (q(), mm())
            engines["tvm-quantize"] = q
            meta = {"tvm-int8-dense": str(dense.layer.schedule)}
            for block in BLOCKS:
                for s in SPARSITIES:
                    wb, wqb, wsb = block_sparse_int8(rng, n, k, block, s)
                    lay = compile_int8_layer(int8_layer(wqb, wsb, x.shape, bias=bias, block=block))
                    qb, mb, _, _ = lay.prepare(x)
                    engines[f"tvm-int8-bsr {block} {s}"] = lambda qb=qb, mb=mb: (qb(), mb())
                    meta[f"tvm-int8-bsr {block} {s}"] = str(lay.layer.schedule)
                    fk = build_bsr_kernel(x.shape, n, block, bias=True)
                    engines[f"tvm-fp32-bsr {block} {s}"] = fk.prepared_call(x, dense_to_bsr(wb, block), bias)
                    meta[f"tvm-fp32-bsr {block} {s}"] = f"{fk.schedule.layout} TI={fk.schedule.tile_rows}"
            print(f"[{model} {lname} {n}x{k}] compiled in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
            for nt in threads:
                set_tvm_threads(nt)
                fp32, int8 = ort_sessions(w, bias, nt, tmp)
                feed = {"x": x}
                calls = {"ort-fp32": lambda s=fp32: s.run(None, feed), "ort-int8": lambda s=int8: s.run(None, feed)}
                calls.update(engines)
                med = interleaved_medians(calls, runs, rounds)
                for eng, sec in med.items():
                    rows.append({"model": model, "layer": lname, "n": n, "k": k, "m": M, "threads": nt,
                                 "engine": eng, "ms": sec * 1e3, "schedule": meta.get(eng, "")})
                base = med["ort-fp32"]
                print(f"  threads={nt}: " + ", ".join(f"{e} {v * 1e3:.3f}ms ({base / v:.2f}x)" for e, v in med.items()),
                      file=sys.stderr, flush=True)
    suffix = "_quick" if args.quick else ""
    out = {"cpu": cpu_name(), "machine": platform.machine(), "m": M, "runs": runs, "rounds": rounds,
           "date": time.strftime("%Y-%m-%d"), "load_1min": [load_start, os.getloadavg()[0]], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"int8_kernels{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / f"int8_kernels{suffix}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    """Per-layer table (ms, x ORT fp32, x ORT int8) and the per-encoder-layer sums."""
    rows = out["rows"]
    lines = [f"# int8 kernels vs onnxruntime (M = {out['m']}, {out['cpu']}, {out['date']})", "",
             "Wall-clock medians per call; ratios are ORT time / ours (higher is faster). "
             "`tvm-int8-*` include the activation quantizer; `tvm-quantize` is that alone. "
             "Sparsity s = fraction of blocks that are zero. Produced by benchmarks/bench_int8_kernels.py.", ""]
    if "load_1min" in out:
        lines += [f"1-minute load average at start / end: {out['load_1min'][0]:.1f} / {out['load_1min'][1]:.1f} "
                  "on 2 cores (other jobs running: 2-thread rows are unreliable above a load of 1).", ""]
    key = {(r["model"], r["layer"], r["threads"], r["engine"]): r["ms"] for r in rows}
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        for nt in sorted({r["threads"] for r in rows}):
            layers = list(dict.fromkeys((r["layer"], r["n"], r["k"]) for r in rows if r["model"] == model))
            lines += [f"## {model}, {nt} thread{'s' if nt > 1 else ''}", "",
                      "| engine | " + " | ".join(f"{l} {n}x{k} ms (xfp32, xint8)" for l, n, k in layers)
                      + " | encoder layer ms (xfp32, xint8) |",
                      "|---|" + "---|" * (len(layers) + 1)]
            for eng in engines:
                cells = []
                tot = {"eng": 0.0, "f": 0.0, "i": 0.0}
                for l, _, _ in layers:
                    ms = key.get((model, l, nt, eng))
                    f, i = key[(model, l, nt, "ort-fp32")], key[(model, l, nt, "ort-int8")]
                    cells.append(f"{ms:.3f} ({f / ms:.2f}, {i / ms:.2f})" if ms else "")
                    if ms:
                        tot["eng"] += LAYER_MIX[l] * ms
                        tot["f"] += LAYER_MIX[l] * f
                        tot["i"] += LAYER_MIX[l] * i
                total = f"{tot['eng']:.3f} ({tot['f'] / tot['eng']:.2f}, {tot['i'] / tot['eng']:.2f})"
                lines.append(f"| {eng} | " + " | ".join(cells) + f" | {total} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
