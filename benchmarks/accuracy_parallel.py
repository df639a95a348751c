"""Run the accuracy grids (issue #12) as many processes at once: on the CPU cores, or many sharing one GPU.

Why: the whole evidence (the gradual GLUE grid, extra seeds for RTE and the ablation cell, the
ablation itself and the embedding grid) is ~70 training runs. One after another that is days on
2 cores; a small model such as MiniLM leaves a GPU mostly idle, so a dozen runs can share it. Each
run is one call of ``benchmarks/accuracy.py`` with a narrow selection (``--stage``, ``--tasks``,
``--cells``, ``--seeds``, ``--ablation-methods``, ``--ratios``), so the results files, their
locking and resumption are exactly those of a plain ``accuracy.py`` run, and whatever a deadline
cuts off resumes with the same command.

Jobs and their order (first ready job in this order starts when a worker frees up):

1. ``teacher:TASK``: the dense fine-tune every pruned run of a task starts from (SST-2 first:
   it is the longest chain);
2. ``embedding:R``: the task-agnostic grid, one job per ratio (no teacher needed);
3. per task, ``cell:TASK:BLOCK:RATIO:sSEED`` and ``baseline:TASK`` (after its teacher);
4. ``ablation:TASK:METHOD:sSEED`` (after its teacher);
5. extra seeds: every RTE cell and the ablation cell of MRPC/STS-B for the gradual recipe.

``--teacher baseline`` runs the gradual grid with the dense baseline's model as every cell's
teacher (``accuracy.py --teacher baseline``): the baseline job then comes before the task's cells,
which wait for it, and the grid writes ``accuracy_gradual_tbase.json`` (the teacher and baseline
checkpoints are those of the plain grid, so both grids can share one runs dir). The ablation
compares pruning methods under the default teacher and is not part of such a run.

Usage::

    python benchmarks/accuracy_parallel.py --workers 12            # a GPU machine
    python benchmarks/accuracy_parallel.py --workers 2 --threads 1  # these 2 cores (days)
    python benchmarks/accuracy_parallel.py --quick --workers 2      # smoke: tiny limits, minutes
    python benchmarks/accuracy_parallel.py --list                   # the jobs, nothing run

``--stop-after-min`` starts no job after that many minutes and ``--kill-after-min`` stops the
running ones (each resumes later from its own checkpoints); ``--collect DIR`` copies the results
JSON, a tarball of the job logs and one of every pruned cell's masks there at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCURACY = ROOT / "benchmarks" / "accuracy.py"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import (ABLATION_CELL, ABLATION_METHODS, ABLATION_SEEDS, ABLATION_TASKS, CELLS,  # noqa: E402
                      EMBEDDING_RATIOS, TASKS, _cells_arg)

#: tasks whose every cell also runs with these extra seeds (RTE: 277 dev examples)
SEEDED_TASKS = {"RTE": (1, 2)}
#: the gradual recipe at the ablation cell gets the ablation's seeds, so the comparison is like for like
ABLATION_GRADUAL_SEEDS = (1, 2)


@dataclass
class Job:
    name: str
    argv: list[str]
    deps: list[str] = field(default_factory=list)
    status: str = "waiting"  # waiting, running, ok, failed, killed, skipped
    seconds: float = 0.0
    returncode: int | None = None


def _cell_arg(block: str, ratio: float) -> str:
    return f"{block}:{ratio:g}"


def grid_results(quick: bool, teacher: str = "start") -> Path:
    """The gradual grid's results file for this teacher choice (``accuracy.py``'s default for ``start``)."""
    return RESULTS / f"accuracy_gradual{'_tbase' if teacher == 'baseline' else ''}{'_quick' if quick else ''}.json"


def plan_jobs(tasks: list[str], what: set[str], quick: bool, teacher: str = "start",
              cells: list[tuple[str, float]] | None = None, seeds: tuple[int, ...] | None = None) -> list[Job]:
    """Every job, in start order. ``what``: grid, seeds, ablation, embedding. ``teacher``: what the
    gradual cells distil from (``start`` or ``baseline``; the latter makes them wait for the baseline).
    ``cells``: the gradual grid's (block, ratio) cells (default :data:`CELLS`); ``seeds``: the extra
    pruning seeds every task's cells get under ``seeds`` (default: RTE's, :data:`SEEDED_TASKS`),
    listed after every task's seed-0 cells: a free worker takes the first *ready* job, so seed 0
    goes first wherever its teacher is done, and a deadline cuts seeds before cells."""
    if teacher not in ("start", "baseline"):
        raise SystemExit(f"unknown --teacher {teacher!r}; use start or baseline")
    if teacher == "baseline" and "ablation" in what:
        raise SystemExit("--teacher baseline applies to the gradual grid; the ablation compares methods under the "
                         "default teacher: run it without --teacher (drop ablation from --what)")
    # the teacher, baseline and cell jobs of one grid must share its results file (the dense row)
    grid_flags = [] if teacher == "start" else ["--teacher", "baseline", "--results", str(grid_results(quick, teacher))]
    if cells is None:
        cells = [("16x1", 0.5), ("4x4", 0.5)] if quick else list(CELLS)
    ablation_cell = ("16x1", 0.5) if quick else ABLATION_CELL
    ablation_tasks = [t for t in (["STS-B"] if quick else ABLATION_TASKS) if t in tasks]
    jobs: list[Job] = []
    need_teacher = "grid" in what or "seeds" in what or "ablation" in what
    if need_teacher:
        jobs += [Job(f"teacher:{t}", ["--stage", "teacher", "--tasks", t, *grid_flags]) for t in tasks]
    if "embedding" in what:
        ratios = (0.3, 0.5) if quick else EMBEDDING_RATIOS
        jobs += [Job(f"embedding:{r:g}", ["--embedding", "--ratios", f"{r:g}"]) for r in ratios]
    cell_deps: dict[str, list[str]] = {}
    for t in tasks:
        dep = [f"teacher:{t}"]
        cell_deps[t] = dep + ([f"baseline:{t}"] if teacher == "baseline" else [])
        baseline = Job(f"baseline:{t}", ["--stage", "baseline", "--tasks", t, *grid_flags], dep)
        if teacher == "baseline" and what & {"grid", "seeds"}:  # every cell's teacher: first
            jobs.append(baseline)
        if "grid" in what:
            jobs += [Job(f"cell:{t}:{b}:{r:g}:s0", ["--stage", "cells", "--tasks", t, "--cells", _cell_arg(b, r),
                                                    "--seeds", "0", *grid_flags], cell_deps[t]) for b, r in cells]
        if "grid" in what and teacher == "start":
            jobs.append(baseline)
    if "ablation" in what:
        for t in ablation_tasks:
            for m in ABLATION_METHODS:
                for seed in ABLATION_SEEDS[m]:
                    jobs.append(Job(f"ablation:{t}:{m}:s{seed}",
                                    ["--ablation", "--tasks", t, "--cells", _cell_arg(*ablation_cell),
                                     "--ablation-methods", m, "--seeds", str(seed)], [f"teacher:{t}"]))
    if "seeds" in what:
        for t in tasks:
            extra = [(b, r, s) for b, r in cells for s in (SEEDED_TASKS.get(t, ()) if seeds is None else seeds)]
            if t in ablation_tasks and ablation_cell in cells:  # once, where --seeds already gives it these
                extra += [(*ablation_cell, s) for s in ABLATION_GRADUAL_SEEDS if (*ablation_cell, s) not in extra]
            jobs += [Job(f"cell:{t}:{b}:{r:g}:s{s}", ["--stage", "cells", "--tasks", t, "--cells", _cell_arg(b, r),
                                                      "--seeds", str(s), *grid_flags], cell_deps[t])
                     for b, r, s in extra]
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)), "duplicate job names"
    return jobs


def run_jobs(jobs: list[Job], workers: int, common: list[str], log_dir: Path, stop_after_s: float | None,
             kill_after_s: float | None, env: dict[str, str], echo=print) -> None:
    """Start ready jobs in order on ``workers`` slots; a failed dependency skips its dependants."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    by_name = {j.name: j for j in jobs}
    t_start = time.monotonic()

    def finish(name: str, proc: subprocess.Popen, t0: float, fh, status: str | None = None) -> None:
        job = by_name[name]
        job.returncode = proc.returncode
        job.seconds = time.monotonic() - t0
        job.status = status or ("ok" if proc.returncode == 0 else "failed")
        fh.close()
        done = sum(j.status in ("ok", "failed", "killed", "skipped") for j in jobs)
        echo(f"[{time.strftime('%H:%M:%S')}] {job.status:6s} {name} ({job.seconds / 60:.1f} min) "
             f"[{done}/{len(jobs)} done, {len(running)} running]")

    while True:
        for name, (proc, t0, fh) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                finish(name, proc, t0, fh)
        for job in jobs:  # dependants of failed jobs can never run
            if job.status == "waiting" and any(by_name[d].status in ("failed", "skipped", "killed") for d in job.deps):
                job.status = "skipped"
                echo(f"skipped {job.name}: a dependency did not finish")
        elapsed = time.monotonic() - t_start
        if kill_after_s is not None and elapsed > kill_after_s and running:
            echo(f"kill-after reached ({kill_after_s / 60:.1f} min): stopping {len(running)} job(s); they resume later")
            for name, (proc, t0, fh) in running.items():
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            for name, (proc, t0, fh) in list(running.items()):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                finish(name, proc, t0, fh, status="killed")
            running.clear()
            break
        launching = stop_after_s is None or elapsed < stop_after_s
        if launching:
            for job in jobs:
                if len(running) >= workers:
                    break
                if job.status == "waiting" and all(by_name[d].status == "ok" for d in job.deps):
                    fh = open(log_dir / (job.name.replace(":", "_") + ".log"), "wb")
                    cmd = [sys.executable, str(ACCURACY), *job.argv, *common]
                    fh.write((" ".join(cmd) + "\n").encode())
                    fh.flush()
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=str(ROOT), env=env, start_new_session=True)
                    job.status = "running"
                    running[job.name] = (proc, time.monotonic(), fh)
                    echo(f"[{time.strftime('%H:%M:%S')}] start  {job.name}")
        if not running and (not launching or not any(j.status == "waiting" for j in jobs)):
            break
        if not running and not any(j.status == "waiting" and all(by_name[d].status == "ok" for d in j.deps)
                                   for j in jobs):
            break
        time.sleep(2)


def write_reports(quick: bool, what: set[str], grid_path: Path | None = None) -> list[Path]:
    """Rebuild the Markdown/PNG of each results file that exists (``accuracy.py --report-only``);
    ``grid_path``: the gradual grid's file when not the default one."""
    suffix = "_quick" if quick else ""
    runs = []
    if what & {"grid", "seeds"}:
        runs.append((grid_path or grid_results(quick), []))
    if "ablation" in what:
        runs.append((RESULTS / f"accuracy_ablation{suffix}.json", ["--ablation"]))
    if "embedding" in what:
        runs.append((RESULTS / f"accuracy_embedding{suffix}.json", ["--embedding"]))
    out = []
    for path, flags in runs:
        if path.is_file():
            subprocess.run([sys.executable, str(ACCURACY), *flags, "--report-only", "--results", str(path),
                            *(["--quick"] if quick else [])], cwd=str(ROOT), stdout=subprocess.DEVNULL)
            out += [path, path.with_suffix(".md")]
    return out


def collect_masks(results: list[Path], dest: Path) -> tuple[Path, int] | None:
    """Every pruned cell's ``masks.safetensors`` named in ``results``, into ``dest/masks.tar.xz``
    under its run dir from ``runs/`` on (the path the results JSON records, less the checkout).

    Why: a GPU machine's runs dir does not come back (its models are ~90 MB each), so the speed of
    the cells that hold the metric could not be measured here. Speed depends only on where the zeros
    are: the masks (~80 kB each compressed) rebuild the model as a user would build it
    (``default_flow.py --trained LABEL=runs/.../masks.safetensors@BLOCK``). Unpack in the checkout's
    root: ``tar xJf masks.tar.xz``."""
    from keep_masks import cell_masks, write_archive

    found = cell_masks(results, root=None)  # where this machine's grid ran, nowhere else
    if not found:
        return None
    out = dest / "masks.tar.xz"
    write_archive(found, out, merge=False)
    return out, len(found)


def _results_flag(extra: list[str]) -> Path | None:
    """The ``--results`` among the accuracy.py flags after ``--`` (either spelling), if any."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--results", type=Path, default=None)
    return ap.parse_known_args(extra)[0].results


#: accuracy.py flags each job sets for itself: given after ``--`` they would override every job's own
#: (``--seed``, the dense runs' seed, is a whole grid's setting and may follow ``--``)
JOB_FLAGS = ("--tasks", "--cells", "--seeds", "--stage", "--ablation-methods", "--ratios", "--ablation", "--embedding")


def _selection(cells_text: str | None, seeds_text: str | None, what: set[str],
               extra: list[str]) -> tuple[list[tuple[str, float]] | None, tuple[int, ...] | None]:
    """``--cells``/``--seeds`` parsed and checked, and the accuracy.py flags after ``--`` checked for
    ones that would silently give every job the same selection."""
    clash = sorted({f.split("=")[0] for f in extra if f.split("=")[0] in JOB_FLAGS})
    if clash:
        raise SystemExit(f"{', '.join(clash)} after -- would override each job's own selection; use this "
                         "runner's --tasks/--cells/--seeds/--what instead")
    try:
        cells = _cells_arg(cells_text) if cells_text else None
        seeds = tuple(dict.fromkeys(int(x) for x in seeds_text.split(",") if x)) if seeds_text is not None else None
    except ValueError as err:
        raise SystemExit(f"--cells BLOCK:RATIO[,...] / --seeds N[,N]: {err}") from None
    if seeds is not None and 0 in seeds:
        raise SystemExit("--seeds names the extra seeds; seed 0 is every cell's first run (the grid)")
    if seeds is not None and "seeds" not in what:
        raise SystemExit("--seeds needs 'seeds' in --what (e.g. --what grid,seeds)")
    return cells, seeds


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: --seed (accuracy.py's dense seed) must not pass for --seeds (extra pruning seeds)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="jobs at once")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--what", default="grid,seeds,ablation,embedding",
                    help="any of grid, seeds, ablation, embedding")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per job")
    ap.add_argument("--quick", action="store_true", help="smoke run: every job with accuracy.py --quick")
    ap.add_argument("--stop-after-min", type=float, default=None, help="start no job after this many minutes")
    ap.add_argument("--kill-after-min", type=float, default=None, help="stop running jobs after this many minutes")
    ap.add_argument("--log-dir", type=Path, default=None, help="one log per job (default runs/accuracy-parallel)")
    ap.add_argument("--collect", type=Path, default=None,
                    help="copy results JSON, job logs (tar.gz) and the cells' masks (masks.tar.xz) here at the end")
    ap.add_argument("--teacher", choices=("start", "baseline"), default="start",
                    help="what the gradual cells distil from: the model they start from (3 epochs), or the dense "
                         "baseline's (its results go to accuracy_gradual_tbase.json)")
    ap.add_argument("--cells", default=None, metavar="BLOCK:RATIO[,...]",
                    help="the gradual grid's cells (default: accuracy.py's, e.g. 16x1:0.5,16x1:0.6,16x1:0.7)")
    ap.add_argument("--seeds", default=None, metavar="N[,N]",
                    help="with --what seeds: extra pruning seeds of every task's cells, e.g. 1,2 (default: RTE 1,2)")
    ap.add_argument("--list", action="store_true", help="print the jobs and exit")
    ap.add_argument("extra", nargs="*", help="more accuracy.py flags for every job (after --)")
    args = ap.parse_args(argv)
    what = {w for w in args.what.split(",") if w}
    unknown = what - {"grid", "seeds", "ablation", "embedding"}
    if unknown:
        raise SystemExit(f"unknown --what {sorted(unknown)}; use grid, seeds, ablation, embedding")
    tasks = [t for t in args.tasks.split(",") if t]
    cells, seeds = _selection(args.cells, args.seeds, what, args.extra)
    jobs = plan_jobs(tasks, what, args.quick, args.teacher, cells, seeds)
    if args.list:
        for j in jobs:
            print(f"{j.name:45s} after {','.join(j.deps) or '-':20s} accuracy.py {' '.join(j.argv)}")
        return 0
    common = ["--threads", str(args.threads), "--no-progress", *(["--quick"] if args.quick else []), *args.extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log_dir = args.log_dir or ROOT / "runs" / f"accuracy-parallel{'-quick' if args.quick else ''}"
    t0 = time.monotonic()
    try:
        run_jobs(jobs, args.workers, common, log_dir,
                 None if args.stop_after_min is None else 60 * args.stop_after_min,
                 None if args.kill_after_min is None else 60 * args.kill_after_min, env)
    finally:
        summary = {"seconds": time.monotonic() - t0, "workers": args.workers, "jobs": [asdict(j) for j in jobs]}
        (log_dir / "jobs.json").write_text(json.dumps(summary, indent=1) + "\n")
        given = _results_flag(args.extra)  # a --results after --: the grid writes there instead
        files = write_reports(args.quick, what, given.resolve() if given else grid_results(args.quick, args.teacher))
        counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "killed", "skipped", "waiting")}
        print(f"done in {summary['seconds'] / 60:.1f} min: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        for j in jobs:
            if j.status in ("failed", "killed"):
                print(f"  {j.status}: {j.name} (log {log_dir / (j.name.replace(':', '_') + '.log')})")
        if args.collect:
            args.collect.mkdir(parents=True, exist_ok=True)
            for f in files:
                if f.suffix == ".json":
                    shutil.copy(f, args.collect / f.name)
            with tarfile.open(args.collect / "accuracy-parallel-logs.tar.gz", "w:gz") as tf:
                tf.add(log_dir, arcname=log_dir.name)
            packed = collect_masks(files, args.collect)
            if packed:
                print(f"masks of {packed[1]} pruned cells -> {packed[0]} (unpack in the checkout: tar xJf)")
    return 0 if all(j.status == "ok" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
