"""Accuracy vs compression: the reweighted group Lasso recipe on GLUE, one resumable grid.

Why: the claim "prune 5x, lose under a point" needs the same protocol on every task, and a
grid this size (5 tasks x 2 block shapes x 4 ratios) takes many CPU hours, so it must survive
interruption and never redo finished work.

For each task (default SST-2, MRPC, RTE, CoLA, STS-B) with the bundled MiniLM-L6:

1. **dense** fine-tune once (``run_recipe(..., stop_after="dense")`` in ``RUNS/<task>/dense``);
2. per block shape, the **reweighted** group-Lasso stage once, starting from the dense
   checkpoint (``--model <dense ckpt> epochs_dense=0 stop_after="reweighted"``); the penalty
   does not depend on the ratio, so every ratio of that block shares it;
3. per ratio, hard prune + **masked retraining** from the reweighted checkpoint
   (``epochs_dense=0 epochs_rew=0``), i.e. the same computation as one full recipe call.

Resumption works on two levels: each finished cell is written to the results JSON at once and
skipped on a rerun, and an interrupted cell resumes inside the recipe from its own
``state.json``/checkpoints (the recipe's mechanism; the runs live under ``--runs-dir``).

Outputs: ``benchmarks/results/accuracy.{json,md,png}`` (``accuracy_quick.*`` with ``--quick``,
so a smoke run never mixes with real results). The Markdown gives, per task and block shape,
the dense metric, the highest compression rate whose metric is within ``--tolerance`` (1
point) of dense and that metric, and the average of those rates.

Usage::

    python benchmarks/accuracy.py                      # the full grid (many hours on CPU)
    python benchmarks/accuracy.py --background         # same, detached, log in runs/accuracy/log.txt
    python benchmarks/accuracy.py --quick              # smoke run: 2 tasks, tiny limits
    python benchmarks/accuracy.py --report-only        # rebuild md/png from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FORMAT = "blockprune.accuracy/1"
TASKS = ("SST-2", "MRPC", "RTE", "CoLA", "STS-B")
RATIOS = (0.3, 0.5, 0.7, 0.8)
BLOCKS = ("1x32", "4x4")


# --------------------------------------------------------------------------------------------
# Settings and the results file
# --------------------------------------------------------------------------------------------


@dataclass
class GridSettings:
    """What every cell is computed with; stored in the JSON so a resume cannot mix settings."""

    model: str = "minilm"
    epochs_dense: int = 3
    epochs_rew: int = 3
    epochs_retrain: int = 3
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    lam: float = 1e-4
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    exporter: str = "dynamo"
    distill: float = 0.0  # masked retraining with the pre-pruning model as teacher (cells in rgl-<block>-kd/)


@dataclass
class Cell:
    """One finished grid point. ``kind`` is ``dense`` (block/ratio None) or ``pruned``."""

    task: str
    kind: str
    metric_name: str
    metric: float
    dense_metric: float
    block: str | None = None
    ratio: float | None = None
    compression_rate: float = 1.0
    reweighted_metric: float | None = None
    seconds: float = 0.0
    run_dir: str = ""
    finished_at: str = ""

    @property
    def key(self) -> str:
        return cell_key(self.task, self.block, self.ratio)


def cell_key(task: str, block: str | None, ratio: float | None) -> str:
    return f"{task}/dense" if block is None else f"{task}/rgl/{block}/{ratio:g}"


class ResultsFile:
    """The JSON of finished cells, rewritten atomically after each one."""

    def __init__(self, path: Path, settings: GridSettings) -> None:
        self.path = path
        self.settings = settings
        self.cells: dict[str, Cell] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path} is not valid JSON ({err.msg}); move it away to start over")
            stored = {**asdict(GridSettings()), **data.get("settings", {})}  # fields added later: defaults
            if stored != asdict(settings):
                diff = {k: (stored.get(k), v) for k, v in asdict(settings).items() if stored.get(k) != v}
                raise SystemExit(f"{path} holds cells computed with other settings {diff} (stored, now); "
                                 "use the same flags to resume, or --results OTHER.json for a new grid")
            self.cells = {k: Cell(**v) for k, v in data.get("cells", {}).items()}

    def done(self, key: str) -> bool:
        return key in self.cells

    def add(self, cell: Cell) -> None:
        """Record one finished cell. Several grid processes (say one per ``--tasks`` subset, one
        per core) may share the file: under a lock, the cells other processes wrote meanwhile are
        merged in before the atomic rewrite, so no process overwrites another's results."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                data = json.loads(self.path.read_text())
                for k, v in data.get("cells", {}).items():
                    self.cells.setdefault(k, Cell(**v))
            self.cells[cell.key] = cell
            self.save()

    def refresh(self, key: str) -> Cell | None:
        """The cell ``key`` as another process may have written it since this one started."""
        if key not in self.cells and self.path.is_file():
            data = json.loads(self.path.read_text())
            if key in data.get("cells", {}):
                self.cells[key] = Cell(**data["cells"][key])
        return self.cells.get(key)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "settings": asdict(self.settings),
                                   "cells": {k: asdict(c) for k, c in sorted(self.cells.items())}}, indent=1) + "\n")
        os.replace(tmp, self.path)


def load_cells(path: Path) -> tuple[dict[str, Any], list[Cell]]:
    """(settings, cells) of a results JSON, for reporting without running anything."""
    data = json.loads(Path(path).read_text())
    return data.get("settings", {}), [Cell(**v) for v in data.get("cells", {}).values()]


# --------------------------------------------------------------------------------------------
# Summary logic (unit-tested)
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSummary:
    """Per task and block shape: the best compression that stays within tolerance of dense.

    ``best_rate`` is 1.0 (the dense model) when no pruned cell is within tolerance, because
    then the model one would ship is the dense one; ``best_ratio``/``best_metric`` are None.
    """

    task: str
    block: str
    metric_name: str
    dense_metric: float
    best_rate: float = 1.0
    best_metric: float | None = None
    best_ratio: float | None = None
    cells: int = 0


def summarize(cells: Iterable[Cell], tolerance: float = 0.01) -> list[TaskSummary]:
    """One summary per (task, block) that has a dense cell; "within 1 point" means
    ``metric >= dense_metric - tolerance`` with metrics on their 0..1 scale (1 point = 0.01)."""
    cells = list(cells)
    dense = {c.task: c for c in cells if c.kind == "dense"}
    out: list[TaskSummary] = []
    for task in sorted(dense, key=_task_order):
        d = dense[task]
        for block in sorted({c.block for c in cells if c.task == task and c.kind == "pruned"}):
            s = TaskSummary(task, block, d.metric_name, d.metric)
            for c in cells:
                if c.task != task or c.block != block or c.kind != "pruned":
                    continue
                s.cells += 1
                if c.metric >= d.metric - tolerance - 1e-12 and c.compression_rate > s.best_rate:
                    s.best_rate, s.best_metric, s.best_ratio = c.compression_rate, c.metric, c.ratio
            out.append(s)
    return out


def average_rates(summaries: Iterable[TaskSummary]) -> dict[str, float]:
    """Mean of the per-task best compression rates, per block shape (arithmetic mean of rates)."""
    by_block: dict[str, list[float]] = {}
    for s in summaries:
        by_block.setdefault(s.block, []).append(s.best_rate)
    return {b: sum(v) / len(v) for b, v in sorted(by_block.items())}


def _task_order(task: str) -> int:
    return TASKS.index(task) if task in TASKS else len(TASKS)


def _pts(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def markdown(settings: dict[str, Any], cells: list[Cell], tolerance: float, png: str | None,
             title: str = "Accuracy vs compression (MiniLM-L6, GLUE dev)") -> str:
    summaries = summarize(cells, tolerance)
    avg = average_rates(summaries)
    out = [f"## {title}", "",
           "Metrics in points (x100): accuracy (SST-2, RTE), F1 (MRPC), Matthews corr. (CoLA), mean of "
           "Pearson and Spearman (STS-B). Compression rate as the paper counts it (every 2-D weight except "
           "embeddings; pooler and classifier stay dense but are counted).", "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
           f"### Best compression within {100 * tolerance:g} point of dense", "",
           "| task | metric | block | dense | highest CR within tolerance | its metric | its ratio | cells |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        out.append(f"| {s.task} | {s.metric_name} | {s.block} | {_pts(s.dense_metric)} | "
                   f"{s.best_rate:.2f}x{'' if s.best_ratio is not None else ' (none: dense)'} | "
                   f"{_pts(s.best_metric)} | {'-' if s.best_ratio is None else f'{s.best_ratio:g}'} | {s.cells} |")
    out += [""] + [f"- average of those rates, {b}: **{v:.2f}x** over {sum(1 for s in summaries if s.block == b)} "
                   f"task(s)" for b, v in avg.items()]
    out += ["", "### All cells", "",
            "| task | block | ratio | CR | dev metric | vs dense (points) | after reweighting | minutes |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(cells, key=lambda c: (_task_order(c.task), c.kind != "dense", c.block or "", c.ratio or 0)):
        delta = "-" if c.kind == "dense" else f"{100 * (c.metric - c.dense_metric):+.2f}"
        out.append(f"| {c.task} | {c.block or 'dense'} | {'-' if c.ratio is None else f'{c.ratio:g}'} | "
                   f"{c.compression_rate:.2f}x | {_pts(c.metric)} | {delta} | {_pts(c.reweighted_metric)} | "
                   f"{c.seconds / 60:.1f} |")
    if png:
        out += ["", f"![metric vs compression rate]({png})"]
    return "\n".join(out) + "\n"


def plot(cells: list[Cell], path: Path) -> Path:
    """Metric vs compression rate, one line per task (dense: dashed line), one panel per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted({c.block for c in cells if c.kind == "pruned"}) or ["-"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tasks = sorted({c.task for c in cells}, key=_task_order)
    for ax, block in zip(axes.flat, blocks):
        for i, task in enumerate(tasks):
            color = colors[i % len(colors)]
            dense = next((c for c in cells if c.task == task and c.kind == "dense"), None)
            pts = sorted((c.compression_rate, 100 * c.metric) for c in cells
                         if c.task == task and c.block == block and c.kind == "pruned")
            if dense is not None:
                ax.axhline(100 * dense.metric, color=color, ls="--", lw=1)
                pts = [(1.0, 100 * dense.metric)] + pts
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=task)
        ax.set_title(f"block {block} (dashed: dense)")
        ax.set_xlabel("compression rate (x)")
        ax.set_ylabel("dev metric (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Path, tolerance: float) -> Path:
    settings, cells = load_cells(results)
    png = results.with_suffix(".png")
    if cells:
        plot(cells, png)
    md_path = results.with_suffix(".md")
    md_path.write_text(markdown(settings, cells, tolerance, png.name if cells else None))
    return md_path


# --------------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------------


@dataclass
class Grid:
    settings: GridSettings
    tasks: list[str]
    blocks: list[str]
    ratios: list[float]
    data_dir: Path
    runs_dir: Path
    threads: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _config(grid: Grid, task: str, out: Path, **kw: Any):
    from blockprune.frontends.recipe import RecipeConfig

    s = grid.settings
    base = dict(model=s.model, task=task, data_dir=str(grid.data_dir), out=str(out), epochs_dense=s.epochs_dense,
                epochs_rew=s.epochs_rew, epochs_retrain=s.epochs_retrain, lr_dense=s.lr, lr_rew=s.lr,
                lr_retrain=s.lr, distill=s.distill, batch_size=s.batch_size, max_length=s.max_length, lam=s.lam, seed=s.seed,
                limit_train=s.limit_train, limit_eval=s.limit_eval, exporter=s.exporter, threads=grid.threads,
                progress=grid.progress)
    base.update(kw)
    return RecipeConfig(**base)


def run_grid(grid: Grid, results: ResultsFile, log=print) -> None:
    """Dense fine-tunes of every task first, then block-major (every task at the first block
    shape before any task at the second), so an interrupted grid has the main table complete."""
    from blockprune.frontends.recipe import checkpoint_dir, run_recipe

    stamp = lambda: time.strftime("%Y-%m-%d %H:%M")  # noqa: E731
    for task in grid.tasks:
        dense_out = grid.runs_dir / task / "dense"
        dense_key = cell_key(task, None, None)
        if results.refresh(dense_key) is None:
            log(f"[{stamp()}] {task}: dense fine-tune -> {dense_out}")
            t0 = time.perf_counter()
            res = run_recipe(_config(grid, task, dense_out, stop_after="dense", distill=0.0))
            results.add(Cell(task, "dense", res.metric_name, res.metrics["dense"], res.metrics["dense"],
                             seconds=time.perf_counter() - t0, run_dir=str(dense_out), finished_at=stamp()))
    for block in grid.blocks:
        for task in grid.tasks:
            tdir = grid.runs_dir / task
            dense = results.cells[cell_key(task, None, None)]
            dense_ckpt = checkpoint_dir(tdir / "dense", "dense")
            shared_out = tdir / f"rgl-{block}" / "reweighted"
            shared_ckpt = checkpoint_dir(shared_out, "reweighted")
            rew_metric: float | None = None  # the ratio only matters after this stage: one fixed value
            for ratio in grid.ratios:
                key = cell_key(task, block, ratio)
                if results.refresh(key) is not None:
                    continue
                t0 = time.perf_counter()
                if rew_metric is None:
                    log(f"[{stamp()}] {task} {block}: reweighted group Lasso -> {shared_out}")
                    res = run_recipe(_config(grid, task, shared_out, model=str(dense_ckpt), epochs_dense=0,
                                             block=block, ratio=grid.ratios[0], stop_after="reweighted",
                                             distill=0.0))
                    rew_metric = res.metrics["reweighted"]
                    shared_seconds = time.perf_counter() - t0
                else:
                    shared_seconds = 0.0
                out = tdir / f"rgl-{block}{'-kd' if grid.settings.distill else ''}" / f"r{ratio:g}"
                log(f"[{stamp()}] {task} {block} ratio {ratio:g}: prune + masked retraining -> {out}")
                t1 = time.perf_counter()
                res = run_recipe(_config(grid, task, out, model=str(shared_ckpt), epochs_dense=0, epochs_rew=0,
                                         block=block, ratio=ratio))
                results.add(Cell(task, "pruned", res.metric_name, res.report["pruned_metric"], dense.metric,
                                 block=block, ratio=ratio, compression_rate=res.compression_rate,
                                 reweighted_metric=rew_metric, seconds=shared_seconds + time.perf_counter() - t1,
                                 run_dir=str(out), finished_at=stamp()))
                log(f"[{stamp()}] {task} {block} ratio {ratio:g}: {res.metric_name} {res.report['pruned_metric']:.4f} "
                    f"(dense {dense.metric:.4f}), CR {res.compression_rate:.2f}x")


def _background(argv: list[str], log_path: Path) -> int:
    """Re-run this script detached (own session, output to ``log_path``) and return at once."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [a for a in argv if a != "--background"]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args, "--no-progress"],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    print(f"started in the background: pid {proc.pid}, log {log_path}; rerun the same command to resume")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue", help="GLUE root")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    ap.add_argument("--blocks", default=",".join(BLOCKS))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--epochs-dense", type=int, default=3)
    ap.add_argument("--epochs-rew", type=int, default=3)
    ap.add_argument("--epochs-retrain", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="masked retraining with the pre-pruning model as teacher (share A of the loss; 0: off); "
                         "dense and reweighted stages are shared with the grid without it")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (not part of the settings)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="'within 1 point' = 0.01 on the 0..1 scale")
    ap.add_argument("--results", type=Path, default=None, help="results JSON (default accuracy[_quick].json)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="recipe run dirs (default runs/accuracy[-quick])")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: RTE + STS-B, ratios 0.5/0.8, 48 train / 32 dev examples, 1 epoch per stage")
    ap.add_argument("--background", action="store_true", help="detach; output to RUNS_DIR/log.txt")
    ap.add_argument("--report-only", action="store_true", help="only rebuild md/png from the results JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.ratios = "RTE,STS-B", "0.5,0.8"
        args.epochs_dense = args.epochs_rew = args.epochs_retrain = 1
        args.limit_train, args.limit_eval, args.max_length, args.batch_size = 48, 32, 64, 16
        args.exporter = "legacy"
    suffix = "_quick" if args.quick else ""
    args.results = args.results or RESULTS / f"accuracy{suffix}.json"
    args.runs_dir = args.runs_dir or ROOT / "runs" / f"accuracy{suffix.replace('_', '-')}"
    # absolute: the run directories' configs record checkpoint paths, and a resume (or a second grid
    # sharing the dense and reweighted stages) must see the same path however the flag was spelled
    args.runs_dir = args.runs_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.background:
        return _background(raw, args.runs_dir / "log.txt")
    if not args.report_only:
        settings = GridSettings(model=args.model, epochs_dense=args.epochs_dense, epochs_rew=args.epochs_rew,
                                epochs_retrain=args.epochs_retrain, lr=args.lr, batch_size=args.batch_size,
                                max_length=args.max_length, lam=args.lam, seed=args.seed,
                                limit_train=args.limit_train, limit_eval=args.limit_eval, exporter=args.exporter,
                                distill=args.distill)
        grid = Grid(settings, [t for t in args.tasks.split(",") if t], [b for b in args.blocks.split(",") if b],
                    [float(r) for r in args.ratios.split(",") if r], args.data_dir, args.runs_dir, args.threads,
                    progress=not args.no_progress)
        results = ResultsFile(args.results, settings)
        try:
            run_grid(grid, results)
        finally:
            if results.cells:
                print(f"report: {write_report(args.results, args.tolerance)}")
    elif args.results.is_file():
        print(f"report: {write_report(args.results, args.tolerance)}")
    else:
        raise SystemExit(f"{args.results} does not exist yet; run the grid first")
    print(Path(args.results).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
