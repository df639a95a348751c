"""What a user gets: `export` -> `compress` -> `compile` with default flags, timed against onnxruntime.

Why this benchmark: speed claims must be about the flow users run, not a hand-picked form. Each
row is built with the CLI exactly as a user would type it (the commands are stored in the JSON),
then the compiled artifact and onnxruntime on the dense export run **side by side in one
process**, interleaved, on the **wall clock**, with the same thread count (1 and 2), medians of
several calls per round over several rounds. Every row also compiles the forced forms
(`--form bsr`, `--form compact`) so the JSON shows whether the default is within 5% of the best
form (a default slower than an option is a bug). Per-kernel time shares of each default
artifact (1 thread, Relax VM instrumentation) explain the rows that miss.

Load: the 1-minute load average is read before each timing process; above ``--max-load`` the run
is refused unless ``--force`` (then every row is marked ``loaded``). Before the first timing it
waits up to ``--settle`` seconds for the average to fall: the compiles this run just did keep it
near 2 for a minute afterwards, which is not another job sharing the cores.

Usage:
  python benchmarks/default_flow.py                    # MiniLM rows + BERT-base rows, 1 and 2 threads
  python benchmarks/default_flow.py --models minilm --threads 1 --quick
Writes benchmarks/results/default_flow.json and .md (`scripts/readme_results.py` puts the table in
the README).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (model, block, sparsity): the rows. None block/sparsity = the dense export compiled by TVM.
ROWS = {
    "minilm": [(None, None), ("16x1", 0.8), ("16x1", 0.7), ("16x1", 0.5), ("1x32", 0.8), ("32x32", 0.8)],
    "bert-base": [(None, None), ("16x1", 0.8), ("32x32", 0.8), ("1x32", 0.8)],
}
FORCED = ("bsr", "compact")


@dataclass
class Build:
    """One compiled artifact and the commands that made it."""

    model: str
    block: str | None
    sparsity: float | None
    form: str  # "default" or a forced --form
    onnx: str
    artifact: str
    commands: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    verified: dict | None = None


def _run(cmd: list[str], log: list[str]) -> None:
    log.append(" ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


@dataclass(frozen=True)
class Trained:
    """A model pruned by training (``--trained LABEL=PATH@BLOCK``): its own ONNX (the recipe's
    ``model.onnx``, zeros in place) replaces the export, ``compress`` runs without ``--sparsity``
    (the masks are already in the weights), and onnxruntime runs that same ONNX as the dense
    baseline (its dense kernels cost the same with the zeros).

    Or only its masks (``PATH`` a ``masks.safetensors``, e.g. a GPU grid's, whose models were not
    brought back): the bundled MiniLM is exported with a classification head by the exporter the
    grid uses, and ``compress --masks`` applies them. Speed depends on where the zeros are, not on
    the kept values, so this times the cell's model as a user would build it; onnxruntime runs the
    dense export.

    Or only its per-layer ratios (``PATH`` an ``allocation.yaml`` from
    ``benchmarks/allocation_config.py``, for a cell whose masks were not kept): the same export,
    pruned one-shot at those ratios by ``compress --config``; the same sparsity per layer, not the
    same masks, so the result is labelled as such."""

    label: str
    onnx: Path
    block: str
    masks: Path | None = None
    config: Path | None = None

    @property
    def on_base(self) -> bool:
        """Built on the bundled export (masks or ratios given), not on the cell's own ONNX."""
        return self.masks is not None or self.config is not None


#: the export that masks-only models start from: the grid's model and exporter
MASKED_BASE = ("minilm", "--head", "classification", "--exporter", "legacy")


def parse_trained(text: str, work: Path | None = None) -> Trained:
    label, sep, rest = text.partition("=")
    path, sep2, block = rest.rpartition("@")
    if not (sep and sep2 and label and path and block):
        raise SystemExit(f"--trained {text!r}: write LABEL=PATH/model.onnx@BLOCK (or PATH/masks.safetensors), "
                         "e.g. emb-0.5=runs/x/model.onnx@16x1")
    if not Path(path).is_file():
        raise SystemExit(f"--trained {text!r}: {path} does not exist")
    base = (work or Path(".")) / "minilm-classification.onnx"
    if path.endswith(".safetensors"):
        return Trained(label, base, block, Path(path).resolve())
    if path.endswith((".yaml", ".yml")):
        return Trained(label, base, block, config=Path(path).resolve())
    return Trained(label, Path(path).resolve(), block)


def build_all(models: list[str], work: Path, forced: bool, quick: bool,
              previous: list[Build] = (), trained: list[Trained] = ()) -> list[Build]:
    """Export each model once, then compress + compile every row (and its forced forms); each
    ``trained`` model is compressed as it is (no one-shot pruning) and compiled the same way.

    ``previous``: builds of an earlier run whose artifact directories still exist are kept (delete
    an artifact to have it rebuilt). Models known by their masks alone share one export of
    :data:`MASKED_BASE`, made once per call (kept from an earlier run only with ``previous``)."""
    from tqdm.auto import tqdm

    exe = str(Path(sys.executable).with_name("blockprune"))
    builds: list[Build] = []
    jobs = []
    for model in models:
        rows = ROWS[model][:2] if quick else ROWS[model]
        for block, sparsity in rows:
            forms = ["default"] + (list(FORCED) if forced and block else [])
            jobs += [(model, block, sparsity, form) for form in forms]
    given = {t.label: t for t in trained}
    for t in trained:
        jobs += [(t.label, t.block, None, form) for form in ["default"] + (list(FORCED) if forced else [])]
    exported: dict[str, tuple[Path, list[str]]] = {t.label: (t.onnx, []) for t in trained if not t.on_base}
    base_log: dict[Path, list[str]] = {}  # masks only: one export of the base model serves them all
    for t in (t for t in trained if t.on_base):
        if t.onnx not in base_log:
            cmd = [exe, "export", *MASKED_BASE, "-o", str(t.onnx)]
            base_log[t.onnx] = [" ".join(cmd)]
            if not (previous and t.onnx.is_file()):  # an earlier run's export is kept with --keep-built only
                _run(cmd, [])
        exported[t.label] = (t.onnx, base_log[t.onnx])
    for model, block, sparsity, form in tqdm(jobs, desc="build", unit="artifact"):
        t0 = time.perf_counter()
        tag = f"{model}-dense" if block is None else f"{model}-{block}-{sparsity}-{form}"
        old = next((b for b in previous if b.artifact == str(work / f"{tag}.art")), None)
        if old is not None and Path(old.artifact).is_dir():  # --keep-built: built before, still there
            builds.append(old)
            exported.setdefault(model, (work / f"{model}.onnx", [old.commands[0]]))
            continue
        log: list[str] = []
        if model not in exported:
            dense = work / f"{model}.onnx"
            _run([exe, "export", model, "-o", str(dense)], log)
            exported[model] = (dense, list(log))
        dense, export_log = exported[model]
        log = list(export_log) if not log else log
        src = dense
        if block is not None:
            src = work / f"{tag}.onnx"
            cmd = [exe, "compress", str(dense), "-o", str(src), "--block", block]
            if model not in given:
                cmd += ["--sparsity", str(sparsity)]
            elif given[model].masks is not None:
                cmd += ["--masks", str(given[model].masks)]
            elif given[model].config is not None:
                cmd += ["--config", str(given[model].config)]
            if form != "default":
                cmd += ["--form", form]
            _run(cmd, log)
        art = work / f"{tag}.art"
        _run([exe, "compile", str(src), "-o", str(art)], log)
        manifest = json.loads((art / "manifest.json").read_text())
        builds.append(Build(model, block, sparsity, form, str(src), str(art), log, time.perf_counter() - t0,
                            manifest.get("verified")))
    return builds


# --------------------------------------------------------------------------------------------
# timing worker (one process per thread count: TVM reads TVM_NUM_THREADS when it loads)
# --------------------------------------------------------------------------------------------
def _worker(plan_path: Path, threads: int, runs: int, rounds: int, profile: bool) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import onnxruntime as ort
    import tvm

    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import interleaved_medians

    plan = json.loads(plan_path.read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    out: dict = {"threads": threads, "load_before": os.getloadavg()[0], "rows": []}
    by_model = collections.defaultdict(list)
    for b in plan["builds"]:
        by_model[b["model"]].append(b)
    for model, builds in by_model.items():
        dense_path = plan["dense"][model]
        sess = ort.InferenceSession(dense_path, so, providers=["CPUExecutionProvider"])
        calls = {}
        for b in builds:
            man = check_artifact(b["artifact"])
            feeds = default_feeds(man, b["onnx"])
            arrays = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
            vm = load_vm(b["artifact"], man)
            fn = vm["main"]
            calls[b["artifact"]] = (vm, (lambda fn=fn, arrays=arrays: fn(*arrays)))
        ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
        engines = {"onnxruntime": lambda: sess.run(None, ort_feeds), **{k: c for k, (_, c) in calls.items()}}
        medians = interleaved_medians(engines, runs, rounds)
        ort_ms = medians["onnxruntime"] * 1e3
        for b in builds:
            ms = medians[b["artifact"]] * 1e3
            row = {"artifact": b["artifact"], "ort_ms": ort_ms, "tvm_ms": ms, "speedup": ort_ms / ms}
            if profile and threads == 1 and b["form"] == "default":
                row["profile"] = _profile(calls[b["artifact"]][0], calls[b["artifact"]][1])
            out["rows"].append(row)
    out["load_after"] = os.getloadavg()[0]
    return out


def _profile(vm, call, reps: int = 5) -> dict[str, float]:
    """Share of time per kernel kind (numbers stripped from PrimFunc names)."""
    acc: dict[str, float] = collections.defaultdict(float)
    start: dict[str, float] = {}

    def instrument(func, sym, before, ret, *args):
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[re.sub(r"\d+", "", sym).replace("_packed", "")] += time.perf_counter() - start[sym]
        return 0

    vm.set_instrument(instrument)
    for _ in range(reps):
        call()
    vm.set_instrument(lambda *a: 0)
    total = sum(acc.values()) or 1.0
    kinds = sorted(acc.items(), key=lambda kv: -kv[1])
    return {k: round(v / total, 4) for k, v in kinds[:12]}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _label(b: dict) -> str:
    if b["block"] is None:
        return "TVM dense"
    if b["sparsity"] is not None:
        return f"{b['block']} at {b['sparsity']:.0%}"
    at_ratios = any(" --config " in f" {c} " for c in b.get("commands", []))
    return f"{b['block']}, one-shot at a cell's per-layer ratios" if at_ratios else f"{b['block']}, trained masks"


def table(result: dict) -> str:
    """Markdown: per model and row, onnxruntime dense vs the default flow, per thread count."""
    threads = [t["threads"] for t in result["timings"]]
    head = "| model | row | " + " | ".join(f"ORT dense {t}t | default {t}t | speed-up {t}t" for t in threads) + \
        " | best forced form (1t) | default vs best |"
    lines = [head, "|" + "---|" * (2 + 3 * len(threads) + 2)]
    rows = {}
    for tm in result["timings"]:
        for r in tm["rows"]:
            rows.setdefault(r["artifact"], {})[tm["threads"]] = r
    builds = result["builds"]
    for b in builds:
        if b["form"] != "default":
            continue
        cells = []
        for t in threads:
            r = rows.get(b["artifact"], {}).get(t)
            cells += [f"{r['ort_ms']:.1f} ms", f"{r['tvm_ms']:.1f} ms", f"**{r['speedup']:.2f}x**"] if r else ["-"] * 3
        forced = [x for x in builds if x["model"] == b["model"] and x["block"] == b["block"]
                  and x["sparsity"] == b["sparsity"] and x["form"] != "default"]
        best, vs = "-", "-"
        t0 = threads[0]
        if forced and rows.get(b["artifact"], {}).get(t0):
            fb = min(forced, key=lambda x: rows[x["artifact"]][t0]["tvm_ms"])
            best_ms = rows[fb["artifact"]][t0]["tvm_ms"]
            mine = rows[b["artifact"]][t0]["tvm_ms"]
            best = f"{fb['form']} {best_ms:.1f} ms"
            vs = f"{(mine / best_ms - 1) * 100:+.1f}%"
        lines.append(f"| {b['model']} | {_label(b)} | " + " | ".join(cells) + f" | {best} | {vs} |")
    return "\n".join(lines)


def profile_table(result: dict) -> str:
    tm = next((t for t in result["timings"] if t["threads"] == 1), None)
    if tm is None:
        return ""
    out = ["| model | row | top kernels (share of 1-thread time) |", "|---|---|---|"]
    arts = {b["artifact"]: b for b in result["builds"]}
    for r in tm["rows"]:
        if "profile" in r:
            b = arts[r["artifact"]]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in list(r["profile"].items())[:6])
            out.append(f"| {b['model']} | {_label(b)} | {shares} |")
    return "\n".join(out)


def settled_load(max_load: float, settle_s: float, poll_s: float = 5.0, sleep=time.sleep,
                 loadavg=os.getloadavg) -> float:
    """The 1-minute load average once it is at most ``max_load``, or after ``settle_s`` seconds.

    Why wait: the average decays with a one-minute time constant, so right after this process's
    own builds it reads ~2 on two idle cores; a job that really shares the cores keeps it up for
    the whole wait, and the caller then refuses as before."""
    waited = 0.0
    load = loadavg()[0]
    while load > max_load and waited < settle_s:
        sleep(poll_s)
        waited += poll_s
        load = loadavg()[0]
    return load


def _strip_prefixes(command: str, prefixes: tuple[str, ...]) -> str:
    """``command`` with each path that starts with one of ``prefixes`` (a directory) made relative to
    it: only at the start of a word, so a relative ``--work runs`` leaves ``runs/accuracy/...`` alone."""
    for prefix in prefixes:
        command = re.sub(r"(^|[\s='\"])" + re.escape(prefix.rstrip("/") + "/"), r"\1", command)
    return command


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="default minilm,bert-base (none with --trained)")
    ap.add_argument("--trained", action="append", default=[], metavar="LABEL=ONNX@BLOCK",
                    help="also (or, without --models, only) a model pruned by training: its model.onnx and block, or "
                         "only its masks.safetensors (applied to the bundled MiniLM's classification export), or only its "
                         "per-layer ratios, an allocation.yaml (benchmarks/allocation_config.py; that export pruned "
                         "one-shot at them)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=10, help="calls per engine per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-forced", action="store_true", help="skip the forced --form variants")
    ap.add_argument("--quick", action="store_true", help="first two rows per model only")
    ap.add_argument("--work", help="build directory (default: a temp dir)")
    ap.add_argument("--build-only", action="store_true", help="build into --work and stop (no timing)")
    ap.add_argument("--reuse", action="store_true", help="time the artifacts already built in --work")
    ap.add_argument("--keep-built", action="store_true",
                    help="build only the artifacts missing from --work (delete one to rebuild it)")
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=180.0, metavar="S",
                    help="wait up to S seconds for the load average to fall under --max-load before refusing "
                         "(the builds just done here raise it for a minute or two)")
    ap.add_argument("--force", action="store_true", help="time even when the load average is above --max-load")
    ap.add_argument("--out", default=str(RESULTS / "default_flow.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = _worker(Path(args.worker), args.worker_threads, args.runs, args.rounds, profile=True)
        print(json.dumps(res))
        return
    for t in args.trained:  # a bad spec is refused before any work dir is made
        parse_trained(t)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bp-default-flow-"))
    work.mkdir(parents=True, exist_ok=True)
    trained = [parse_trained(t, work.resolve()) for t in args.trained]
    if args.models is None:
        args.models = "" if trained else "minilm,bert-base"
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ROWS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(ROWS)}")
    plan_path = work / "plan.json"
    if args.reuse and plan_path.is_file():  # built earlier (e.g. while the machine was busy): time only
        plan = json.loads(plan_path.read_text())
        builds = [Build(**b) for b in plan["builds"] if b["model"] in models or b["model"] in {t.label for t in trained}]
        plan["builds"] = [asdict(b) for b in builds]
    else:
        previous = [Build(**b) for b in json.loads(plan_path.read_text())["builds"]] \
            if args.keep_built and plan_path.is_file() else []
        builds = build_all(models, work, forced=not args.no_forced, quick=args.quick, previous=previous,
                           trained=trained)
        plan = {"builds": [asdict(b) for b in builds],
                "dense": {**{m: str(work / f"{m}.onnx") for m in models}, **{t.label: str(t.onnx) for t in trained}}}
        plan_path.write_text(json.dumps(plan))
    if args.build_only:
        print(f"built {len(builds)} artifacts in {work}; time them with --work {work} --reuse")
        return
    # One timing process per (model, row): onnxruntime next to that row's artifacts only. Holding
    # every artifact of a model in one process slowed onnxruntime by ~14% (44.3 -> 50.4 ms on
    # MiniLM, 1 thread): a fair ratio needs the same conditions for both engines.
    groups: dict[tuple, list[dict]] = {}
    for b in plan["builds"]:
        groups.setdefault((b["model"], b["block"], b["sparsity"]), []).append(b)
    timings = []
    loaded = False
    for i, t in enumerate(int(x) for x in args.threads.split(",")):
        load = settled_load(args.max_load, args.settle) if i == 0 else os.getloadavg()[0]
        # checked before the first timing only: our own timing runs raise the average afterwards
        if i == 0 and load > args.max_load:
            if not args.force:
                raise SystemExit(f"load average {load:.2f} > {args.max_load}: another job shares the cores; "
                                 "pause it (the accuracy grid resumes) or pass --force (rows are marked loaded)")
            print(f"WARNING: load average {load:.2f} > {args.max_load}; timings are marked loaded", file=sys.stderr)
            loaded = True
        merged: dict = {"threads": t, "load_before": load, "rows": []}
        for key, builds_of_row in groups.items():
            row_plan = work / "plan-timing.json"
            row_plan.write_text(json.dumps({"builds": builds_of_row, "dense": plan["dense"]}))
            res = subprocess.run([sys.executable, __file__, "--worker", str(row_plan), "--worker-threads", str(t),
                                  "--runs", str(args.runs), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"timing worker failed on {key}:\n{res.stderr[-3000:]}")
            part = json.loads(res.stdout.strip().splitlines()[-1])
            merged["rows"] += part["rows"]
            merged["load_after"] = part["load_after"]
        timings.append(merged)
    import onnxruntime
    import tvm

    from blockprune.bench_timing import cpu_name

    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}",
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "clock": "wall (time.perf_counter), medians of runs x rounds, engines interleaved",
        "batch_seq": [1, 128], "loaded": loaded, "max_load": args.max_load,
        "command": "python benchmarks/default_flow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "builds": [asdict(b) for b in builds], "timings": timings,
    }
    for b in result["builds"]:  # paths in a temp dir mean nothing later; keep the names
        b["onnx"], b["artifact"] = Path(b["onnx"]).name, Path(b["artifact"]).name
        b["commands"] = [_strip_prefixes(c, (str(work.resolve()), str(work), os.getcwd())) for c in b["commands"]]
    for tm in result["timings"]:
        for r in tm["rows"]:
            r["artifact"] = Path(r["artifact"]).name
    from blockprune.io import atomic_path

    out = Path(args.out)
    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    loads = ", ".join(f"{t['threads']}t {t['load_before']:.2f}" for t in timings)
    md = (f"# Default flow vs onnxruntime ({result['date']})\n\n{result['machine']}; {result['clock']}; "
          f"batch 1 x seq 128; load before each timing process: {loads}.\n\n"
          f"Command: `{result['command']}`\n\n{table(result)}\n\n## Where the time goes (default flow, 1 thread)\n\n"
          f"{profile_table(result)}\n")
    with atomic_path(out.with_suffix(".md"), suffix=".md") as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
