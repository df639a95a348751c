"""Issue #14's accuracy half: train each `blockprune plan` model and the uniform model of the same
measured speed, with the same recipe and epochs, and compare their dev metrics.

Why: a plan is only worth having if, at the speed it reaches, it is at least as accurate as what a
user gets without it: one block shape and one ratio for every layer. `plan_figure.py` timed every
plan next to uniform 16x1 models in one process and interpolated, per plan, the uniform ratio of the
same measured speed (`uniform_ratio` in its JSON). This script trains, per task:

* the dense teacher (`--epochs-teacher`, resumes);
* per plan: `train --plan plan-<goal>.yaml` from the teacher (gradual pruning to the plan's
  per-layer blocks and ratios, then masked retraining, distilled: logits 0.5, hidden states 1.0);
* per plan: the uniform model, 16x1 at that plan's same-speed ratio (`--allocation uniform`),
  with the very same settings.

Cells resume: a finished cell is read back from the results JSON (written after every cell).

Then (``--time WORK``, under ``scripts/quiet_timing.sh``) the *trained* models themselves: each cell's
exported ``model.onnx`` through ``blockprune compress`` (default flags: its blocks are detected from
the zeros) and ``blockprune compile``, timed beside onnxruntime on the same graph in one process (1
thread, wall clock, interleaved medians): the speed a user gets from the trained masks, which may
differ from the magnitude masks the plans were timed with (compaction follows the pattern).

Usage:
  python benchmarks/plan_training.py --plan-json benchmarks/results/plan_trained.json --plans-dir /tmp/planfig \\
      --tasks MRPC --threads 1 [--epochs-teacher 3 --epochs-gradual 2 --epochs-retrain 1]
  scripts/quiet_timing.sh python benchmarks/plan_training.py --time /tmp/pt-time
  python benchmarks/plan_training.py --report-only
Writes benchmarks/results/plan_training.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GLUE = ROOT.parent / "shared" / "data" / "glue"


@dataclass
class Settings:
    """What every cell of one task is trained with (planned and uniform alike)."""

    epochs_teacher: int = 3
    epochs_gradual: int = 2
    epochs_retrain: int = 1
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    distill: float = 0.5
    distill_hidden: float = 1.0
    freeze_embeddings: bool = True
    exporter: str = "legacy"
    seed: int = 0


def _config(s: Settings, task: str, data_dir: Path, out: Path, threads: int | None, **kw):
    from blockprune.frontends.recipe import RecipeConfig

    base = dict(model="minilm", task=task, data_dir=str(data_dir), out=str(out), epochs_dense=s.epochs_teacher,
                epochs_rew=s.epochs_gradual, epochs_retrain=s.epochs_retrain, lr_dense=s.lr, lr_rew=s.lr,
                lr_retrain=s.lr, batch_size=s.batch_size, max_length=s.max_length, seed=s.seed,
                exporter=s.exporter, freeze_embeddings=s.freeze_embeddings, threads=threads, progress=False)
    base.update(kw)
    return RecipeConfig(**base)


@contextlib.contextmanager
def _locked(path: Path):
    """One writer at a time: the tasks may run in separate processes on the same results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _update(path: Path, key: str, cell: dict, settings: dict | None = None, **top) -> None:
    """Add one finished cell (its task's settings, other top-level fields) under the lock.

    Settings are per task: on 2 CPU cores the tasks may be given different epochs (each task's
    planned and uniform cells always share them)."""
    with _locked(path):
        data = _load(path)
        data["cells"][key] = cell
        if settings is not None:
            data.setdefault("settings", {})[cell["task"]] = settings
        data.update(top)
        _save(path, data)


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"format": "blockprune.plan-training/2", "cells": {}, "settings": {}}


def _save(path: Path, data: dict) -> None:
    from blockprune.io import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    with atomic_path(path.with_suffix(".md"), suffix=".md") as tmp:
        tmp.write_text(markdown(data))


def uniform_at_goal(plan_json: dict, goal: float) -> float | None:
    """The uniform 16x1 ratio whose measured speed-up (the JSON's timed uniform rows) is ``goal``.

    Why: the uniform partner can then start training before its plan is built and timed. A plan
    that measures faster than its goal (the planner's plans over-deliver by a few percent) is then
    compared with a slower uniform model: the comparison leans towards uniform, not the plan."""
    import numpy as np

    pts = sorted((u["measured_speedup"], u["uniform_ratio"]) for u in plan_json.get("uniform", []))
    if len(pts) < 2 or not pts[0][0] <= goal <= pts[-1][0]:
        return None
    return round(float(np.interp(goal, [p[0] for p in pts], [p[1] for p in pts])), 3)


def plan_rows_from_yaml(plans_dir: Path, goals: list[float]) -> dict:
    """Plan rows read from ``plan-<goal>.yaml`` before they are timed (``measured_speedup`` None until
    ``--sync-speeds``): the planned cells can train while the plans are compiled and timed."""
    import yaml

    rows = []
    for g in goals:
        name = f"plan-{g:g}x.yaml"
        info = yaml.safe_load((plans_dir / name).read_text())["plan"]
        rows.append({"speedup_goal": g, "plan": name, "overall_ratio": info["overall_ratio"],
                     "measured_speedup": None, "uniform_ratio": None})
    return {"rows": rows, "date": None, "machine": None, "uniform": []}


def sync_speeds(out: Path, task: str, plan_json: dict) -> None:
    """Fill the plan cells of ``task`` with the measured speed-ups of a timed plan_figure JSON, and
    its provenance (the plans must be the ones trained: same overall ratio)."""
    rows = {r["speedup_goal"]: r for r in plan_json["rows"]}
    with _locked(out):
        data = _load(out)
        for key, c in data["cells"].items():
            if c["task"] != task or c["kind"] != "plan" or c["goal"] not in rows:
                continue
            r = rows[c["goal"]]
            if abs(r["overall_ratio"] - c["plan_overall_ratio"]) > 1e-3:
                raise SystemExit(f"{key}: the timed plan (overall ratio {r['overall_ratio']}) is not the trained one "
                                 f"({c['plan_overall_ratio']})")
            c["measured_speedup"] = r["measured_speedup"]
            c["plan_timing"] = {"date": plan_json["date"], "machine": plan_json["machine"],
                                "same_speed_uniform_ratio": r.get("uniform_ratio")}
            c["plan_selected"] = next((x["name"] for x in r.get("candidates", []) if x["selected"]), None)
        _save(out, data)


def run_task(task: str, s: Settings, plan_json: dict, plans_dir: Path, runs: Path, out: Path,
             threads: int | None, data_root: Path, goals: set[float] | None = None,
             kinds: set[str] | None = None, uniform_goal_json: dict | None = None) -> None:
    """Teacher, then per plan row its planned cell and its same-speed uniform cell (resumable).
    ``goals`` / ``kinds`` restrict the cells, so several processes can share one task's cells
    once its teacher exists."""
    from blockprune.frontends.recipe import checkpoint_dir, run_recipe

    data_dir = data_root / task
    tdir = runs / task
    teacher = checkpoint_dir(tdir / "dense", "dense")
    data = _load(out)
    key = f"{task}|teacher"
    done = data.get("settings", {}).get(task)
    if done and any(done[k] != v for k, v in asdict(s).items() if k == "epochs_teacher"):
        raise SystemExit(f"{task}: its teacher in {out} was trained with other settings ({done}); "
                         "use the same --epochs-teacher or another --out")
    if key not in data["cells"]:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M')}] {task}: dense teacher -> {tdir / 'dense'}", flush=True)
        # the teacher's run must not depend on the cells' epochs (its fingerprint would, and a later
        # call with other cell epochs would then refuse to resume it)
        res = run_recipe(_config(s, task, data_dir, tdir / "dense", threads, stop_after="dense", distill=0.0,
                                 method="rgl", rgl_form="penalty", score="weight", epochs_rew=0, epochs_retrain=0))
        _update(out, key, {"task": task, "kind": "teacher", "metric_name": res.metric_name,
                           "metric": res.metrics["dense"], "seconds": time.perf_counter() - t0}, settings=asdict(s))
    rows = plan_json["rows"]
    if uniform_goal_json is not None and kinds == {"uniform"}:  # partners at the goal speeds, no plan needed
        rows = [{"speedup_goal": g, "overall_ratio": None, "measured_speedup": None} for g in sorted(goals or ())]
    for row in rows:
        goal = row["speedup_goal"]
        if goals and goal not in goals:
            continue
        ratio_u = uniform_at_goal(uniform_goal_json, goal) if uniform_goal_json is not None else row["uniform_ratio"]
        cells = [("plan", None), ("uniform", ratio_u)]
        for kind, ratio in cells:
            if kinds and kind not in kinds:
                continue
            key = f"{task}|{kind}|{goal:g}"
            if key in _load(out)["cells"]:
                continue
            if kind == "uniform" and ratio is None:
                print(f"{task} {goal:g}x: no uniform ratio of the same speed (outside the timed rows); skipped")
                continue
            cdir = tdir / f"{kind}-{goal:g}x"
            t0 = time.perf_counter()
            print(f"[{time.strftime('%H:%M')}] {task} {kind} ({goal:g}x plan speed) -> {cdir}", flush=True)
            if kind == "plan":
                plan_file = plans_dir / row["plan"]
                kept = tdir / f"plan-{goal:g}x.yaml"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(plan_file, kept)
                cfg = _config(s, task, data_dir, cdir, threads, model=str(teacher), epochs_dense=0, method="gradual",
                              allocation="plan", plan_file=str(kept), distill=s.distill,
                              distill_hidden=s.distill_hidden)
            else:
                cfg = _config(s, task, data_dir, cdir, threads, model=str(teacher), epochs_dense=0, method="gradual",
                              block="16x1", ratio=float(ratio), allocation="uniform", distill=s.distill,
                              distill_hidden=s.distill_hidden)
            res = run_recipe(cfg)
            source = {"date": plan_json["date"], "machine": plan_json["machine"],
                      "uniform": [{k: u[k] for k in ("uniform_ratio", "tvm_ms", "measured_speedup")}
                                  for u in plan_json.get("uniform", [])]}
            _update(out, key, {"task": task, "kind": kind, "goal": goal, "metric_name": res.metric_name,
                               "metric": res.report["pruned_metric"], "compression_rate": res.compression_rate,
                               "uniform_ratio": ratio, "plan_overall_ratio": row["overall_ratio"],
                               "uniform_rule": None if kind == "plan" else (
                                   "measured speed-up = plan goal" if uniform_goal_json is not None
                                   else "measured speed-up = plan's measured speed-up"),
                               "measured_speedup": row["measured_speedup"] if kind == "plan" else None,
                               "seconds": time.perf_counter() - t0, "run_dir": str(cdir)},
                    settings=asdict(s), **({"plan_source": source} if plan_json.get("date") else {}))
            print(f"[{time.strftime('%H:%M')}] {task} {kind} {goal:g}x: {res.metric_name} "
                  f"{res.report['pruned_metric']:.4f}", flush=True)


BP = str(ROOT / ".venv" / "bin" / "blockprune")


def build_trained(out: Path, work: Path) -> None:
    """compress (default flags) + compile every trained cell's model.onnx into ``work`` (kept)."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    for key, c in _load(out)["cells"].items():
        if c["kind"] == "teacher" or not c.get("run_dir"):
            continue
        tag = key.replace("|", "-")
        onnx, art = work / f"{tag}.onnx", work / f"{tag}.art"
        if (art / "manifest.json").is_file():
            continue
        for cmd in ([BP, "compress", str(Path(c["run_dir"]) / "model.onnx"), "-o", str(onnx)],
                    [BP, "compile", str(onnx), "-o", str(art)]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        print(f"built {art}", flush=True)


def time_trained(out: Path, work: Path, runs: int = 10, rounds: int = 5) -> None:
    """Per task: onnxruntime on a trained cell's own graph (dense kernels ignore the zeros) and every
    compiled trained cell, interleaved in one process at 1 thread; speed-ups stored in the cells."""
    os.environ["TVM_NUM_THREADS"] = "1"
    import onnxruntime as ort
    import tvm

    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import interleaved_medians

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    cells = _load(out)["cells"]
    by_task: dict[str, list[str]] = {}
    for key, c in cells.items():
        if c["kind"] != "teacher" and (work / f"{key.replace('|', '-')}.art" / "manifest.json").is_file():
            by_task.setdefault(c["task"], []).append(key)
    for task, keys in by_task.items():
        engines, feeds = {}, None
        for key in keys:
            art = work / f"{key.replace('|', '-')}.art"
            man = check_artifact(art)
            feeds = default_feeds(man, str(work / f"{key.replace('|', '-')}.onnx"))
            arrays = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
            fn = load_vm(art, man)["main"]
            engines[key] = (lambda fn=fn, arrays=arrays: fn(*arrays))
        sess = ort.InferenceSession(str(Path(cells[keys[0]]["run_dir"]) / "model.onnx"), so,
                                    providers=["CPUExecutionProvider"])
        ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
        load = os.getloadavg()[0]
        med = interleaved_medians({"onnxruntime": lambda: sess.run(None, ort_feeds), **engines}, runs, rounds)
        with _locked(out):
            data = _load(out)
            for key in keys:
                data["cells"][key]["trained_timing"] = {
                    "ort_ms": med["onnxruntime"] * 1e3, "tvm_ms": med[key] * 1e3,
                    "speedup": med["onnxruntime"] / med[key], "load_before": load,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            _save(out, data)
        print(f"{task}: timed {len(keys)} trained models (onnxruntime {med['onnxruntime'] * 1e3:.2f} ms)")


def markdown(data: dict) -> str:
    """Planned vs same-speed uniform, per task and budget, with the difference in points."""
    cells = data["cells"]
    per_task = data.get("settings", {})
    lines = ["## `blockprune plan` models vs uniform 16x1 of the same measured speed (MiniLM-L6, GLUE dev)", "",
             "Same recipe and epochs for both models of a pair: from the task's dense teacher, gradual pruning "
             "then masked retraining, distilled from the teacher (logits and hidden states), word embeddings "
             "frozen, activation-aware scores. Planned: `train --plan plan-<goal>.yaml` (per-layer blocks "
             "as the plan gives, 16x1 in the current plans, and ratios); uniform: `train --block 16x1 --ratio R --allocation uniform` with R the "
             + ("uniform ratio whose measured speed-up (default compile flow, 1 thread, the timed uniform rows of "
                "`plan.json`) equals the plan's *goal*; a plan that measures faster than its goal is then compared "
                "with a slower uniform model (the pair leans towards uniform)"
                if any(c.get("uniform_rule") == "measured speed-up = plan goal" for c in cells.values()) else
                "uniform ratio whose measured speed-up (default compile flow, 1 thread, timed beside the plan in one "
                "process, `plan_trained.json`) equals the plan's")
             + ". Metrics x100: F1 (MRPC), mean of Pearson and Spearman (STS-B). Epochs per task (CPU budget, 1 "
             "thread per task):", ""]
    for task, s in sorted(per_task.items()):
        lines.append(f"- {task}: teacher {s['epochs_teacher']}, gradual {s['epochs_gradual']} + retrain "
                     f"{s['epochs_retrain']}; lr {s['lr']}, batch {s['batch_size']}, distill logits {s['distill']} / "
                     f"hidden {s['distill_hidden']}")
    lines += ["", "Speed-ups over onnxruntime dense, 1 thread: *plan* = the plan as timed by `plan_figure.py` "
              "(magnitude masks, beside onnxruntime in one process); *trained* = the trained planned / uniform models "
              "themselves, compressed and compiled with default flags and timed side by side (`--time`). *Same-speed "
              "ratio*: the uniform 16x1 ratio whose measured speed-up equals the plan's (interpolated in the same "
              "timing run; \"the plan\" where the planner chose the uniform 16x1 plan itself).", "",
              "| task | plan goal | speed-up: plan / trained planned / trained uniform | teacher | "
              "planned (overall ratio; candidate) | uniform 16x1 (ratio) | same-speed ratio | planned - uniform (points) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    tasks = sorted({c["task"] for c in cells.values()})
    diffs = []
    for task in tasks:
        teacher = cells.get(f"{task}|teacher")
        goals = sorted({c["goal"] for c in cells.values() if c["task"] == task and "goal" in c})
        for g in goals:
            p, u = cells.get(f"{task}|plan|{g:g}"), cells.get(f"{task}|uniform|{g:g}")
            tm = f"{100 * teacher['metric']:.2f}" if teacher else "-"
            sel = (p or {}).get("plan_selected")
            ps = (f"{100 * p['metric']:.2f} ({p['plan_overall_ratio']:.2f}" + (f"; {sel})" if sel else ")")
                  if p else "running")
            same = ((p or {}).get("plan_timing") or {}).get("same_speed_uniform_ratio")
            ss = "the plan" if sel and sel.startswith("uniform 16x1") else (
                f"{same:.3f}" if same is not None else ("beyond the timed rows" if (p or {}).get("plan_timing") else "-"))
            us = f"{100 * u['metric']:.2f} ({u['uniform_ratio']:.3f})" if u else "running"
            d = f"{100 * (p['metric'] - u['metric']):+.2f}" if p and u else "-"
            if p and u:
                diffs.append(100 * (p["metric"] - u["metric"]))
            tp, tu = ((c or {}).get("trained_timing") for c in (p, u))
            su = " / ".join([f"{p['measured_speedup']:.2f}x" if p and p.get("measured_speedup") else "-",
                             f"{tp['speedup']:.2f}x" if tp else "-", f"{tu['speedup']:.2f}x" if tu else "-"])
            lines.append(f"| {task} | {g:g}x | {su} | {tm} | {ps} | {us} | {ss} | {d} |")
    if diffs:
        wins = sum(d >= 0 for d in diffs)
        lines += ["", f"Planned at least as accurate as uniform in {wins} of {len(diffs)} pairs; mean difference "
                      f"{sum(diffs) / len(diffs):+.2f} points."]
    lines += ["", "Command: `python benchmarks/plan_training.py --plan-json benchmarks/results/plan_trained.json "
                  "--plans-dir WORK --tasks MRPC,STS-B` (WORK: `plan_figure.py --work`; resumes)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-json", type=Path, default=RESULTS / "plan_trained.json",
                    help="plan_figure.py output of the plans to train (their measured speeds, same-speed uniform ratios)")
    ap.add_argument("--plans-dir", type=Path, default=None, help="plan_figure.py --work (holds plan-<goal>.yaml)")
    ap.add_argument("--tasks", default="MRPC,STS-B")
    ap.add_argument("--data-dir", type=Path, default=GLUE)
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "plan-training")
    ap.add_argument("--out", type=Path, default=RESULTS / "plan_training.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs-teacher", type=int, default=3)
    ap.add_argument("--epochs-gradual", type=int, default=2)
    ap.add_argument("--epochs-retrain", type=int, default=1)
    ap.add_argument("--goals", default=None, help="only these plan goals, e.g. 1.5,2 (default: every row)")
    ap.add_argument("--kinds", default=None, help="only these cells: plan, uniform (default: both)")
    ap.add_argument("--uniform-at-goal", type=Path, default=None, metavar="JSON",
                    help="uniform partners at the ratio whose measured speed-up (this plan_figure JSON's uniform "
                         "rows) equals the plan's goal, not the plan's measured speed-up (with --kinds uniform, no "
                         "plan is needed yet)")
    ap.add_argument("--plans-untimed", action="store_true",
                    help="read the plan rows from --plans-dir/plan-<goal>.yaml (--goals) instead of --plan-json, so "
                         "planned cells train before the plans are timed (then --sync-speeds)")
    ap.add_argument("--sync-speeds", type=Path, default=None, metavar="JSON",
                    help="fill --tasks' plan cells with the measured speed-ups of this timed plan_figure JSON")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--time", type=Path, default=None, metavar="WORK",
                    help="compress + compile the trained cells into WORK and time them (run under quiet_timing)")
    args = ap.parse_args(argv)
    if args.sync_speeds is not None:
        for task in args.tasks.split(","):
            sync_speeds(args.out, task, json.loads(args.sync_speeds.read_text()))
        print(markdown(_load(args.out)))
        return 0
    if args.report_only:
        with _locked(args.out):
            _save(args.out, _load(args.out))
        print(markdown(_load(args.out)))
        return 0
    if args.time is not None:
        build_trained(args.out, args.time)
        time_trained(args.out, args.time)
        print(markdown(_load(args.out)))
        return 0
    if args.plans_dir is None or not args.plans_dir.is_dir():
        raise SystemExit("--plans-dir: the plan_figure.py work directory with plan-<goal>.yaml is needed")
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    s = Settings(epochs_teacher=args.epochs_teacher, epochs_gradual=args.epochs_gradual,
                 epochs_retrain=args.epochs_retrain)
    if args.plans_untimed:
        if not args.goals:
            raise SystemExit("--plans-untimed needs --goals (which plan-<goal>.yaml to train)")
        plan_json = plan_rows_from_yaml(args.plans_dir, [float(g) for g in args.goals.split(",")])
    else:
        plan_json = json.loads(args.plan_json.read_text())
    for task in args.tasks.split(","):
        run_task(task, s, plan_json, args.plans_dir, args.runs_dir, args.out, args.threads, args.data_dir,
                 goals={float(g) for g in args.goals.split(",")} if args.goals else None,
                 kinds=set(args.kinds.split(",")) if args.kinds else None,
                 uniform_goal_json=json.loads(args.uniform_at_goal.read_text()) if args.uniform_at_goal else None)
    print(markdown(_load(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
