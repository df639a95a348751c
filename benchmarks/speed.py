"""Speed evidence: onnxruntime dense vs TVM dense vs compacted vs block-sparse, per layer and per model.

Why this benchmark: the accuracy table says how far a model can be pruned; this one says what
that buys on a CPU and where it stops paying. For each model (the bundled MiniLM-L6 and a
BERT-base-shaped encoder with random weights) at batch 1, sequence 128 (M = 128 tokens):

* **per layer** (every distinct Linear shape of the model): onnxruntime dense MatMul, the TVM
  dense path (a Relax matmul through ``compile.compile_relax``, i.e. the project's CPU
  schedules), the compacted layer (a dense layer with ``1 - ratio`` of its output features, what
  removing dead neurons gives) and our BSR kernel per block shape and ratio;
* **whole model**: onnxruntime on the dense ONNX, TVM on the dense model, TVM and onnxruntime
  on the compacted model (FFN neurons removed at ``ratio``; the other layers dense), and TVM on
  the block-sparse model (every encoder Linear pruned at ``ratio`` with the block, form bsr);
  each compiled model's output is compared with onnxruntime on the same inputs;
* **break-even densities** per target and layer shape: BSR times over a sweep of densities,
  and the density where the BSR kernel's time equals the dense time (linear interpolation
  between the two sweep points around the crossing, :func:`break_even_density`). This is the
  measured value the compress policy's ``--break-even`` should use.

Both engines use the same thread count (``TVM_NUM_THREADS`` is set before tvm is imported;
onnxruntime gets ``intra_op_num_threads``). Each number is a median of ``--runs`` timed calls
after warm-up calls. Clock: with one thread the process CPU time of a call is what it costs on
a core of its own, which is the fair measure on a shared machine; with more threads the wall
clock is used (see ``benchmarks/bench_bsr_kernel.py``). Both medians are stored in the JSON.

Only the host target is measured: an aarch64 artifact under qemu says nothing about speed.

Usage: python benchmarks/speed.py [--threads 1] [--runs 25] [--models minilm,bert-base] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from blockprune.backends.tvm.cost.calibrate import (  # noqa: E402  (shared with `blockprune calibrate`)
    block_sparse_weight, break_even_density, bsr_call, tvm_dense_call)
from blockprune.bench_timing import cpu_name, time_calls

RESULTS = Path(__file__).resolve().parent / "results"
M_DEFAULT = 128


# --------------------------------------------------------------------------------------------
# Pure logic (unit-tested): break-even interpolation and timing statistics
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    wall: float
    cpu: float

    def get(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall


# --------------------------------------------------------------------------------------------
# Per-layer measurements
# --------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    model: str
    k: int
    n: int
    engine: str  # "ort dense", "tvm dense", "ort compact", "tvm compact", "tvm bsr"
    block: str | None
    density: float  # fraction of weights kept (1.0 for dense)
    timing: Timing
    flops_useful: float  # 2*M*K*N*density
    note: str = ""


def _ort_matmul(wt: np.ndarray, x: np.ndarray, threads: int) -> Callable[[], object]:
    """onnxruntime MatMul(x, Wt) with Wt a constant initializer (what an exported Linear is)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k = x.shape
    n = wt.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(np.ascontiguousarray(wt), "wt")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), _ort_options(threads), providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return lambda: sess.run(None, feed)


def _ort_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def _tvm_matmul(wt: np.ndarray, x: np.ndarray) -> Callable[[], object]:
    return tvm_dense_call(wt, x)


def _bsr_call(w: np.ndarray, x: np.ndarray, block: str) -> tuple[Callable[[], object], float]:
    return bsr_call(w, x, block)


@dataclass
class SweepResult:
    model: str
    k: int
    n: int
    block: str
    densities: list[float]
    bsr: list[Timing]
    dense_tvm: Timing | None
    dense_ort: Timing
    break_even_vs_tvm: float | None = None
    break_even_vs_ort: float | None = None
    break_even_vs_best: float | None = None


def layer_benchmarks(model_name: str, shapes: list[tuple[int, int]], blocks: list[str], ratios: list[float],
                     sweep: list[float], threads: int, runs: int, clock: str, m: int,
                     log: Callable[[str], None]) -> tuple[list[LayerRow], list[SweepResult]]:
    rng = np.random.default_rng(0)
    rows: list[LayerRow] = []
    sweeps: list[SweepResult] = []
    for k, n in shapes:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        flops = 2.0 * m * k * n

        def add(engine: str, block: str | None, density: float, t: Timing, note: str = "") -> None:
            rows.append(LayerRow(model_name, k, n, engine, block, density, t, flops * density, note))
            log(f"  layer K={k} N={n} {engine} {block or ''} d={density:.2f}: {t.get(clock) * 1e3:.3f} ms ({clock})")

        ort_t = Timing(*time_calls(_ort_matmul(w.T, x, threads), runs))
        add("ort dense", None, 1.0, ort_t)
        tvm_t: Timing | None
        try:
            tvm_t = Timing(*time_calls(_tvm_matmul(w.T, x), runs))
            add("tvm dense", None, 1.0, tvm_t)
        except Exception as exc:  # the colleague's schedules may be mid-change; say so, go on
            tvm_t = None
            log(f"  TVM dense path failed for K={k} N={n}: {exc!r}")
        for r in ratios:
            n_c = max(1, round(n * (1 - r)))
            wc = np.ascontiguousarray(w[:n_c].T)
            add("ort compact", None, n_c / n, Timing(*time_calls(_ort_matmul(wc, x, threads), runs)),
                f"{n_c} of {n} output features")
            try:
                add("tvm compact", None, n_c / n, Timing(*time_calls(_tvm_matmul(wc, x), runs)),
                    f"{n_c} of {n} output features")
            except Exception as exc:
                log(f"  TVM compact path failed: {exc!r}")
        for block in blocks:
            r_, c_ = (int(v) for v in block.split("x"))
            if n % r_ or k % c_:
                log(f"  block {block} does not divide {n}x{k}; skipped")
                continue
            dens = sorted(set(sweep) | {round(1 - r, 4) for r in ratios}, reverse=True)
            times: list[Timing] = []
            for d in dens:
                wb = block_sparse_weight(rng, n, k, block, d)
                call, err = _bsr_call(wb, x, block)
                t = Timing(*time_calls(call, runs))
                times.append(t)
                real_d = float(np.count_nonzero(wb)) / wb.size
                if any(abs(d - (1 - r)) < 1e-6 for r in ratios):
                    add("tvm bsr", block, real_d, t, f"max err {err:.1e}")
                else:
                    log(f"  sweep K={k} N={n} {block} d={d:.2f}: {t.get(clock) * 1e3:.3f} ms (err {err:.1e})")
            sr = SweepResult(model_name, k, n, block, dens, times, tvm_t, ort_t)
            bt = [t.get(clock) for t in times]
            if tvm_t is not None:
                sr.break_even_vs_tvm = break_even_density(dens, bt, tvm_t.get(clock))
            sr.break_even_vs_ort = break_even_density(dens, bt, ort_t.get(clock))
            best = min([ort_t.get(clock)] + ([tvm_t.get(clock)] if tvm_t else []))
            sr.break_even_vs_best = break_even_density(dens, bt, best)
            sweeps.append(sr)
    return rows, sweeps


# --------------------------------------------------------------------------------------------
# Whole-model measurements
# --------------------------------------------------------------------------------------------


@dataclass
class ModelRow:
    model: str
    variant: str  # "dense", "compact r=..", "bsr 1x32 r=.."
    engine: str  # "onnxruntime" or "tvm"
    timing: Timing
    linear_flops_useful: float
    density: float  # kept fraction of encoder Linear weights
    max_abs_diff: float | None = None  # TVM vs onnxruntime on the same model
    compile_seconds: float | None = None
    onnx_bytes: int | None = None
    note: str = ""


def _linear_flops(model, m: int) -> float:
    from blockprune.passes.layer_stats import model_stats

    st = model_stats(model)
    return sum(2.0 * m * l.shape[0] * l.shape[1] * l.density for l in st.layers)


def _ort_model(model, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), _ort_options(threads), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feeds.items() if k in wanted}
    return lambda: sess.run(None, f)


def _tvm_model(model, work: Path, name: str, batch: int, seq: int) -> tuple[Callable[[], object], float, float]:
    """Compile, check against onnxruntime, and return (call, max-abs diff, compile seconds)."""
    import tvm

    from blockprune.backends.tvm.runtime import runner
    from blockprune.backends.tvm.pipeline.compile import compile_model

    t0 = time.perf_counter()
    res = compile_model(model, work / name, target="host", batch=batch, seq=seq)
    secs = time.perf_counter() - t0
    run = runner.run_artifact(work / name, model=model)
    diff = max(runner.compare_with_onnx(run, model).values())
    vm = runner.load_vm(work / name, res.manifest)
    arrays = [tvm.runtime.tensor(run.feeds[s["name"]]) for s in res.manifest.inputs]
    fn = vm["main"]
    return (lambda: fn(*arrays)), diff, secs


def _compact_config(ratio: float, hidden: int):
    """Neuron pruning of the FFN: whole rows of ffn_in (block 1 x hidden) at ``ratio``, every
    other layer dense, so Compact removes ``ratio`` of the intermediate neurons."""
    import re

    from blockprune.passes import PruneConfig
    from blockprune.passes.prune_config import Rule

    return PruneConfig(block=f"1x{hidden}", sparsity=0.0,
                       rules=[Rule(re.compile(r"intermediate\.dense|ffn\.lin1"), sparsity=ratio)])


def model_benchmarks(model_name: str, blocks: list[str], ratios: list[float], threads: int, runs: int,
                     m_batch: int, seq: int, work: Path, log: Callable[[str], None]) -> tuple[list[ModelRow], list[tuple[int, int]]]:
    import onnx

    from blockprune.compress_api import compress_model
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model
    from blockprune.passes import PruneConfig
    from blockprune.sample_inputs import make_feeds

    t0 = time.perf_counter()
    loaded = load_model(model_name, head="encoder")
    dense = export_onnx(loaded, work / f"{model_name}.onnx", exporter="legacy").model
    hidden = int(loaded.hidden_size)
    log(f"{model_name}: exported in {time.perf_counter() - t0:.0f}s")
    from blockprune.passes.layer_stats import model_stats

    shapes = sorted({(l.shape[1], l.shape[0]) for l in model_stats(dense).layers})  # (K=in, N=out)
    feeds = make_feeds(dense, m_batch, seq)
    m = m_batch * seq
    rows: list[ModelRow] = []
    dense_flops = _linear_flops(dense, m)

    def measure(variant: str, model: onnx.ModelProto, density: float, tvm_too: bool = True, note: str = "") -> None:
        size = len(model.SerializeToString())
        flops = _linear_flops(model, m)
        if not variant.startswith("bsr"):
            t = Timing(*time_calls(_ort_model(model, feeds, threads), runs))
            rows.append(ModelRow(model_name, variant, "onnxruntime", t, flops, density, onnx_bytes=size, note=note))
            log(f"  {model_name} {variant} onnxruntime: {t.cpu * 1e3:.2f} ms cpu, {t.wall * 1e3:.2f} ms wall")
        if tvm_too:
            try:
                call, diff, secs = _tvm_model(model, work, variant.replace(" ", "_").replace("=", ""), m_batch, seq)
                t = Timing(*time_calls(call, runs))
                rows.append(ModelRow(model_name, variant, "tvm", t, flops, density, diff, secs, size, note))
                log(f"  {model_name} {variant} tvm: {t.cpu * 1e3:.2f} ms cpu, {t.wall * 1e3:.2f} ms wall, "
                    f"diff {diff:.1e}, compiled in {secs:.0f}s")
            except Exception as exc:
                log(f"  {model_name} {variant} tvm FAILED: {exc!r}")
                rows.append(ModelRow(model_name, variant, "tvm", Timing(float("nan"), float("nan")), flops, density,
                                     note=f"failed: {exc!r}"[:300]))

    measure("dense", dense, 1.0)
    for r in ratios:
        res = compress_model(dense, prune=_compact_config(r, hidden), form="compact", verify=True)
        measure(f"compact r={r}", res.model, res.stats.density,
                note=f"FFN neurons pruned at {r}, removed by Compact; linear FLOPs {_linear_flops(res.model, m) / dense_flops:.2f} of dense")
        for block in blocks:
            res = compress_model(dense, prune=PruneConfig(block=block, sparsity=r), form="bsr", verify=True)
            measure(f"bsr {block} r={r}", res.model, res.stats.density)
    return rows, shapes


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def speedup_plot(sweeps: list[SweepResult], clock: str, path: Path) -> Path:
    """Speed-up over the TVM dense path (onnxruntime where TVM dense failed) vs sparsity, one
    line per block shape, one panel per layer shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(s.model, s.k, s.n) for s in sweeps})
    cols = min(3, len(keys)) or 1
    rows_ = (len(keys) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for s in (s for s in sweeps if (s.model, s.k, s.n) == key):
            base = (s.dense_tvm or s.dense_ort).get(clock)
            xs = [1 - d for d in s.densities]
            ax.plot(xs, [base / t.get(clock) for t in s.bsr], marker="o", ms=3, label=s.block)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_title(f"{key[0]}: K={key[1]} N={key[2]}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speed-up vs TVM dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(t: float) -> str:
    return "-" if t != t else f"{t * 1e3:.3f}"


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict[str, Any], clock: str) -> str:
    env = result["environment"]
    out = ["## Speed: onnxruntime dense vs TVM dense vs compacted vs block-sparse", "",
           f"{result['date']}, CPU: {env['cpu']} ({env['cores']} cores visible, shared with other jobs); "
           f"threads: {result['threads']} for both engines; batch {result['batch']}, sequence {result['seq']} "
           f"(M = {result['batch'] * result['seq']}); medians of {result['runs']} timed calls after 3 warm-up calls; "
           f"times from the **{clock}** clock. apache-tvm {env['tvm']}, onnxruntime {env['onnxruntime']}, "
           f"Python {env['python']}. Command: `{result['command']}`.", ""]
    models = list(dict.fromkeys(r["model"] for r in result["model_rows"]))
    for model in models:
        mrows = [r for r in result["model_rows"] if r["model"] == model]
        base = next((r for r in mrows if r["variant"] == "dense" and r["engine"] == "onnxruntime"), None)
        base_t = base["timing"][clock] if base else float("nan")
        peak = max((r["gflops"] for r in result["layer_rows"] if r["model"] == model and r["density"] == 1.0),
                   default=float("nan"))
        out += [f"### {model}: whole model", "",
                f"Linear-layer GFLOP/s = useful Linear FLOPs (2*M*K*N*density over encoder Linears; attention "
                f"scores, softmax and LayerNorm not counted, so the % is a lower bound) / time; % of peak = that / "
                f"the best dense per-layer GFLOP/s measured for this model ({peak:.1f}).", "",
                f"| variant | engine | {clock} ms | wall ms | vs ORT dense | Linear GFLOP/s | % peak | kept weights | "
                "max abs diff vs ORT | compile s | ONNX MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            t = r["timing"][clock]
            g = r["linear_flops_useful"] / t / 1e9 if t == t else float("nan")
            out.append(
                f"| {r['variant']} | {r['engine']} | {_ms(t)} | {_ms(r['timing']['wall'])} | "
                f"{base_t / t:.2f}x | {g:.1f} | {100 * g / peak:.0f}% | {r['density']:.2f} | "
                f"{_opt(r['max_abs_diff'], '.1e')} | {_opt(r['compile_seconds'], '.0f')} | "
                f"{_opt(None if r['onnx_bytes'] is None else r['onnx_bytes'] / 1e6, '.1f')} |"
                + (f" {r['note']}" if r["note"].startswith("failed") else ""))
        notes = {r["note"] for r in mrows if r["note"] and not r["note"].startswith("failed")}
        out += [""] + [f"- {n}" for n in sorted(notes)] + [""]
        out += [f"### {model}: per layer (M = {result['batch'] * result['seq']})", "",
                f"| K | N | engine | block | kept | {clock} ms | GFLOP/s (useful) | % dense peak | vs ORT dense | vs TVM dense | note |",
                "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for k, n in dict.fromkeys((r["k"], r["n"]) for r in result["layer_rows"] if r["model"] == model):
            lrows = [r for r in result["layer_rows"] if (r["model"], r["k"], r["n"]) == (model, k, n)]
            peak_l = max(r["gflops"] for r in lrows if r["density"] == 1.0)
            ort_t = next(r["timing"][clock] for r in lrows if r["engine"] == "ort dense")
            tvm_t = next((r["timing"][clock] for r in lrows if r["engine"] == "tvm dense"), float("nan"))
            for r in lrows:
                t = r["timing"][clock]
                out.append(f"| {k} | {n} | {r['engine']} | {r['block'] or '-'} | {r['density']:.2f} | {_ms(t)} | "
                           f"{r['gflops']:.1f} | {100 * r['gflops'] / peak_l:.0f}% | {ort_t / t:.2f}x | "
                           f"{tvm_t / t:.2f}x | {r['note']} |")
        out.append("")
    out += ["### Break-even densities (host target, measured)", "",
            "Density (fraction of blocks kept) at which the BSR kernel is as fast as the dense path, interpolated "
            "from the sweep; `>= d` means BSR was already faster at the densest point tried, `never` that it "
            "never was. Block-sparse pays off at or below this density.", "",
            f"| target | model | K | N | block | vs TVM dense | vs ORT dense | vs best dense | sweep |",
            "|---|---|---:|---:|---|---:|---:|---:|---|"]

    def be(v: float | None, dens: list[float], missing: bool = False) -> str:
        if missing:
            return "n/a"
        if v is None:
            return "never"
        return f">= {v:.2f}" if abs(v - max(dens)) < 1e-9 else f"{v:.2f}"

    for s in result["sweeps"]:
        out.append(f"| {result['target']} | {s['model']} | {s['k']} | {s['n']} | {s['block']} | "
                   f"{be(s['break_even_vs_tvm'], s['densities'], s['dense_tvm'] is None)} | {be(s['break_even_vs_ort'], s['densities'])} | "
                   f"{be(s['break_even_vs_best'], s['densities'])} | "
                   f"{min(s['densities']):.1f}..{max(s['densities']):.1f} |")
    out += ["", "![speed-up vs sparsity](speedup.png)", ""]
    return "\n".join(out)


def _jsonable(rows: list[Any], flops_key: str | None, clock: str) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = asdict(r)
        for key in ("timing", "dense_tvm", "dense_ort"):
            if key in d and d[key] is not None and not isinstance(d[key], dict):
                d[key] = asdict(d[key])
        if flops_key:
            t = r.timing.get(clock)
            d["gflops"] = getattr(r, flops_key) / t / 1e9
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
    ap.add_argument("--runs", type=int, default=25, help="timed runs per measurement (median; >= 20 for the report)")
    ap.add_argument("--models", default="minilm,bert-base", help="comma-separated model specs")
    ap.add_argument("--blocks", default="1x32,4x4,16x1", help="block shapes for BSR")
    ap.add_argument("--ratios", default="0.5,0.8", help="pruning ratios of the whole-model and per-layer rows")
    ap.add_argument("--sweep", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1",
                    help="densities of the break-even sweep")
    ap.add_argument("--model-blocks", default="1x32,4x4", help="blocks of the whole-model BSR rows")
    ap.add_argument("--model-ratios", default=None,
                    help="ratios of the whole-model rows (default: --ratios; each costs one compile per block)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-models", action="store_true", help="per-layer rows and sweeps only")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="clock of the tables (default: cpu with 1 thread, else wall)")
    ap.add_argument("--quick", action="store_true", help="smoke run: bert-tiny, 5 runs, short sweep")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.runs, args.sweep, args.ratios = "bert-tiny", min(args.runs, 5), "1.0,0.5,0.2", "0.8"
        args.blocks, args.model_blocks, args.model_ratios = "1x32,4x4", "1x32", None
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts its thread pool
    import onnxruntime
    import tvm

    from blockprune.backends.tvm.targets.presets import host_preset

    blocks = [b for b in args.blocks.split(",") if b]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    model_ratios = [float(r) for r in args.model_ratios.split(",") if r] if args.model_ratios else ratios
    sweep = [float(d) for d in args.sweep.split(",") if d]
    log = lambda s: print(s, flush=True)  # noqa: E731
    layer_rows: list[LayerRow] = []
    sweeps: list[SweepResult] = []
    model_rows: list[ModelRow] = []
    t_start = time.perf_counter()
    out_stem = "speed_quick" if args.quick else "speed"
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(layer_rows: list[LayerRow], sweeps: list[SweepResult], model_rows: list[ModelRow]) -> str:
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "runs": args.runs, "clock": clock,
            "batch": args.batch, "seq": args.seq, "target": host_preset().name, "command": command,
            "seconds": time.perf_counter() - t_start,
            "environment": {"cpu": cpu_name(), "cores": os.cpu_count(), "tvm": tvm.__version__,
                            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                            "numpy": np.__version__},
            "model_rows": _jsonable(model_rows, None, clock),
            "layer_rows": _jsonable(layer_rows, "flops_useful", clock),
            "sweeps": _jsonable(sweeps, None, clock),
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{out_stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        md = markdown(result, clock)
        if sweeps:
            png = "speedup_quick.png" if args.quick else "speedup.png"
            speedup_plot(sweeps, clock, args.out_dir / png)
            md = md.replace("(speedup.png)", f"({png})")
        (args.out_dir / f"{out_stem}.md").write_text(md)
        return md

    with tempfile.TemporaryDirectory(prefix="bp-speed-") as tmp:
        for model in [s for s in args.models.split(",") if s]:
            log(f"== {model}")
            shapes: list[tuple[int, int]]
            if args.no_models:
                from blockprune.models.zoo import load_model

                cfg = load_model(model, head="encoder").config
                h, f = int(cfg.hidden_size), int(cfg.intermediate_size)
                shapes = [(h, h), (h, f), (f, h)]
            else:
                mrows, shapes = model_benchmarks(model, [b for b in args.model_blocks.split(",") if b], model_ratios,
                                                 args.threads, args.runs, args.batch, args.seq, Path(tmp), log)
                model_rows += mrows
            lrows, sw = layer_benchmarks(model, shapes, blocks, ratios, sweep, args.threads, args.runs, clock,
                                         args.batch * args.seq, log)
            layer_rows += lrows
            sweeps += sw
            write(layer_rows, sweeps, model_rows)  # after every model: a long run leaves results behind
    md = write(layer_rows, sweeps, model_rows)
    print("\n" + md)
    print(f"\nwritten to {args.out_dir / (out_stem + '.json')} and .md in {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
