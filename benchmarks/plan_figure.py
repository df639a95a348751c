"""Predicted vs measured speed-up of `blockprune plan` on the bundled MiniLM (x86-64, 1 thread).

Why: the planner is only as good as its cost model. This script runs the flow a user would —
`plan --speedup S` -> `compress --plan` -> `compile` -> time — for several budgets and puts the
plan's predicted speed-up next to the measured one (onnxruntime dense and every compiled plan
timed side by side in one process, interleaved, wall clock, medians). It also predicts the
uniform rows already measured in `default_flow.json` with the same cost model (a check that
needs no build).

Phases (each timing phase must run under `scripts/quiet_timing.sh`):
  python benchmarks/plan_figure.py --work /tmp/planfig --phase baseline   # ORT dense ms (timed)
  python benchmarks/plan_figure.py --work /tmp/planfig --phase build      # plan, compress, compile
  python benchmarks/plan_figure.py --work /tmp/planfig --phase time       # side by side (timed)
Writes benchmarks/results/plan.json and plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BP = str(ROOT / ".venv" / "bin" / "blockprune")
STSB = "/work/shared/data/glue/STS-B"
SENSITIVITY_STSB = "64 STS-B train sentences (zero-shot, embedding cosine of the bare encoder)"
PLAN_FLAGS = ["--sensitivity-ratios", "0.5,0.7,0.9", "--sensitivity-cache", "sens.json", "--quiet"]


def _run(cmd: list[str], work: Path, log: list[str]) -> str:
    log.append(" ".join(["blockprune" if c == BP else c for c in cmd]))
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def phase_baseline(work: Path, threads: int) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from blockprune.plan.plan_api import ort_dense_ms

    ms = sorted(ort_dense_ms(work / "minilm.onnx", 1, 128, threads, runs=20) for _ in range(3))[1]
    (work / "baseline.json").write_text(json.dumps({"ort_ms": ms, "threads": threads, "load": os.getloadavg()[0]}))
    print(f"onnxruntime dense: {ms:.2f} ms")


def phase_build(work: Path, speedups: list[float], uniform: list[float], plan_model: str = "minilm.onnx",
                data: str = STSB, examples: int = 64, blocks: str = "16x1,32x32") -> None:
    """Each plan (plan -> compress --plan -> compile), then the uniform 16x1 rows (compress --block 16x1
    --sparsity R -> compile, default flags): timed beside the plans, they give the uniform ratio of the
    same measured speed as each plan (the model its training is compared with)."""
    base = json.loads((work / "baseline.json").read_text())["ort_ms"]
    builds = []
    for s in speedups:
        log: list[str] = []
        tag = f"{s:g}x"
        t0 = time.perf_counter()
        _run([BP, "plan", plan_model, "-o", f"plan-{tag}.yaml", "--speedup", str(s), "--baseline-ms",
              f"{base:.3f}", "--data", data, "--examples", str(examples), "--blocks", blocks, *PLAN_FLAGS], work, log)
        _run([BP, "compress", "minilm.onnx", "-o", f"plan-{tag}.onnx", "--plan", f"plan-{tag}.yaml"], work, log)
        _run([BP, "compile", f"plan-{tag}.onnx", "-o", f"plan-{tag}.art"], work, log)
        builds.append({"speedup_goal": s, "plan": f"plan-{tag}.yaml", "onnx": f"plan-{tag}.onnx",
                       "artifact": f"plan-{tag}.art", "commands": log, "build_seconds": time.perf_counter() - t0})
        print(f"built {tag} in {builds[-1]['build_seconds']:.0f}s", flush=True)
    for r in uniform:
        log = []
        tag = f"uniform-16x1-{r:g}"
        _run([BP, "compress", "minilm.onnx", "-o", f"{tag}.onnx", "--block", "16x1", "--sparsity", str(r)], work, log)
        _run([BP, "compile", f"{tag}.onnx", "-o", f"{tag}.art"], work, log)
        builds.append({"uniform_ratio": r, "onnx": f"{tag}.onnx", "artifact": f"{tag}.art", "commands": log})
        print(f"built {tag}", flush=True)
    (work / "builds.json").write_text(json.dumps(builds, indent=1))


def phase_time(work: Path, threads: int, runs: int, rounds: int) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import onnxruntime as ort
    import tvm
    import yaml

    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import cpu_name, interleaved_medians

    builds = json.loads((work / "builds.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(work / "minilm.onnx"), so, providers=["CPUExecutionProvider"])
    engines, feeds = {}, None
    for b in builds:
        art = str(work / b["artifact"])
        man = check_artifact(art)
        feeds = default_feeds(man, str(work / b["onnx"]))
        arrays = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
        fn = load_vm(art, man)["main"]
        engines[b["artifact"]] = (lambda fn=fn, arrays=arrays: fn(*arrays))
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
    load_before = os.getloadavg()[0]
    med = interleaved_medians({"onnxruntime": lambda: sess.run(None, ort_feeds), **engines}, runs, rounds)
    ort_ms = med["onnxruntime"] * 1e3
    rows, uniform = [], []
    for b in builds:
        if "uniform_ratio" in b:
            ms = med[b["artifact"]] * 1e3
            uniform.append({**b, "ort_ms": ort_ms, "tvm_ms": ms, "measured_speedup": ort_ms / ms})
            continue
        plan = yaml.safe_load((work / b["plan"]).read_text())["plan"]
        ms = med[b["artifact"]] * 1e3
        rows.append({**b, "predicted_ms": plan["predicted_ms"], "plan_baseline_ms": plan["baseline_ms"],
                     "predicted_speedup": plan["predicted_speedup"], "predicted_cost": plan["predicted_cost"],
                     "overall_ratio": plan["overall_ratio"], "ort_ms": ort_ms, "tvm_ms": ms,
                     "selection": plan.get("selection", "additive"), "candidates": plan.get("candidates", []),
                     "joint_unit": plan.get("joint_unit"), "plan_data": plan.get("data"), "plan_source": plan.get("source"),
                     "measured_speedup": ort_ms / ms,
                     "speedup_error": (ort_ms / ms) / plan["predicted_speedup"] - 1.0,
                     "time_error": plan["predicted_ms"] / ms - 1.0,
                     "blocks": sorted({x["block"] for x in plan["layers"].values() if x["ratio"] > 0}),
                     "layers": {k: {kk: v[kk] for kk in ("block", "ratio", "form", "ms")} for k, v in plan["layers"].items()}})
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "threads": threads, "clock": "wall (time.perf_counter), medians of runs x rounds, engines interleaved",
            "runs": runs, "rounds": rounds, "load_before": load_before, "load_after": os.getloadavg()[0],
            "batch_seq": [1, 128], "rows": same_speed_uniform(rows, uniform), "uniform": uniform,
            "cost_table": _cost_table(), "default_flow_check": default_flow_check(),
            "analytic_error_on_x86": _analytic_error()}


def same_speed_uniform(rows: list[dict], uniform: list[dict]) -> list[dict]:
    """Each plan row gains ``uniform_ratio``: the uniform 16x1 ratio whose measured speed-up (same
    process, same onnxruntime time) equals the plan's, interpolated linearly between the timed
    uniform rows (None outside their range)."""
    import numpy as np

    pts = sorted((u["measured_speedup"], u["uniform_ratio"]) for u in uniform)
    for r in rows:
        r["uniform_ratio"] = None
        if len(pts) >= 2 and pts[0][0] <= r["measured_speedup"] <= pts[-1][0]:
            r["uniform_ratio"] = round(float(np.interp(r["measured_speedup"], [p[0] for p in pts],
                                                       [p[1] for p in pts])), 3)
    return rows


def _cost_table() -> str:
    from blockprune.backends.tvm.cost.calibrate import default_break_even_table, shipped_table_path

    t = default_break_even_table()
    return f"{shipped_table_path().name} ({t.isa}, {t.machine}, measured {t.measured})"


def _analytic_error() -> dict:
    from blockprune.backends.tvm.cost.model import analytic_error

    return analytic_error()


def default_flow_check() -> list[dict]:
    """The cost model's prediction for the uniform MiniLM rows measured in default_flow.json."""
    from blockprune.backends.tvm.cost.model import MeasuredCost, ModelShape

    data = json.loads((RESULTS / "default_flow.json").read_text())
    cost = MeasuredCost()
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    out = []
    for build in data["builds"]:
        if build["model"] != "minilm" or build["form"] != "default":
            continue
        t = next(t for t in data["timings"] if t["threads"] == 1)
        row = next(r for r in t["rows"] if r["artifact"] == build["artifact"])
        if build["block"] is None:
            lin = sum(cost.dense_ms(n, k, 128) for n, k in shapes)
        else:
            lin = sum(cost.layer(n, k, build["block"], 1 - build["sparsity"], 128).ms for n, k in shapes)
        pred = 6 * lin + cost.remainder_ms(ModelShape(6, 384, 128))
        out.append({"row": build["artifact"], "predicted_ms": pred, "measured_ms": row["tvm_ms"],
                    "error": pred / row["tvm_ms"] - 1.0})
    return out


def markdown(result: dict) -> str:
    lines = [f"# `blockprune plan`: predicted vs measured speed-up ({result['date']})", "",
             f"{result['machine']}; bundled MiniLM (dynamo export), batch 1 x seq 128, {result['threads']} thread; "
             f"{result['clock']} ({result['runs']} x {result['rounds']}); load average before/after "
             f"{result['load_before']:.2f}/{result['load_after']:.2f}. Sensitivity: "
             f"{result.get('sensitivity', SENSITIVITY_STSB)}, blocks 16x1 and 32x32, ratios 0.3-0.9; cost model: the shipped "
             f"calibrate table for this host's vector unit ({result.get('cost_table', 'x86-64')}) + the MiniLM "
             "remainder constant.", "",
             "| goal | blocks used | overall ratio | predicted cost | predicted ms | measured ms | time error | "
             "ORT dense ms (plan / side by side) | predicted speed-up (plan baseline / side-by-side ORT) | "
             "measured speed-up | speed-up error (side by side) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        same = r["ort_ms"] / r["predicted_ms"]
        lines.append(f"| {r['speedup_goal']:g}x | {', '.join(r['blocks'])} | {r['overall_ratio']:.2f} | "
                     f"{r['predicted_cost']:.2f} | {r['predicted_ms']:.2f} | {r['tvm_ms']:.2f} | "
                     f"{100 * (r['tvm_ms'] / r['predicted_ms'] - 1):+.0f}% | {r['plan_baseline_ms']:.2f} / "
                     f"{r['ort_ms']:.2f} | {r['predicted_speedup']:.2f}x / {same:.2f}x | **{r['measured_speedup']:.2f}x** | "
                     f"{100 * (r['measured_speedup'] / same - 1):+.0f}% |")
    lines += ["", "The plans were made with the onnxruntime time measured just before (`--baseline-ms`, phase "
              "baseline); on this shared machine onnxruntime itself moved between that measurement and the side-by-side "
              "run, so the speed-up error is also given against the side-by-side onnxruntime time "
              "(= predicted ms vs measured ms). Time error = measured / predicted - 1.", "",
              *_uniform_lines(result), *_candidate_lines(result), *result.get("findings", []), "",
              "## The same cost model on the uniform rows of `default_flow.json` (MiniLM, 1 thread)", "",
              "| row | predicted ms | measured ms | error |", "|---|---:|---:|---:|"]
    for r in result["default_flow_check"]:
        lines.append(f"| {r['row']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {100 * r['error']:+.0f}% |")
    e = result["analytic_error_on_x86"]
    lines += ["", f"Analytic model (used for cross targets) applied to this host vs its measured table: mean |error| "
              f"dense {100 * e['dense_mean_abs_rel']:.0f}%, BSR {100 * e['bsr_mean_abs_rel']:.0f}% (median "
              f"{100 * e['bsr_median_abs_rel']:.0f}%), {e['points']} points.", "", "## Commands", ""]
    lines.append("```")
    lines.append("blockprune export minilm -o minilm.onnx")
    for r in result["rows"]:
        lines += r["commands"]
    lines.append("scripts/quiet_timing.sh python benchmarks/plan_figure.py --work WORK --phase baseline   # --baseline-ms")
    lines.append("scripts/quiet_timing.sh python benchmarks/plan_figure.py --work WORK --phase time")
    lines.append("```")
    return "\n".join(lines) + "\n"


def _candidate_lines(result: dict) -> list[str]:
    """Per plan, the whole candidate plans the joint selection scored (all within the budget)."""
    rows = [r for r in result["rows"] if r.get("candidates")]
    if not rows:
        return []
    lines = ["", f"Joint selection (`plan --selection joint`, the default): per budget, candidate plans all within it, "
             f"scored with every layer pruned at once ({rows[0].get('joint_unit')}); of those within one paired "
             f"standard error (bootstrap) of the least loss, the one with the lowest largest per-layer ratio is "
             f"written. Sensitivity on {rows[0].get('plan_source')} with {rows[0].get('plan_data')}:", "",
             "| goal | candidate | summed per-layer cost | joint loss | paired SE | max ratio | overall ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for c in r["candidates"]:
            name = (f"**{c['name']}** (selected)" if c["selected"] else
                    c["name"] + (" (within 1 SE)" if c.get("within_1se") else ""))
            lines.append(f"| {r['speedup_goal']:g}x | {name} | {c['additive_cost']:.2f} | {c['joint_loss']:.2f} | "
                         f"{c.get('se_vs_least', 0.0):.2f} | {c['max_ratio']:.2f} | {c['overall_ratio']:.3f} |")
    return lines + [""]


def _uniform_lines(result: dict) -> list[str]:
    if not result.get("uniform"):
        return []
    lines = ["", "Uniform 16x1 (one ratio for every layer, `compress --block 16x1 --sparsity R`, default flow), "
             "timed in the same process:", "", "| uniform ratio | measured ms | measured speed-up |", "|---:|---:|---:|"]
    for u in result["uniform"]:
        lines.append(f"| {u['uniform_ratio']:g} | {u['tvm_ms']:.2f} | {u['measured_speedup']:.2f}x |")
    lines += ["", "Uniform ratio of the same measured speed as each plan (linear between those rows): " + ", ".join(
        f"{r['speedup_goal']:g}x plan -> {r['uniform_ratio']}" for r in result["rows"]), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--phase", choices=["baseline", "build", "time", "report"], required=True,
                    help="report: re-render plan.md from plan.json (adds --findings)")
    ap.add_argument("--findings", type=Path, help="Markdown lines to store as the findings (phase report)")
    ap.add_argument("--speedups", default="1.5,2,2.5")
    ap.add_argument("--uniform-ratios", default="0.3,0.4,0.5,0.6,0.7",
                    help="uniform 16x1 rows timed beside the plans (the same-speed comparison for training)")
    ap.add_argument("--plan-model", default="minilm.onnx",
                    help="what `plan` measures sensitivity on (phase build): the bare encoder's ONNX, or a task's "
                         "fine-tuned teacher checkpoint; the plans are always applied to minilm.onnx for timing")
    ap.add_argument("--data", default=STSB, help="plan --data (phase build)")
    ap.add_argument("--examples", type=int, default=64, help="plan --examples (phase build)")
    ap.add_argument("--blocks", default="16x1,32x32", help="plan --blocks (phase build)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "plan.json")
    ap.add_argument("--sensitivity", default=SENSITIVITY_STSB,
                    help="what the plans' sensitivity was measured on (for the report; phase time)")
    args = ap.parse_args(argv)
    if args.phase == "baseline":
        phase_baseline(args.work, args.threads)
    elif args.phase == "build":
        phase_build(args.work, [float(s) for s in args.speedups.split(",")],
                    [float(r) for r in args.uniform_ratios.split(",") if r], args.plan_model, args.data,
                    args.examples, args.blocks)
    elif args.phase == "report":
        from blockprune.io import atomic_path

        result = json.loads(args.out.read_text())
        if args.findings:
            result["findings"] = args.findings.read_text().splitlines()
            with atomic_path(args.out, suffix=".json") as tmp:
                tmp.write_text(json.dumps(result, indent=1) + "\n")
        with atomic_path(args.out.with_suffix(".md"), suffix=".md") as tmp:
            tmp.write_text(markdown(result))
        print(markdown(result))
    else:
        from blockprune.io import atomic_path

        result = phase_time(args.work, args.threads, args.runs, args.rounds)
        result["sensitivity"] = args.sensitivity
        with atomic_path(args.out, suffix=".json") as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        md = args.out.with_suffix(".md")
        with atomic_path(md, suffix=".md") as tmp:
            tmp.write_text(markdown(result))
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
