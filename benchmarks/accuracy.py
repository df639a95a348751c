"""Accuracy vs compression on GLUE (and zero-shot STS-B for the embedding mode), one resumable grid.

Two recipes:

* ``--method gradual`` (the default now, issue #12): per task one dense fine-tune (the teacher),
  then per cell (block, ratio) gradual pruning on a cubic schedule for ``--epochs-rew`` epochs and
  ``--epochs-retrain`` epochs with the masks fixed, both distilled from the dense model (logits,
  ``--distill``, and hidden states, ``--distill-hidden``), activation-aware block scores, per-layer
  ratios from measured sensitivity (``--allocation``). The dense *baseline* is the dense model
  fine-tuned for as many more epochs as a pruned cell trains (same total budget). Cells: 16x1 at
  0.5/0.7/0.8, 1x32 and 4x4 at 0.5 (``--cells``). SST-2 training is capped (``--sst2-limit-train``).
  Results in ``accuracy_gradual.{json,md,png}``, runs in ``runs/accuracy-gradual``.
* ``--method rgl``: the first grid (reweighted group Lasso, below), kept to reproduce
  ``accuracy.json``.
* ``--embedding``: the task-agnostic mode (``blockprune train --mode embedding``) on GLUE train
  sentences, 16x1 at 0.3/0.5/0.7, scored by zero-shot STS-B dev Spearman vs compression
  (``accuracy_embedding.*``).

The first grid, ``--method rgl``:

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

    python benchmarks/accuracy.py --background         # the gradual grid, detached (many hours on CPU)
    python benchmarks/accuracy.py --embedding --background   # the embedding grid
    python benchmarks/accuracy.py --quick [--embedding]      # smoke run: tiny limits, minutes
    python benchmarks/accuracy.py --method rgl         # the first grid (reweighted group Lasso)
    python benchmarks/accuracy.py --background         # same, detached, log in runs/accuracy/log.txt
    python benchmarks/accuracy.py --quick              # smoke run: 2 tasks, tiny limits
    python benchmarks/accuracy.py --report-only        # rebuild md/png from the JSON
    python benchmarks/accuracy.py --ablation --tasks MRPC,STS-B --ablation-methods rgl-targeted --seeds 0,1,2
                                                       # mask selection at 16x1 0.7 from the grid's teachers
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FORMAT = "blockprune.accuracy/1"
TASKS = ("SST-2", "MRPC", "RTE", "CoLA", "STS-B")
RATIOS = (0.3, 0.5, 0.7, 0.8)
BLOCKS = ("1x32", "4x4")
#: the gradual grid's cells (block, ratio), in the order they run
CELLS = (("16x1", 0.5), ("16x1", 0.7), ("16x1", 0.8), ("1x32", 0.5), ("4x4", 0.5), ("16x1", 0.3))
EMBEDDING_RATIOS = (0.3, 0.5, 0.7)
EMBEDDING_TASK = "STS-B (zero-shot embedding)"
DEFAULT_DISTILL = 0.5  # the gradual recipe's logit-distillation weight (``--distill``)
DEFAULT_DISTILL_HIDDEN = 1.0  # and its hidden-state weight (``--distill-hidden``)


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
    # added with the gradual recipe; the defaults reproduce the first (rgl) grid
    method: str = "rgl"
    rgl_form: str = "penalty"
    score: str = "weight"
    distill_hidden: float = 0.0
    allocation: str = "uniform"
    sst2_limit_train: int | None = None
    freeze_embeddings: bool = False
    sensitivity_examples: int = 128
    calib_examples: int = 256
    augment: int = 0  # teacher-only perturbed copies per training example in the distilled stages
    #: what the pruned cells distil from: "start" (the 3-epoch dense model they start from) or
    #: "baseline" (the dense baseline row's model, fine-tuned as many epochs as a pruned cell)
    teacher: str = "start"
    #: the learning rate of the pruned cells' stages (gradual pruning, retraining); None: ``lr``,
    #: the dense runs' rate. Sharing the dense runs, a variant changes how the student learns only
    lr_pruned: float | None = None
    #: a learning rate of a task's own (dense runs and cells), e.g. {"CoLA": 5e-5}: the rate is the
    #: lever on CoLA (its 3-epoch start gains 7 points at 5e-5) and a grid should not have to move
    #: every task to read one; such a task's runs live in ``<task>-lr<LR>/`` (see :func:`task_dir`)
    task_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class EmbeddingGridSettings:
    """What every embedding cell is computed with (``blockprune train --mode embedding``)."""

    model: str = "minilm"
    text: str = "runs/embedding/sentences.txt"
    block: str = "16x1"
    epochs_gradual: int = 3
    epochs_retrain: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    hidden_weight: float = 1.0
    allocation: str = "sensitivity"
    seed: int = 0
    limit_train: int | None = 20000
    limit_eval: int | None = None
    exporter: str = "dynamo"
    freeze_embeddings: bool = True
    sensitivity_examples: int = 128
    calib_examples: int = 256
    # added later; the defaults reproduce the grids committed before them
    relation_weight: float = 0.0
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9])


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
    method: str = "rgl"
    teacher_metric: float | None = None  # gradual: the dense model distilled from (fewer epochs)
    allocation: dict[str, float] | None = None
    seed: int = 0  # the pruning run's seed (the dense teacher is always the settings' seed)

    @property
    def key(self) -> str:
        return cell_key(self.task, self.block, self.ratio, self.method, self.seed)


def run_key(run_dir: str | os.PathLike) -> str | None:
    """A recorded ``run_dir`` without the checkout it ran in: its part from the last ``runs``
    component on (``runs/...``, '/'-joined), or None when it has none. Why: cells record absolute
    run dirs of whichever clone or lent machine trained them; mask archives, speed files and
    rebuilt configs name a run by this key, so they match in any clone. The last one, because the
    checkout's own path may hold a ``runs`` folder (``/home/me/runs/blockprune/runs/...``), while
    the directories a grid makes below its runs dir are named by task, variant and ratio."""
    parts = Path(run_dir).parts
    at = [i for i, part in enumerate(parts) if part == "runs"]
    return "/".join(parts[at[-1]:]) if at else None


def cell_key(task: str, block: str | None, ratio: float | None, method: str = "rgl", seed: int = 0) -> str:
    if block is None:
        return f"{task}/dense"
    return f"{task}/{method}/{block}/{ratio:g}" + (f"/s{seed}" if seed else "")


class ResultsFile:
    """The JSON of finished cells, rewritten atomically after each one."""

    def __init__(self, path: Path, settings: Any) -> None:
        self.path = path
        self.settings = settings
        self.cells: dict[str, Cell] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path} is not valid JSON ({err.msg}); move it away to start over")
            stored = {**asdict(type(settings)()), **data.get("settings", {})}  # fields added later: defaults
            if stored != asdict(settings):
                diff = {k: (stored.get(k), v) for k, v in asdict(settings).items() if stored.get(k) != v}
                raise SystemExit(f"{path} holds cells computed with other settings {diff} (stored, now); "
                                 "use the same flags to resume, or --results OTHER.json for a new grid")
            self.cells = {k: Cell(**v) for k, v in data.get("cells", {}).items()}

    def done(self, key: str) -> bool:
        return key in self.cells

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while this file, or what is written beside it from its cells, is rewritten: several
        grid processes (say one per ``--tasks`` subset, one per core) share the file."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def add(self, cell: Cell) -> None:
        """Record one finished cell. Under the lock, the cells other processes wrote meanwhile are
        merged in before the atomic rewrite, so no process overwrites another's results."""
        with self.locked():
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


def seed_means(cells: Iterable[Cell]) -> list[tuple[Cell, int, float]]:
    """Cells run with several seeds (same task, method, block, ratio) folded into one: (the seed-0
    cell, or the first, with ``metric`` replaced by the mean over seeds; how many seeds; their
    standard deviation, 0 for one). Why: a small dev set (RTE's 277 examples: one example = 0.36
    points) makes a single seed's "within 1 point" a coin toss; the mean is what a user can expect."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.kind, c.method, c.block, c.ratio), []).append(c)
    out = []
    for group in groups.values():
        group.sort(key=lambda c: c.seed)
        vals = [c.metric for c in group]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out.append((dataclasses.replace(group[0], metric=mean), len(vals), std))
    return out


def summarize(cells: Iterable[Cell], tolerance: float = 0.01) -> list[TaskSummary]:
    """One summary per (task, block) that has a dense cell; "within 1 point" means
    ``metric >= dense_metric - tolerance`` with metrics on their 0..1 scale (1 point = 0.01).
    Cells run with several seeds count with their mean (:func:`seed_means`)."""
    cells = [c for c, _, _ in seed_means(cells)]
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
            "Several seeds: the mean, with `± std (n seeds)`; the dense teacher is the same for every seed.", "",
            "| task | block | ratio | CR | dev metric | vs dense (points) | after reweighting | minutes |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    folded = seed_means(cells)
    for c, n, std in sorted(folded, key=lambda x: (_task_order(x[0].task), x[0].kind != "dense", x[0].block or "",
                                                   x[0].ratio or 0)):
        delta = "-" if c.kind == "dense" else f"{100 * (c.metric - c.dense_metric):+.2f}"
        spread = f" ± {100 * std:.2f} ({n} seeds)" if n > 1 else ""
        shape = (c.block or "dense") + (f" ({c.method})" if c.method == "transfer" else "")
        out.append(f"| {c.task} | {shape} | {'-' if c.ratio is None else f'{c.ratio:g}'} | "
                   f"{c.compression_rate:.2f}x | {_pts(c.metric)}{spread} | {delta} | {_pts(c.reweighted_metric)} | "
                   f"{c.seconds / 60:.1f} |")
    if png:
        out += ["", f"![metric vs compression rate]({png})"]
    return "\n".join(out) + "\n"


def plot(cells: list[Cell], path: Path) -> Path:
    """Metric vs compression rate, one line per task (dense: dashed line), one panel per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c, _, _ in seed_means(cells)]
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
    cells: list[tuple[str, float]] | None = None  # gradual grid: (block, ratio) in order
    stage: str = "all"  # gradual grid: all, teacher, baseline or cells (see run_gradual_grid)
    seeds: list[int] | None = None  # gradual grid / ablation: the pruning runs' seeds
    baseline: "ResultsFile | None" = None  # ablation: the gradual grid's results (its dense rows)
    transfer_from: Path | None = None  # gradual grid: embedding-grid runs dir; adds a transfer cell per cell
    keep_masks: bool = True  # merge each finished cell's masks into masks/<results stem>.tar.xz


def _limit_train(s: GridSettings, task: str) -> int | None:
    if task == "SST-2" and s.sst2_limit_train is not None:
        return min(s.sst2_limit_train, s.limit_train or s.sst2_limit_train)
    return s.limit_train


def task_lr(s: GridSettings, task: str) -> float:
    """The learning rate of ``task``'s dense runs and (without ``lr_pruned``) of its cells."""
    return s.task_lr.get(task, s.lr)


def task_dir(grid: Grid, task: str) -> Path:
    """Where ``task``'s runs live. A task at a rate of its own (``--task-lr``) trains its own dense
    runs, so they get their own directory (``CoLA-lr5e-05``): a runs dir shared with a grid at the
    plain rate must neither resume nor overwrite the other rate's checkpoints."""
    lr = task_lr(grid.settings, task)
    return grid.runs_dir / (task if lr == grid.settings.lr else f"{task}-lr{lr:g}")


def _config(grid: Grid, task: str, out: Path, **kw: Any):
    from blockprune.frontends.recipe import RecipeConfig

    s = grid.settings
    lr = task_lr(s, task)
    base = dict(model=s.model, task=task, data_dir=str(grid.data_dir), out=str(out), epochs_dense=s.epochs_dense,
                epochs_rew=s.epochs_rew, epochs_retrain=s.epochs_retrain, lr_dense=lr, lr_rew=lr,
                lr_retrain=lr, distill=s.distill, batch_size=s.batch_size, max_length=s.max_length, lam=s.lam, seed=s.seed,
                limit_train=_limit_train(s, task), limit_eval=s.limit_eval, exporter=s.exporter, threads=grid.threads,
                progress=grid.progress, rgl_form=s.rgl_form, score=s.score, freeze_embeddings=s.freeze_embeddings,
                calib_examples=s.calib_examples, sensitivity_examples=s.sensitivity_examples,
                # the paper's RGL stage, as the committed grids and ablation rows ran it (the recipe's
                # default is now the targeted, distilled stage); rgl-targeted asks for that explicitly
                rgl_scope="all", rgl_distill=False)
    base.update(kw)
    # the perturbed copies are teacher-labelled: the dense teacher and baseline (no teacher) train without them
    base["augment"] = s.augment if base["distill"] else 0
    return RecipeConfig(**base)


def run_grid(grid: Grid, results: ResultsFile, log=print) -> None:
    """Dense fine-tunes of every task first, then block-major (every task at the first block
    shape before any task at the second), so an interrupted grid has the main table complete."""
    if grid.settings.method == "gradual":
        return run_gradual_grid(grid, results, log)
    if grid.settings.task_lr:
        raise SystemExit("a rate of a task's own (task_lr) is a gradual-grid setting; the rgl grid runs every task at lr")
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


def run_gradual_grid(grid: Grid, results: ResultsFile, log=print) -> None:
    """Per task: the dense teacher (``epochs_dense``) and the same-budget dense baseline (the
    teacher fine-tuned ``epochs_rew + epochs_retrain`` more epochs); then cell-major over
    ``grid.cells`` (every task at the first cell before any at the second): gradual pruning +
    retraining from the teacher's checkpoint, both distilled from it, once per seed in ``grid.seeds``.

    ``grid.stage`` splits this work so that several processes (one per core, or many sharing one
    GPU; see ``accuracy_parallel.py``) can run it: ``teacher`` trains the teachers only,
    ``baseline`` the baselines (after the teacher), ``cells`` the pruned cells (their teacher must
    exist; each waits for its task's baseline only to record its row); ``all`` does everything in
    order."""
    stage = grid.stage
    for task in grid.tasks:
        if stage == "teacher":
            _gradual_teacher(grid, task, log)
        elif stage in ("all", "baseline"):
            recorded = results.refresh(cell_key(task, None, None))
            if recorded is None:
                _gradual_baseline(grid, results, task, _gradual_teacher(grid, task, log), log)
            elif _dense_checkpoints_missing(grid, task):
                _rebuild_dense(grid, task, recorded, log)
    if stage not in ("all", "cells"):
        return
    for block, ratio in grid.cells or [(b, r) for b in grid.blocks for r in grid.ratios]:
        for seed in grid.seeds or [grid.settings.seed]:
            for task in grid.tasks:
                if grid.transfer_from is not None:
                    _transfer_cell(grid, results, task, block, ratio, seed, log)
                _gradual_cell(grid, results, task, block, ratio, seed, log)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def _teacher_ckpt(grid: Grid, task: str) -> Path:
    """The task's dense teacher checkpoint, refused if a run there was trained otherwise than this
    grid trains it: a ``--seed 1`` grid pointed at seed 0's runs dir would prune from seed 0's
    teacher without a word (``--stage cells`` and ``--stage teacher`` do not retrain it)."""
    from blockprune.frontends.recipe import checkpoint_dir

    run = task_dir(grid, task) / "dense"
    state = run / "state.json"
    if state.is_file():
        trained = json.loads(state.read_text()).get("config", {})
        s = grid.settings
        want = {"seed": s.seed, "lr_dense": task_lr(s, task), "epochs_dense": s.epochs_dense,
                "batch_size": s.batch_size, "max_length": s.max_length}
        diff = {k: (trained[k], v) for k, v in want.items() if k in trained and trained[k] != v}
        if diff:
            raise SystemExit(f"{task}: the dense teacher in {run} was trained with other settings {diff} "
                             "(there, this grid): give this grid a --runs-dir of its own")
    return checkpoint_dir(run, "dense")


def _gradual_teacher(grid: Grid, task: str, log) -> Any:
    """The dense fine-tune every pruned cell of ``task`` starts from and distils from (resumes)."""
    from blockprune.frontends import recipe

    if grid.stage == "teacher" and (_teacher_ckpt(grid, task) / "config.json").is_file():
        return None  # trained by an earlier call (other stages read its result back: a resume, no training)
    log(f"[{_stamp()}] {task}: dense teacher -> {task_dir(grid, task) / 'dense'}")
    return recipe.run_recipe(_config(grid, task, task_dir(grid, task) / "dense", stop_after="dense", distill=0.0,
                                     method="rgl", rgl_form="penalty", score="weight"))


def _train_baseline(grid: Grid, task: str, log) -> Any:
    """The teacher fine-tuned as many more epochs as a pruned cell trains (resumes)."""
    from blockprune.frontends import recipe

    more = grid.settings.epochs_rew + grid.settings.epochs_retrain
    out = task_dir(grid, task) / "dense-baseline"
    log(f"[{_stamp()}] {task}: dense baseline, {more} more epochs -> {out}")
    return recipe.run_recipe(_config(grid, task, out, model=str(_teacher_ckpt(grid, task)), epochs_dense=more,
                                     stop_after="dense", distill=0.0, method="rgl", rgl_form="penalty",
                                     score="weight"))


def _gradual_baseline(grid: Grid, results: ResultsFile, task: str, teacher: Any, log) -> None:
    """The dense row: the teacher (``teacher``, its run's result) fine-tuned as many more epochs
    as a pruned cell trains."""
    tdir = task_dir(grid, task)
    t0 = time.perf_counter()
    res = teacher
    res2 = _train_baseline(grid, task, log)
    results.add(Cell(task, "dense", res.metric_name, res2.metrics["dense"], res2.metrics["dense"],
                     seconds=time.perf_counter() - t0, run_dir=str(tdir / "dense-baseline"), finished_at=_stamp(),
                     method="dense", teacher_metric=res.metrics["dense"]))


def _dense_checkpoints_missing(grid: Grid, task: str) -> bool:
    """Whether the teacher or the dense baseline a recorded dense row came from is absent here, as on
    a fresh clone: the committed JSON holds the row, but ``runs/`` (the checkpoints the cells start
    from and distil from) is not committed."""
    from blockprune.frontends.recipe import checkpoint_dir

    tdir = task_dir(grid, task)
    need = [_teacher_ckpt(grid, task)]
    if grid.settings.teacher == "baseline":
        need.append(checkpoint_dir(tdir / "dense-baseline", "dense"))
    return any(not (c / "config.json").is_file() for c in need)


#: how far a rebuilt dense row may land from the recorded one (metric units: 0.0001 = 0.01 point)
REBUILD_TOLERANCE = 1e-4


def _rebuild_dense(grid: Grid, task: str, recorded: Cell, log) -> None:
    """Retrain the dense teacher (and the baseline, when the cells distil from it) whose row
    ``recorded`` is already in the results file (their checkpoints are missing: a fresh clone) and
    check that they come out as recorded.

    Training is seeded and runs on the CPU at the recorded settings, so the rerun should land on
    the recorded metrics; if it does not, new cells would distil from, and start at, other models
    than the committed cells did while being compared with the old row, so the grid stops and says
    how to start a results file of its own."""
    tdir = task_dir(grid, task)
    log(f"[{_stamp()}] {task}: dense row recorded but its checkpoints are missing; retraining them -> {tdir}")
    teacher = _gradual_teacher(grid, task, log)
    got = {"teacher_metric": teacher.metrics["dense"]}
    if grid.settings.teacher == "baseline":  # the cells distil from it; otherwise the teacher alone is needed
        got["metric"] = _train_baseline(grid, task, log).metrics["dense"]
    off = {k: (getattr(recorded, k), v) for k, v in got.items()
           if getattr(recorded, k) is not None and abs(getattr(recorded, k) - v) > REBUILD_TOLERANCE}
    if off:
        raise SystemExit(f"{task}: the retrained dense runs in {tdir} differ from the recorded row {off} "
                         "(recorded, now): cells trained from them would not match the committed ones; "
                         "use --results OTHER.json (and another --runs-dir) for a grid of their own")
    log(f"[{_stamp()}] {task}: dense runs rebuilt, as recorded ({recorded.metric:.4f}, "
        f"teacher {recorded.teacher_metric:.4f})")


def _wait_dense(grid: Grid, results: ResultsFile, task: str, timeout_s: float = 6 * 3600) -> Cell:
    """The task's dense row; with ``stage == 'cells'`` another process writes it, so poll."""
    key = cell_key(task, None, None)
    t0 = time.monotonic()
    while (cell := results.refresh(key)) is None:
        if grid.stage != "cells" or time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"{task}: no dense baseline in {results.path}; run --stage baseline for it first")
        time.sleep(10)
    return cell


def gradual_variant(s: GridSettings, task: str | None = None) -> str:
    """The run-dir suffix of a gradual cell trained otherwise than the default recipe, so that a
    variant (another teacher, copies, other distillation weights) shares its task's dense runs in
    one ``--runs-dir`` without resuming, or overwriting, the default cell's checkpoints."""
    variant = "-tbase" if s.teacher == "baseline" else ""
    if s.augment:  # the copies change what is trained
        variant += f"-aug{s.augment}"
    if s.lr_pruned is not None and s.lr_pruned != (s.lr if task is None else task_lr(s, task)):
        variant += f"-lr{s.lr_pruned:g}"
    if s.distill == 0 and s.distill_hidden == 0:
        variant += "-nodistill"
    elif (s.distill, s.distill_hidden) != (DEFAULT_DISTILL, DEFAULT_DISTILL_HIDDEN):
        variant += f"-kd{s.distill:g}-h{s.distill_hidden:g}"
    return variant


def _gradual_cell(grid: Grid, results: ResultsFile, task: str, block: str, ratio: float, seed: int, log) -> None:
    from blockprune.frontends import recipe

    s = grid.settings
    seed_tag = seed if seed != s.seed else 0
    key = cell_key(task, block, ratio, "gradual", seed_tag)
    if results.refresh(key) is not None:
        return
    tdir = task_dir(grid, task)
    teacher = _teacher_ckpt(grid, task)
    if grid.stage == "cells" and not (teacher / "config.json").is_file():
        raise SystemExit(f"{task}: the dense teacher {teacher} is missing; run --stage teacher first")
    suffix = f"-s{seed}" if seed_tag else ""
    given = {}
    if s.teacher == "baseline":  # distil from the dense baseline row's model (trained before the cells)
        _wait_dense(grid, results, task)
        given = {"teacher": str(recipe.checkpoint_dir(tdir / "dense-baseline", "dense"))}
    out = tdir / f"gradual-{block}{gradual_variant(s, task)}" / f"r{ratio:g}{suffix}"
    if s.lr_pruned is not None:
        given.update(lr_rew=s.lr_pruned, lr_retrain=s.lr_pruned)
    log(f"[{_stamp()}] {task} {block} ratio {ratio:g} seed {seed}: gradual pruning + retraining -> {out}")
    t0 = time.perf_counter()
    res = recipe.run_recipe(_config(grid, task, out, model=str(teacher), epochs_dense=0, method="gradual", block=block,
                                    ratio=ratio, seed=seed, distill=s.distill, distill_hidden=s.distill_hidden,
                                    allocation=s.allocation,
                                    sensitivity_file=str(tdir / f"sensitivity-{block}{suffix}.json"), **given))
    _record_cell(grid, results, task, (block, ratio, "gradual", seed_tag), res, out, time.perf_counter() - t0, log)


def _record_cell(grid: Grid, results: ResultsFile, task: str, cell: tuple[str, float, str, int], res: Any,
                 out: Path, seconds: float, log) -> None:
    """One finished pruned run (``cell``: block, ratio, method, seed tag) as a row next to its
    task's dense baseline (waited for if another process writes it)."""
    block, ratio, method, seed_tag = cell
    dense = _wait_dense(grid, results, task)
    alloc = (res.report.get("allocation") or {}).get("ratios") if isinstance(res.report, dict) else None
    results.add(Cell(task, "pruned", res.metric_name, res.report["pruned_metric"], dense.metric,
                     block=block, ratio=ratio, compression_rate=res.compression_rate,
                     seconds=seconds, run_dir=str(out), finished_at=_stamp(),
                     method=method, teacher_metric=dense.teacher_metric, allocation=alloc, seed=seed_tag))
    log(f"[{_stamp()}] {task} {block} ratio {ratio:g} seed {seed_tag} ({method}): {res.metric_name} "
        f"{res.report['pruned_metric']:.4f} (dense baseline {dense.metric:.4f}, teacher {dense.teacher_metric}), "
        f"CR {res.compression_rate:.2f}x")
    if grid.keep_masks:
        keep_cell_masks(results, log)


def masks_archive(results: Path) -> Path:
    """Where a results file's cells' masks are kept: ``masks/<stem>.tar.xz`` beside it (for the
    committed files, ``benchmarks/results/masks/``, as ``keep_masks.py`` writes them)."""
    return results.parent / "masks" / f"{results.stem}.tar.xz"


def keep_cell_masks(results: ResultsFile, log) -> None:
    """Merge the masks of every finished cell of ``results`` into its archive, so that a cell's masks
    are kept (committed with its row) even when its checkout dies before anyone runs
    ``keep_masks.py``. Under the results file's lock: several grid processes finish cells."""
    if str(ROOT / "benchmarks") not in sys.path:  # imported as a module (tests), not run as a script
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from keep_masks import keep

    with results.locked():
        keep([results.path], masks_archive(results.path), log=log)


def _transfer_cell(grid: Grid, results: ResultsFile, task: str, block: str, ratio: float, seed: int, log) -> None:
    """"Prune once, fine-tune per task": the encoder and masks of the task-agnostic embedding run
    at (``block``, ``ratio``) under ``grid.transfer_from`` replace the teacher's encoder, then
    ``epochs_rew + epochs_retrain`` epochs of masked retraining distilled from the teacher: the
    same total epochs, teacher and distillation as the gradual cell next to it."""
    from blockprune.frontends import recipe

    s = grid.settings
    seed_tag = seed if seed != s.seed else 0
    key = cell_key(task, block, ratio, "transfer", seed_tag)
    if results.refresh(key) is not None:
        return
    source = grid.transfer_from / f"{block}-r{ratio:g}"
    teacher = _teacher_ckpt(grid, task)
    if grid.stage == "cells" and not (teacher / "config.json").is_file():
        raise SystemExit(f"{task}: the dense teacher {teacher} is missing; run --stage teacher first")
    out = task_dir(grid, task) / f"transfer-{block}" / f"r{ratio:g}{f'-s{seed}' if seed_tag else ''}"
    log(f"[{_stamp()}] {task} {block} ratio {ratio:g} seed {seed}: transfer from {source} + retraining -> {out}")
    t0 = time.perf_counter()
    res = recipe.run_recipe(_config(grid, task, out, model=str(teacher), epochs_dense=0, method="transfer",
                                    sparse_init=str(source), block=block, ratio=ratio, seed=seed, epochs_rew=0,
                                    epochs_retrain=s.epochs_rew + s.epochs_retrain, distill=s.distill,
                                    distill_hidden=s.distill_hidden, allocation="uniform"))
    _record_cell(grid, results, task, (block, ratio, "transfer", seed_tag), res, out, time.perf_counter() - t0, log)


#: the issue's comparison at one cell: mask selection by each method, the same retraining after it
ABLATION_METHODS = ("magnitude-weight", "magnitude-activation", "rgl-penalty", "rgl-proximal", "rgl-targeted")
ABLATION_SEEDS = {"magnitude-weight": (0, 1, 2), "magnitude-activation": (0,), "rgl-penalty": (0,),
                  "rgl-proximal": (0, 1, 2), "rgl-targeted": (0, 1, 2)}
ABLATION_TASKS = ("MRPC", "STS-B")
ABLATION_CELL = ("16x1", 0.7)


def ablation_config(grid: Grid, task: str, method: str, block: str, ratio: float, seed: int, out: Path):
    """One ablation run from the gradual grid's dense teacher, at the same total epochs as a
    gradual cell (``epochs_rew + epochs_retrain``) and with the same distillation and per-layer
    allocation, so only how the masks are chosen differs:

    * ``magnitude-weight`` / ``magnitude-activation``: one-shot pruning of the teacher by plain
      block norms / activation-aware scores, then all the epochs as masked retraining;
    * ``rgl-penalty`` / ``rgl-proximal``: ``epochs_rew`` epochs of reweighted group Lasso (the
      paper's penalty in the loss, lambda 1e-4 / the proximal step, lambda 10: each form's
      default), hard pruning, then ``epochs_retrain`` of masked retraining; the RGL stage shrinks
      every group and is not distilled (the paper's stage, pinned in ``_config``);
    * ``rgl-targeted``: the proximal form restricted to the groups due for pruning on the gradual
      ramp (``rgl_scope="target"``, per-layer ratios from the allocation) and distilled like the
      other stages (``rgl_distill``): the RGL variant that answers the untargeted cascade."""
    s = grid.settings
    family, _, variant = method.partition("-")
    common = dict(model=str(_teacher_ckpt(grid, task)), epochs_dense=0, block=block, ratio=ratio, seed=seed,
                  distill=s.distill, distill_hidden=s.distill_hidden, allocation=s.allocation)
    if family == "magnitude":
        return _config(grid, task, out, method="magnitude", score=variant, epochs_rew=0,
                       epochs_retrain=s.epochs_rew + s.epochs_retrain,
                       sensitivity_file=str(out.parent.parent / f"sensitivity-{block}-{variant}-s{seed}.json"),
                       **common)
    if method == "rgl-targeted":
        return _config(grid, task, out, method="rgl", rgl_form="proximal", rgl_scope="target",
                       rgl_distill=bool(s.distill or s.distill_hidden), lam=None, score=s.score,
                       # its own file: measured on the teacher (rgl-proximal's is measured after its RGL stage)
                       sensitivity_file=str(out.parent.parent / f"sensitivity-{block}-{s.score}-targeted-s{seed}.json"),
                       **common)
    if family == "rgl":
        return _config(grid, task, out, method="rgl", rgl_form=variant, lam=None, score=s.score,
                       sensitivity_file=str(out.parent.parent / f"sensitivity-{block}-{s.score}-s{seed}.json"),
                       **common)
    raise SystemExit(f"unknown ablation method {method!r}; use one of {', '.join(ABLATION_METHODS)}")


def run_ablation(grid: Grid, results: ResultsFile, methods: Iterable[str], seeds: list[int] | None,
                 log=print) -> None:
    """The ablation cells (:data:`ABLATION_METHODS`) of ``grid.tasks`` at ``grid.cells``, each from
    the gradual grid's teacher (same runs dir); rows recorded next to that grid's dense baseline,
    read from ``baseline_results`` (the gradual grid's JSON)."""
    from blockprune.frontends import recipe

    for block, ratio in grid.cells or [ABLATION_CELL]:
        for method in methods:
            for seed in seeds if seeds is not None else ABLATION_SEEDS[method]:
                for task in grid.tasks:
                    key = cell_key(task, block, ratio, method, seed)
                    if results.refresh(key) is not None:
                        continue
                    if not (_teacher_ckpt(grid, task) / "config.json").is_file():
                        raise SystemExit(f"{task}: the gradual grid's dense teacher is missing under {grid.runs_dir}; "
                                         "run `accuracy.py --stage teacher` first")
                    out = task_dir(grid, task) / "ablation" / f"{method}-{block}-r{ratio:g}-s{seed}"
                    log(f"[{_stamp()}] {task} {method} {block} ratio {ratio:g} seed {seed} -> {out}")
                    t0 = time.perf_counter()
                    res = recipe.run_recipe(ablation_config(grid, task, method, block, ratio, seed, out))
                    # the report reads the dense rows from the grid's file; no need to wait for one here
                    dense = grid.baseline.refresh(cell_key(task, None, None)) if grid.baseline else None
                    results.add(Cell(task, "pruned", res.metric_name, res.report["pruned_metric"],
                                     dense.metric if dense else float("nan"), block=block, ratio=ratio,
                                     compression_rate=res.compression_rate,
                                     reweighted_metric=res.metrics.get("reweighted"),
                                     seconds=time.perf_counter() - t0, run_dir=str(out), finished_at=_stamp(),
                                     method=method, seed=seed,
                                     teacher_metric=dense.teacher_metric if dense else None))
                    log(f"[{_stamp()}] {task} {method} seed {seed}: {res.metric_name} {res.report['pruned_metric']:.4f}")


def ablation_markdown(cells: list[Cell], gradual: list[Cell], settings: dict[str, Any]) -> str:
    """Per task: each method's mean ± std over seeds at the ablation cell, the gradual recipe's
    cells at the same point from the main grid, and the dense baseline."""
    rows = [c for c in cells if c.kind == "pruned"] + [
        c for c in gradual if c.kind == "pruned" and (c.task, c.block, c.ratio) in
        {(x.task, x.block, x.ratio) for x in cells}]
    dense = {c.task: c for c in gradual if c.kind == "dense"}
    out = ["## Mask selection at one cell: magnitude vs activation-aware vs reweighted group Lasso (MiniLM-L6)", "",
           "Each run starts from the gradual grid's dense teacher and trains the same total epochs with the same "
           "distillation and per-layer allocation; only how the masks are chosen differs "
           "(`benchmarks/accuracy.py --ablation`, see `ablation_config`). Metric in points; mean ± sample std "
           "over seeds.", "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
           "| task | block | ratio | method | seeds | dev metric | vs dense baseline (points) | per seed |",
           "|---|---|---:|---|---:|---:|---:|---|"]
    order = {m: i for i, m in enumerate((*ABLATION_METHODS, "gradual"))}
    for c, n, std in sorted(seed_means(rows), key=lambda x: (_task_order(x[0].task), order.get(x[0].method, 99))):
        seeds = sorted((x for x in rows if (x.task, x.method, x.block, x.ratio) == (c.task, c.method, c.block, c.ratio)),
                       key=lambda x: x.seed)
        d = dense.get(c.task)
        delta = f"{100 * (c.metric - d.metric):+.2f}" if d else "-"
        out.append(f"| {c.task} | {c.block} | {c.ratio:g} | {c.method} | {n} | {100 * c.metric:.2f}"
                   f"{f' ± {100 * std:.2f}' if n > 1 else ''} | {delta} | "
                   f"{', '.join(f'{100 * x.metric:.2f}' for x in seeds)} |")
    if dense:
        out += ["", "Dense baselines: " + ", ".join(f"{t} {100 * c.metric:.2f}" for t, c in dense.items())]
    return "\n".join(out) + "\n"


def run_embedding_grid(settings: EmbeddingGridSettings, ratios: list[float], sts_dir: Path, runs_dir: Path,
                       results: ResultsFile, threads: int | None = None, progress: bool = True, log=print) -> None:
    """The task-agnostic mode at ``settings.block`` and each ratio; the dense cell is the
    unpruned model's zero-shot Spearman (read from the first cell's run)."""
    from blockprune.frontends import embedding

    stamp = lambda: time.strftime("%Y-%m-%d %H:%M")  # noqa: E731
    text = Path(settings.text)
    text = text if text.is_absolute() else ROOT / text
    if not text.is_file():
        path, counts = embedding.extract_glue_sentences(sts_dir.parent, text)
        log(f"[{stamp()}] wrote {sum(counts.values())} GLUE train sentences to {path}")
    for ratio in ratios:
        key = cell_key(EMBEDDING_TASK, settings.block, ratio, "embedding")
        if results.refresh(key) is not None:
            continue
        out = runs_dir / f"{settings.block}-r{ratio:g}"
        log(f"[{stamp()}] embedding {settings.block} ratio {ratio:g} -> {out}")
        t0 = time.perf_counter()
        cfg = embedding.EmbeddingConfig(
            text=str(text), out=str(out), model=settings.model, sts_dir=str(sts_dir), block=settings.block,
            ratio=ratio, epochs_gradual=settings.epochs_gradual, epochs_retrain=settings.epochs_retrain,
            lr=settings.lr, batch_size=settings.batch_size, max_length=settings.max_length,
            hidden_weight=settings.hidden_weight, relation_weight=settings.relation_weight,
            allocation=settings.allocation, sensitivity_ratios=list(settings.sensitivity_ratios), seed=settings.seed,
            limit_train=settings.limit_train, limit_eval=settings.limit_eval, exporter=settings.exporter,
            freeze_embeddings=settings.freeze_embeddings, sensitivity_examples=settings.sensitivity_examples,
            calib_examples=settings.calib_examples, threads=threads, progress=progress,
            sensitivity_file=str(runs_dir / f"sensitivity-{settings.block}.json"))
        res = embedding.run_embedding(cfg)
        rep = res.report
        dkey = cell_key(EMBEDDING_TASK, None, None)
        if results.refresh(dkey) is None:
            results.add(Cell(EMBEDDING_TASK, "dense", "spearman", rep["dense_metric"], rep["dense_metric"],
                             run_dir=str(out), finished_at=stamp(), method="dense"))
        # a call that resumed the run (or only re-finalised a finished one, e.g. after a change to
        # the count) reports the stages' own times, kept in the run's state, not its own wall time
        wall = time.perf_counter() - t0
        staged = sum(r.get("seconds") or 0.0 for r in rep["stages"]) + rep["timings"]["finalise_seconds"]
        results.add(Cell(EMBEDDING_TASK, "pruned", "spearman", rep["pruned_metric"], rep["dense_metric"],
                         block=settings.block, ratio=ratio, compression_rate=res.compression_rate,
                         seconds=staged if res.stages_skipped else wall, run_dir=str(out), finished_at=stamp(),
                         method="embedding", allocation=(rep.get("allocation") or {}).get("ratios")))
        log(f"[{stamp()}] embedding ratio {ratio:g}: Spearman {rep['pruned_metric']:.4f} (dense "
            f"{rep['dense_metric']:.4f}), CR {res.compression_rate:.2f}x")


def embedding_goals(cells: list[Cell]) -> list[str]:
    """Issue #12's goals for the embedding mode: >= 2x within 1 point, >= 3x within 2 points."""
    out = []
    for tol, goal in ((0.01, 2.0), (0.02, 3.0)):
        s = summarize(cells, tol)
        best = max((x.best_rate for x in s), default=1.0)
        out.append(f"- highest CR within {100 * tol:g} point(s) of dense Spearman: **{best:.2f}x** "
                   f"(goal >= {goal:g}x: {'met' if best >= goal else 'not met'})")
    return out


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


def _cells_arg(text: str) -> list[tuple[str, float]]:
    out = []
    for item in (t for t in text.split(",") if t):
        block, _, ratio = item.partition(":")
        out.append((block, float(ratio)))
    return out


ALL = "all"


def _task_lrs(text: str) -> dict[str, float]:
    """``CoLA=5e-5,RTE=3e-5`` -> {task: learning rate} (argparse type): GLUE task names, rates > 0."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        task, sep, lr = item.partition("=")
        try:
            rate = float(lr)
        except ValueError:
            rate = 0.0
        if not sep or task not in TASKS or not rate > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: write TASK=LR with TASK one of {', '.join(TASKS)} "
                                             "and LR a positive number, e.g. CoLA=5e-5")
        out[task] = rate
    return out


def _limit(text: str) -> int | str:
    """A cap on examples: a positive whole number, or ``all`` for none (argparse type)."""
    if text.strip().lower() == ALL:
        return ALL
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number or 'all'")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["gradual", "rgl"], default="gradual",
                    help="gradual: the issue-#12 recipe (default); rgl: the first grid")
    ap.add_argument("--embedding", action="store_true", help="the task-agnostic embedding grid (zero-shot STS-B)")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue", help="GLUE root")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--cells", default=",".join(f"{b}:{r:g}" for b, r in CELLS),
                    help="gradual grid: BLOCK:RATIO cells in order")
    ap.add_argument("--ratios", default=None, help="rgl grid: ratios; embedding grid: ratios (default 0.3,0.5,0.7)")
    ap.add_argument("--blocks", default=",".join(BLOCKS), help="rgl grid: block shapes")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--epochs-dense", type=int, default=3)
    ap.add_argument("--epochs-rew", type=int, default=3, help="rgl: reweighted epochs; gradual/embedding: sparse "
                                                              "training epochs while sparsity rises")
    ap.add_argument("--epochs-retrain", type=int, default=None, help="default 2 (gradual, embedding), 3 (rgl)")
    ap.add_argument("--lr", type=float, default=None, help="default 2e-5 (GLUE), 5e-5 (embedding)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=_limit, default=None,
                    help="cap on training examples, or 'all' (embedding grid: sentences, default 20000)")
    ap.add_argument("--sst2-limit-train", type=_limit, default=20000,
                    help="gradual grid: SST-2 trains on its first N examples (of 67,349)")
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    ap.add_argument("--distill", type=float, default=None,
                    help="share A of the teacher's logits in the loss (default 0.5 gradual, 0 rgl)")
    ap.add_argument("--distill-hidden", type=float, default=DEFAULT_DISTILL_HIDDEN,
                    help="gradual: hidden-state MSE weight")
    ap.add_argument("--allocation", choices=["uniform", "sensitivity"], default="sensitivity",
                    help="gradual/embedding: per-layer ratios")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="gradual/embedding: also train the word embeddings (frozen by default: faster on CPU)")
    ap.add_argument("--sensitivity-examples", type=int, default=128)
    ap.add_argument("--sensitivity-ratios", default="0.25,0.5,0.75,0.9",
                    help="embedding grid: ratios each layer is tried at alone (finer lists allocate finer)")
    ap.add_argument("--relation-weight", type=float, default=0.0,
                    help="embedding grid: weight of the in-batch cosine-matrix distillation term")
    ap.add_argument("--calib-examples", type=int, default=256)
    ap.add_argument("--text", default="runs/embedding/sentences.txt",
                    help="embedding grid: training sentences (written from GLUE train files when missing)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (not part of the settings)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="'within 1 point' = 0.01 on the 0..1 scale")
    ap.add_argument("--results", type=Path, default=None, help="results JSON (default by method, _quick with --quick)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="run dirs (default runs/accuracy[-gradual|-embedding])")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: RTE + STS-B (embedding: 64 sentences, 50 pairs), two cells, tiny limits, "
                         "1 epoch per stage")
    ap.add_argument("--stage", choices=["all", "teacher", "baseline", "cells"], default="all",
                    help="gradual grid: only this part, so several processes can share the work "
                         "(accuracy_parallel.py schedules them)")
    ap.add_argument("--seeds", default=None, help="gradual grid / ablation: seeds of the pruning runs, e.g. 0,1,2 "
                                                  "(default: --seed; ablation: 3 for magnitude-weight and rgl-proximal)")
    ap.add_argument("--ablation", action="store_true",
                    help="magnitude / activation-aware / penalty RGL / proximal RGL at one cell (default MRPC and "
                         "STS-B at 16x1 0.7) from the gradual grid's teachers")
    ap.add_argument("--ablation-methods", default=",".join(ABLATION_METHODS))
    ap.add_argument("--baseline-results", dest="baseline_results_file", type=Path, default=None,
                    help="ablation: the grid JSON whose dense rows (and, via --runs-dir, teachers) it compares "
                         "with (default the gradual grid's)")
    ap.add_argument("--augment", type=int, default=0, metavar="N",
                    help="gradual grid: N teacher-only perturbed copies of each training example in the distilled "
                         "stages (frontends/augment.py); write them to their own --results file")
    ap.add_argument("--lr-pruned", type=float, default=None, metavar="LR",
                    help="gradual grid: learning rate of the pruned cells only (default: --lr); the dense teacher and "
                         "baseline keep --lr, so the cells share the task's dense runs and its dense row")
    ap.add_argument("--task-lr", type=_task_lrs, default={}, metavar="TASK=LR[,TASK=LR]",
                    help="gradual grid: a learning rate of a task's own, dense runs and cells (e.g. CoLA=5e-5); "
                         "its runs go to RUNS_DIR/<TASK>-lr<LR>, its rows compare with its own dense baseline")
    ap.add_argument("--teacher", choices=["start", "baseline"], default="start",
                    help="gradual grid: the pruned cells distil from the dense model they start from (3 epochs), "
                         "or from the dense baseline row's model (as many epochs as a pruned cell)")
    ap.add_argument("--transfer-from", type=Path, default=None, metavar="EMBEDDING_RUNS_DIR",
                    help="gradual grid: before each gradual cell, a 'transfer' cell that starts from the embedding "
                         "grid's run at the same block and ratio (its encoder and masks) and retrains as many epochs")
    ap.add_argument("--background", action="store_true", help="detach; output to RUNS_DIR/log.txt")
    ap.add_argument("--report-only", action="store_true", help="only rebuild md/png from the results JSON")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-keep-masks", action="store_true",
                    help="do not merge each finished cell's masks into masks/<results stem>.tar.xz beside --results")
    args = ap.parse_args(argv)
    gradual = args.method == "gradual" or args.embedding
    args.epochs_retrain = args.epochs_retrain if args.epochs_retrain is not None else (2 if gradual else 3)
    args.distill = args.distill if args.distill is not None else (
        DEFAULT_DISTILL if args.method == "gradual" else 0.0)
    args.lr = args.lr if args.lr is not None else (5e-5 if args.embedding else 2e-5)
    ratios_given = args.ratios is not None
    if args.ratios is None:
        args.ratios = ",".join(f"{r:g}" for r in (EMBEDDING_RATIOS if args.embedding else RATIOS))
    if args.embedding and args.task_lr:
        raise SystemExit("--task-lr is a GLUE grid setting; the embedding grid has one task: use --lr")
    if args.embedding and args.limit_train is None:
        args.limit_train = 20000
    for name in ("limit_train", "sst2_limit_train"):  # 'all': no cap (stored as null)
        if getattr(args, name) == ALL:
            setattr(args, name, None)
    if args.ablation:
        if args.method != "gradual" or args.embedding:
            raise SystemExit("--ablation runs from the gradual grid's teachers: drop --method rgl / --embedding")
        if args.tasks == ",".join(TASKS):
            args.tasks = ",".join(ABLATION_TASKS)
        if args.cells == ",".join(f"{b}:{r:g}" for b, r in CELLS):
            args.cells = "{}:{:g}".format(*ABLATION_CELL)
    if args.quick:
        if args.tasks == ",".join(TASKS) or (args.ablation and args.tasks == ",".join(ABLATION_TASKS)):
            args.tasks = "RTE,STS-B" if not args.ablation else "STS-B"  # unless --tasks chose
        if not ratios_given:
            args.ratios = "0.3,0.5" if args.embedding else "0.5,0.8"
        if args.cells in (",".join(f"{b}:{r:g}" for b, r in CELLS), "{}:{:g}".format(*ABLATION_CELL)):
            args.cells = "16x1:0.5,4x4:0.5" if not args.ablation else "16x1:0.5"
        args.epochs_dense = args.epochs_rew = args.epochs_retrain = 1
        args.limit_train, args.limit_eval, args.max_length, args.batch_size = 48, 32, 64, 16
        if args.embedding:
            args.limit_train, args.limit_eval = 64, 50
        args.sst2_limit_train = 48
        args.sensitivity_examples, args.calib_examples = 16, 16
        args.exporter = "legacy"
    suffix = "_quick" if args.quick else ""
    name = "accuracy_embedding" if args.embedding else ("accuracy_gradual" if args.method == "gradual" else "accuracy")
    args.baseline_results = args.results or RESULTS / f"{name}{suffix}.json"  # ablation: the grid's dense rows
    if args.ablation:
        args.baseline_results = args.baseline_results_file or RESULTS / f"{name}{suffix}.json"
        args.results = args.results or RESULTS / f"accuracy_ablation{suffix}.json"
    args.results = args.results or RESULTS / f"{name}{suffix}.json"
    args.runs_dir = args.runs_dir or ROOT / "runs" / f"{name}{suffix}".replace("_", "-")
    # absolute: the run directories' configs record checkpoint paths, and a resume (or a second grid
    # sharing the dense and reweighted stages) must see the same path however the flag was spelled
    args.runs_dir = args.runs_dir.resolve()
    return args


def write_embedding_report(results: Path) -> Path:
    settings, cells = load_cells(results)
    png = results.with_suffix(".png")
    if cells:
        plot(cells, png)
    md = markdown(settings, cells, 0.01, png.name if cells else None,
                  title="Sentence embeddings: zero-shot STS-B dev Spearman vs compression (MiniLM-L6, task-agnostic)")
    md += "\n" + "\n".join(embedding_goals(cells)) + "\n"
    path = results.with_suffix(".md")
    path.write_text(md)
    return path


def write_ablation_report(results: Path, baseline: Path) -> Path:
    settings, cells = load_cells(results)
    gradual = load_cells(baseline)[1] if Path(baseline).is_file() else []
    path = results.with_suffix(".md")
    path.write_text(ablation_markdown(cells, gradual, settings))
    return path


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.background:
        return _background(raw, args.runs_dir / "log.txt")
    if args.embedding:
        report = write_embedding_report
    elif args.ablation:
        report = lambda p: write_ablation_report(p, args.baseline_results)  # noqa: E731
    else:
        report = lambda p: write_report(p, args.tolerance)  # noqa: E731
    if not args.report_only:
        ratios = [float(r) for r in args.ratios.split(",") if r]
        if args.embedding:
            from blockprune.frontends.train_cli import _ratios  # the train CLI's parser: one error for bad lists

            settings = EmbeddingGridSettings(
                model=args.model, text=args.text, epochs_gradual=args.epochs_rew, epochs_retrain=args.epochs_retrain,
                lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                hidden_weight=args.distill_hidden, allocation=args.allocation, seed=args.seed,
                limit_train=args.limit_train, limit_eval=args.limit_eval, exporter=args.exporter,
                freeze_embeddings=not args.train_embeddings, sensitivity_examples=args.sensitivity_examples,
                calib_examples=args.calib_examples, relation_weight=args.relation_weight,
                sensitivity_ratios=_ratios(args.sensitivity_ratios))
            results = ResultsFile(args.results, settings)
            try:
                run_embedding_grid(settings, ratios, args.data_dir / "STS-B", args.runs_dir, results, args.threads,
                                   progress=not args.no_progress)
            finally:
                if results.cells:
                    print(f"report: {report(args.results)}")
        else:
            settings = GridSettings(model=args.model, epochs_dense=args.epochs_dense, epochs_rew=args.epochs_rew,
                                    epochs_retrain=args.epochs_retrain, lr=args.lr, batch_size=args.batch_size,
                                    max_length=args.max_length, lam=args.lam, seed=args.seed,
                                    limit_train=args.limit_train, limit_eval=args.limit_eval, exporter=args.exporter,
                                    distill=args.distill)
            if args.method == "gradual":
                settings = dataclasses.replace(
                    settings, method="gradual", rgl_form="proximal", score="activation",
                    distill_hidden=args.distill_hidden, allocation=args.allocation,
                    sst2_limit_train=args.sst2_limit_train, freeze_embeddings=not args.train_embeddings,
                    sensitivity_examples=args.sensitivity_examples, calib_examples=args.calib_examples,
                    augment=args.augment, teacher=args.teacher, lr_pruned=args.lr_pruned,
                    task_lr={t: lr for t, lr in args.task_lr.items() if lr != args.lr})  # the grid's rate: no change
            elif args.augment or args.teacher != "start" or args.lr_pruned is not None or args.task_lr:
                raise SystemExit("--augment, --teacher, --lr-pruned and --task-lr shape the gradual grid: "
                                 "they need --method gradual")
            if args.ablation and args.lr_pruned is not None:  # its rows compare with the plain grid's cells
                raise SystemExit("--lr-pruned is a gradual-grid variant; the ablation compares methods at --lr")
            seeds = [int(x) for x in args.seeds.split(",") if x] if args.seeds else None
            grid = Grid(settings, [t for t in args.tasks.split(",") if t], [b for b in args.blocks.split(",") if b],
                        ratios, args.data_dir, args.runs_dir, args.threads, progress=not args.no_progress,
                        cells=_cells_arg(args.cells) if args.method == "gradual" else None,
                        stage="cells" if args.ablation else args.stage, seeds=seeds,
                        transfer_from=args.transfer_from.resolve() if args.transfer_from else None,
                        keep_masks=not args.no_keep_masks)
            results = ResultsFile(args.results, settings)
            try:
                if args.ablation:
                    grid.baseline = ResultsFile(args.baseline_results, settings)
                    run_ablation(grid, results, [m for m in args.ablation_methods.split(",") if m], seeds)
                else:
                    run_grid(grid, results)
            finally:
                if results.cells:
                    print(f"report: {report(args.results)}")
    elif args.results.is_file():
        print(f"report: {report(args.results)}")
    else:
        raise SystemExit(f"{args.results} does not exist yet; run the grid first")
    md = Path(args.results).with_suffix(".md")
    if md.is_file():
        print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
