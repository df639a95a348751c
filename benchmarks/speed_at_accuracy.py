"""Whole-model speed of the *trained* pruned models at the compression the accuracy grid allows.

Why: ``speed.py`` times models pruned one-shot by magnitude at round ratios; the question a user
asks is "at the compression that keeps my task within a point of dense, how much faster is the
model than onnxruntime dense?". That needs the trained masks of that cell (their pattern decides
how many blocks Reorder empties and Compact removes), so this script takes each task's best cell
from ``benchmarks/results/accuracy.json`` (``--cells all``: every finished cell), loads the
``model.onnx`` its run wrote (the pruned classifier, exported and checked by the recipe), and
measures in one process, at batch 1 and sequence 128:

* **onnxruntime dense**: the same ONNX graph; onnxruntime's dense kernels do not look at
  values, so a pruned graph with its zeros costs what the dense model costs (the baseline);
* **TVM dense**: that graph through our CPU schedules;
* **compressed (auto)**: ``compress_model`` with the default policy (Reorder, Compact, per-layer
  BSR/compact/dense by the break-even rule), verified in onnxruntime, then run by onnxruntime
  (compacted layers only gain there; BSR runs as the ONNX function) and by TVM;
* **compressed (bsr)**: every pruned layer in BSR form, TVM.

Each TVM build is checked against onnxruntime on the same inputs before it is timed. Times are
medians of ``--runs`` calls after warm-up; with one thread the process CPU clock (fair on a
shared machine, see ``speed.py``).

Usage: python benchmarks/speed_at_accuracy.py [--cells best|all] [--runs 20] [--threads 1]
Output: benchmarks/results/speed_at_accuracy.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import Cell, load_cells, summarize  # noqa: E402

RESULTS = HERE / "results"


@dataclass
class SpeedRow:
    """One trained cell, timed: milliseconds per call (the chosen clock) and speed-ups over ORT dense."""

    task: str
    block: str
    ratio: float
    compression_rate: float
    metric_name: str
    metric: float
    dense_metric: float
    ort_dense_ms: float
    tvm_dense_ms: float
    auto_forms: str
    ort_auto_ms: float
    tvm_auto_ms: float
    tvm_bsr_ms: float
    max_abs_diff: float
    run_dir: str

    def speedup(self, ms: float) -> float:
        return self.ort_dense_ms / ms if ms == ms and ms > 0 else float("nan")


def pick_cells(cells: list[Cell], which: str, tolerance: float) -> list[Cell]:
    """``best``: per task and block, the cell with the highest compression within ``tolerance``
    of dense (none where no cell is within it); ``all``: every pruned cell."""
    pruned = [c for c in cells if c.kind == "pruned"]
    if which == "all":
        return sorted(pruned, key=lambda c: (c.task, c.block, c.ratio))
    out = []
    for s in summarize(cells, tolerance):
        if s.best_ratio is not None:
            out += [c for c in pruned if c.task == s.task and c.block == s.block and c.ratio == s.best_ratio]
    return out


def _forms(model) -> str:
    """"24 bsr, 8 compact+dense, ..." from the per-layer forms the Policy pass recorded."""
    from blockprune.onnx_io import get_meta

    counts: dict[str, int] = {}
    for info in (get_meta(model, "layers", {}) or {}).values():
        if "form" in info:
            counts[info["form"]] = counts.get(info["form"], 0) + 1
    return ", ".join(f"{n} {f}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def measure_cell(cell: Cell, threads: int, runs: int, clock: str, work: Path, log: Callable[[str], None]) -> SpeedRow:
    import onnx

    from speed import _ort_model, _tvm_model
    from blockprune.bench_timing import time_calls
    from blockprune.compress_api import compress_model
    from blockprune.sample_inputs import make_feeds

    path = Path(cell.run_dir) / "model.onnx"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the cell's run directory was moved or deleted; rerun the grid cell")
    model = onnx.load(str(path))
    feeds = make_feeds(model, 1, 128)
    pick = 1 if clock == "cpu" else 0

    def t(call: Callable[[], object]) -> float:
        return 1e3 * time_calls(call, runs)[pick]

    name = f"{cell.task}-{cell.block}-{cell.ratio:g}"
    ort_dense = t(_ort_model(model, feeds, threads))
    call, d0, _ = _tvm_model(model, work, f"{name}-dense", 1, 128)
    tvm_dense = t(call)
    auto = compress_model(model, reorder_block=cell.block, form="auto", verify=True).model
    ort_auto = t(_ort_model(auto, feeds, threads))
    call, d1, _ = _tvm_model(auto, work, f"{name}-auto", 1, 128)
    tvm_auto = t(call)
    bsr = compress_model(model, reorder_block=cell.block, form="bsr", verify=True).model
    call, d2, _ = _tvm_model(bsr, work, f"{name}-bsr", 1, 128)
    tvm_bsr = t(call)
    row = SpeedRow(cell.task, cell.block or "-", cell.ratio or 0.0, cell.compression_rate, cell.metric_name,
                   cell.metric, cell.dense_metric, ort_dense, tvm_dense, _forms(auto), ort_auto, tvm_auto, tvm_bsr,
                   max(d0, d1, d2), cell.run_dir)
    log(f"  {name}: ORT dense {ort_dense:.1f} ms, TVM dense {tvm_dense:.1f}, auto ORT {ort_auto:.1f} / TVM "
        f"{tvm_auto:.1f}, bsr TVM {tvm_bsr:.1f} ms (best {row.ort_dense_ms / min(tvm_auto, tvm_bsr, ort_auto):.2f}x)")
    return row


def markdown(rows: list[SpeedRow], meta: dict[str, Any]) -> str:
    out = ["## Speed at the accuracy grid's compression (trained masks, whole model)", "",
           f"{meta['date']}, CPU: {meta['cpu']}; threads {meta['threads']} for both engines; batch 1, sequence 128; "
           f"medians of {meta['runs']} calls, **{meta['clock']}** clock. Command: `{meta['command']}`.", "",
           "Speed-ups are over onnxruntime on the dense graph (same ONNX, zeros included). *auto* = "
           "`blockprune compress` default policy (Reorder, Compact, per-layer form); *bsr* = every pruned "
           "layer block-sparse. Metric in points.", "",
           "| task | block | ratio | CR | metric (dense) | ORT dense ms | TVM dense | auto forms | ORT auto | TVM auto | "
           "TVM bsr | best speed-up | max diff |",
           "|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = max(r.speedup(r.ort_auto_ms), r.speedup(r.tvm_auto_ms), r.speedup(r.tvm_bsr_ms))
        out.append(
            f"| {r.task} | {r.block} | {r.ratio:g} | {r.compression_rate:.2f}x | {100 * r.metric:.2f} "
            f"({100 * r.dense_metric:.2f}) | {r.ort_dense_ms:.1f} | {r.tvm_dense_ms:.1f} "
            f"({r.speedup(r.tvm_dense_ms):.2f}x) | {r.auto_forms} | {r.ort_auto_ms:.1f} ({r.speedup(r.ort_auto_ms):.2f}x) | "
            f"{r.tvm_auto_ms:.1f} ({r.speedup(r.tvm_auto_ms):.2f}x) | {r.tvm_bsr_ms:.1f} ({r.speedup(r.tvm_bsr_ms):.2f}x) | "
            f"**{best:.2f}x** | {r.max_abs_diff:.1e} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS / "accuracy.json", help="the accuracy grid's JSON")
    ap.add_argument("--cells", choices=["best", "all"], default="best")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    ap.add_argument("--blocks", default=None, help="comma-separated subset of block shapes")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "speed_at_accuracy.json")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm starts its thread pool
    from blockprune.bench_timing import cpu_name
    from blockprune.io import atomic_path

    if not args.results.is_file():
        raise SystemExit(f"{args.results} does not exist; run benchmarks/accuracy.py first")
    _, cells = load_cells(args.results)
    chosen = pick_cells(cells, args.cells, args.tolerance)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        chosen = [c for c in chosen if c.task in wanted]
    if args.blocks:
        chosen = [c for c in chosen if c.block in set(args.blocks.split(","))]
    if not chosen:
        raise SystemExit("no cell to measure: no pruned cell within the tolerance of dense (try --cells all)")
    clock = "cpu" if args.threads == 1 else "wall"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": args.threads, "runs": args.runs,
            "clock": clock, "command": "python benchmarks/speed_at_accuracy.py " + " ".join(argv or sys.argv[1:])}
    rows: list[SpeedRow] = []
    with tempfile.TemporaryDirectory(prefix="bp-speed-acc-") as tmp:
        for cell in chosen:
            rows.append(measure_cell(cell, args.threads, args.runs, clock, Path(tmp), lambda s: print(s, flush=True)))
            with atomic_path(args.out) as tmp_json:
                tmp_json.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
            with atomic_path(args.out.with_suffix(".md")) as tmp_md:
                tmp_md.write_text(markdown(rows, meta))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
