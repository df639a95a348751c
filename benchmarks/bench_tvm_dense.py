"""TVM (our CPU schedules) vs onnxruntime on the dense parts of a BERT-style encoder.

Why: block-sparse kernels only speed a model up if everything around them is fast too; with
TVM's default CPU pipeline nothing is scheduled (a tiny BERT ran 40x slower than
onnxruntime). This measures, at the same thread count for both engines (1 and 2):

* per op, BERT-base shapes (batch 1, seq 128, hidden 768, 12 heads): Linear + bias for the
  QKV / output projections, FFN up + bias + GELU, FFN down + bias + residual, attention scores
  (Q K^T * scale + mask), context (P V), softmax, layernorm;
* whole models: ``load_model("bert-base")`` (12 layers, random weights) and ``minilm``, exported
  with the legacy exporter, imported with ``from_onnx`` at [1, 128], compiled with
  ``compile_relax`` (see ``blockprune/backends/tvm/pipeline/cpu_schedules.py``).

Each thread count runs in its own process (TVM_NUM_THREADS must be set before TVM's pool
starts; onnxruntime gets intra_op_num_threads). Per case: medians of ``--runs`` calls (>= 20)
per engine after warm-up, the engines alternating in blocks of 5 calls, wall clock and process CPU
clock. On a shared machine the wall clock also measures the other jobs; with 1 thread the CPU
clock is the fairer number, with 2 threads only the wall clock means anything (CPU time sums
the threads, spin-waits included).
The ratio column is TVM / onnxruntime (below 1: TVM faster) on the wall-clock medians.

Usage: python benchmarks/bench_tvm_dense.py [--threads 1 2] [--runs 20] [--models bert-base minilm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "tvm_dense.md"
S, H, HEADS = 128, 768, 12
D = H // HEADS


@dataclass
class Row:
    case: str
    threads: int
    tvm_wall: float  # median seconds
    tvm_cpu: float
    ort_wall: float
    ort_cpu: float
    max_err: float


def _paired_times(tvm_fn: Callable[[], object], ort_fn: Callable[[], object], runs: int,
                  block: int = 5) -> tuple[float, ...]:
    """Median wall and CPU seconds of both engines, measured in alternating blocks of calls.

    Alternating makes both engines see the same background load (timing all of one engine,
    then all of the other, let a burst of another job land on one side only: the same TVM
    build once measured 418 ms and once 570 ms wall for 286 ms of CPU). Blocks rather than
    single calls, each after one untimed call: with 2 threads, the pool of the engine that
    just ran keeps spinning on the second core for a while, and a single interleaved call of
    the other engine then waits for its own worker (seen: 12 ms instead of 1 ms).
    """
    fns = [tvm_fn, ort_fn]
    for _ in range(3):
        for fn in fns:
            fn()
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    r = 0
    while len(wall[0]) < runs or len(wall[1]) < runs:
        e = r % 2
        r += 1
        fns[e]()  # untimed: lets the other engine's threads go idle
        for _ in range(min(block, runs - len(wall[e]))):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[e]()
            wall[e].append(time.perf_counter() - t0)
            cpu[e].append(time.process_time() - c0)
    return tuple(float(np.median(x)) for x in (wall[0], cpu[0], wall[1], cpu[1]))


# ---- per-op graphs (Relax and ONNX built side by side) ---------------------------------------
@dataclass
class OpCase:
    name: str
    inputs: dict[str, tuple[int, ...]]
    relax_body: Callable  # (bb, *vars) -> relax expr
    onnx_nodes: Callable  # (helper, numpy_helper) -> (nodes, initializers)


def _op_cases(rng) -> list[OpCase]:
    from tvm import relax

    def lin(k, n):
        w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
        return w, rng.standard_normal(n).astype(np.float32)

    w1, b1 = lin(H, H)
    w2, b2 = lin(H, 4 * H)
    w3, b3 = lin(4 * H, H)
    g, beta = rng.standard_normal(H).astype(np.float32), rng.standard_normal(H).astype(np.float32)
    c = relax.const

    def gelu_relax(bb, y):
        e = relax.op.erf(relax.op.divide(y, c(np.float32(math.sqrt(2)))))
        return relax.op.multiply(relax.op.multiply(y, relax.op.add(e, c(np.float32(1)))), c(np.float32(0.5)))

    def consts(helper, nh, **arrays):
        return [nh.from_array(np.asarray(v, dtype=np.float32), k) for k, v in arrays.items()]

    return [
        OpCase("dense 768->768 + bias (QKV/out proj)", {"x": (1, S, H)},
               lambda bb, x: relax.op.add(relax.op.matmul(x, c(w1)), c(b1)),
               lambda h, nh: ([h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Add", ["y", "b"], ["out"])],
                              consts(h, nh, w=w1, b=b1))),
        OpCase("dense 768->3072 + bias + GELU (FFN up)", {"x": (1, S, H)},
               lambda bb, x: gelu_relax(bb, relax.op.add(relax.op.matmul(x, c(w2)), c(b2))),
               lambda h, nh: ([h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Add", ["y", "b"], ["z"]),
                               h.make_node("Div", ["z", "sq2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                               h.make_node("Add", ["e", "one"], ["e1"]), h.make_node("Mul", ["z", "e1"], ["m"]),
                               h.make_node("Mul", ["m", "half"], ["out"])],
                              consts(h, nh, w=w2, b=b2, sq2=math.sqrt(2), one=1.0, half=0.5))),
        OpCase("dense 3072->768 + bias + residual (FFN down)", {"x": (1, S, 4 * H), "r": (1, S, H)},
               lambda bb, x, r: relax.op.add(relax.op.add(relax.op.matmul(x, c(w3)), c(b3)), r),
               lambda h, nh: ([h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Add", ["y", "b"], ["z"]),
                               h.make_node("Add", ["z", "r"], ["out"])], consts(h, nh, w=w3, b=b3))),
        OpCase("attention scores Q K^T * scale + mask",
               {"q": (1, HEADS, S, D), "kt": (1, HEADS, D, S), "mask": (1, 1, 1, S)},
               lambda bb, q, kt, m: relax.op.add(relax.op.multiply(relax.op.matmul(q, kt), c(np.float32(0.125))), m),
               lambda h, nh: ([h.make_node("MatMul", ["q", "kt"], ["y"]), h.make_node("Mul", ["y", "sc"], ["z"]),
                               h.make_node("Add", ["z", "mask"], ["out"])], consts(h, nh, sc=0.125))),
        OpCase("attention context P V", {"p": (1, HEADS, S, S), "v": (1, HEADS, S, D)},
               lambda bb, p, v: relax.op.matmul(p, v),
               lambda h, nh: ([h.make_node("MatMul", ["p", "v"], ["out"])], [])),
        OpCase("softmax [1,12,128,128]", {"s": (1, HEADS, S, S)},
               lambda bb, s: relax.op.nn.softmax(s, axis=-1),
               lambda h, nh: ([h.make_node("Softmax", ["s"], ["out"], axis=-1)], [])),
        OpCase("layernorm [1,128,768]", {"x": (1, S, H)},
               lambda bb, x: relax.op.nn.layer_norm(x, c(g), c(beta), axes=[-1], epsilon=1e-12),
               lambda h, nh: ([h.make_node("LayerNormalization", ["x", "g", "beta"], ["out"], axis=-1, epsilon=1e-12)],
                              consts(h, nh, g=g, beta=beta))),
    ]


def _relax_module(case: OpCase):
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in case.inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(case.relax_body(bb, *params)))
        bb.emit_func_output(out)
    return bb.get()


def _onnx_model(case: OpCase, out_shape):
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    nodes, inits = case.onnx_nodes(helper, nh)
    graph = helper.make_graph(
        nodes, "op",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in case.inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _ort_session(model, threads: int, spinning: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:  # see --ort-spinning
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _tvm_callable(mod, feeds: list[np.ndarray]):
    import tvm
    from tvm import relax

    from blockprune.backends.tvm.pipeline.cpu_schedules import compile_relax
    from blockprune.backends.tvm.targets.presets import host_preset

    vm = relax.VirtualMachine(compile_relax(mod, host_preset().target()), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in feeds]
    fn = vm["main"]

    def run():
        out = fn(*args)
        return out

    def result() -> np.ndarray:
        out = run()
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run, result


def _bench_ops(threads: int, runs: int, spinning: bool) -> list[Row]:
    rng = np.random.default_rng(0)
    rows = []
    for case in _op_cases(rng):
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in case.inputs.items()}
        if "mask" in feeds:
            feeds["mask"] = np.where(rng.random(case.inputs["mask"]) < 0.1, -1e4, 0).astype(np.float32)
        run, result = _tvm_callable(_relax_module(case), list(feeds.values()))
        out = result()
        sess = _ort_session(_onnx_model(case, out.shape), threads, spinning)
        ref = sess.run(None, feeds)[0]
        tw, tc, ow, oc = _paired_times(run, lambda: sess.run(None, feeds), runs)
        rows.append(Row(case.name, threads, tw, tc, ow, oc, float(np.abs(out - ref).max())))
        print(f"  {threads}T {case.name}: tvm {tw * 1e3:.3f} ms, ort {ow * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def _bench_model(name: str, threads: int, runs: int, spinning: bool) -> Row:
    from tvm.relax.frontend.onnx import from_onnx

    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model

    loaded = load_model(name)
    model = export_onnx(loaded, None, exporter="legacy").model
    names = [i.name for i in model.graph.input]
    mod = from_onnx(model, shape_dict={n: [1, S] for n in names}, dtype_dict={n: "int64" for n in names},
                    keep_params_in_input=False)
    rng = np.random.default_rng(1)
    feeds = {n: np.zeros((1, S), np.int64) for n in names}
    feeds["input_ids"] = rng.integers(0, int(loaded.config.vocab_size), (1, S)).astype(np.int64)
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.ones((1, S), np.int64)
    run, result = _tvm_callable(mod, [feeds[n] for n in names])
    out = result()
    model.ir_version = 10  # onnx 1.23 writes IR 14, onnxruntime 1.31 reads up to 10
    sess = _ort_session(model, threads, spinning)
    ref = sess.run(None, feeds)[0]
    tw, tc, ow, oc = _paired_times(run, lambda: sess.run(None, feeds), runs)
    print(f"  {threads}T {name}: tvm {tw * 1e3:.1f} ms, ort {ow * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return Row(f"model {name} [1,{S}]", threads, tw, tc, ow, oc, float(np.abs(out - ref).max()))


def _worker(args) -> None:
    spin = args.ort_spinning == "on"
    rows = [] if args.skip_ops else _bench_ops(args.threads[0], args.runs, spin)
    rows += [_bench_model(m, args.threads[0], args.runs, spin) for m in args.models]
    print("ROWS " + json.dumps([asdict(r) for r in rows]), flush=True)


def _table(rows: list[Row]) -> str:
    lines = ["| case | threads | TVM wall ms | ORT wall ms | TVM / ORT wall | TVM cpu ms | ORT cpu ms | "
             "TVM / ORT cpu | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.threads} | {r.tvm_wall * 1e3:.3f} | {r.ort_wall * 1e3:.3f} | "
                     f"{r.tvm_wall / r.ort_wall:.2f} | {r.tvm_cpu * 1e3:.3f} | {r.ort_cpu * 1e3:.3f} | "
                     f"{r.tvm_cpu / r.ort_cpu:.2f} | {r.max_err:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="*", default=["bert-base", "minilm"])
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--ort-spinning", choices=["on", "off"], default="off",
                    help="onnxruntime's idle workers spin (its default: on). Off by default here: on a "
                         "2-core machine shared with other jobs, a spinning worker holds a core between "
                         "calls and TVM's statically partitioned pool then waits for its own worker "
                         "(seen: 3.4 ms instead of 0.2 ms for the attention matmuls at 2 threads)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.runs = max(args.runs, 20)
    if args.worker:
        _worker(args)
        return
    rows: list[Row] = []
    for t in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--worker", "--threads", str(t), "--runs", str(args.runs),
               "--ort-spinning", args.ort_spinning, "--models", *args.models]
        cmd += ["--skip-ops"] if args.skip_ops else []
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))
        rows += [Row(**r) for r in json.loads(line[5:])]
    import onnxruntime
    import tvm

    from blockprune.backends.tvm.targets.presets import host_preset
    from blockprune.bench_timing import cpu_name

    load = os.getloadavg()
    text = "\n".join([
        "# TVM dense schedules vs onnxruntime (BERT-base shapes, batch 1, seq 128)", "",
        f"Generated by `benchmarks/bench_tvm_dense.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{cpu_name()}, TVM target {host_preset().to_json()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} at the end (other jobs were running: "
        "compare the two engines within a row, not across runs).",
        f"TVM {tvm.__version__} with `compile_relax` (blockprune/backends/tvm/pipeline/cpu_schedules.py); "
        f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, all graph optimisations, "
        f"intra_op_num_threads = threads, idle-worker spinning {args.ort_spinning} (see --ort-spinning). "
        "Medians of "
        f"{args.runs} runs per engine after 3 warm-ups, TVM and onnxruntime alternating in blocks of 5 "
        "calls (each block after one untimed call); wall and "
        "process-CPU clocks (CPU time sums the threads, spin-waits included). With 1 thread the CPU "
        "column is the fair one on a loaded machine (time on a core of its own); with 2 threads only "
        "the wall clock means anything.", "",
        _table(rows), "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
