"""int8 x blocks on the whole bundled MiniLM, against what a user gets from onnxruntime (issue #15).

Rows, each built with the CLI as a user types it (commands stored in the JSON):
``export minilm`` -> ``compress --quantize int8 [--block B --sparsity S]`` -> ``compile``. They are
timed side by side with onnxruntime fp32 on the dense export and onnxruntime's one-line dynamic
int8 (``quantize_dynamic(per_channel=True, weight_type=QInt8)``) of the same export, in one
process per thread count (1 and 2), interleaved, wall clock, medians (``bench_timing``).

Usage:
  python benchmarks/int8_flow.py --work /tmp/i8flow            # build + time
  scripts/quiet_timing.sh python benchmarks/int8_flow.py --work /tmp/i8flow --reuse
Writes benchmarks/results/int8_flow.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_flow import _profile, _run  # noqa: E402 - one way to run a CLI command and to profile

RESULTS = Path(__file__).resolve().parent / "results"
PROFILED = ("int8-dense", "int8-16x4-0.5")  # rows whose kernel shares the report lists (1 thread)
ROWS = [(None, None), ("16x4", 0.5), ("16x4", 0.8), ("16x1", 0.8)]  # (block, sparsity); None: dense int8


def build(work: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exe = str(Path(sys.executable).with_name("blockprune"))
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "minilm.onnx"
    log: list[str] = []
    if not dense.is_file():
        _run([exe, "export", "minilm", "-o", str(dense)], log)
    ort_int8 = work / "minilm-ort-int8.onnx"
    if not ort_int8.is_file():
        quantize_dynamic(str(dense), str(ort_int8), per_channel=True, weight_type=QuantType.QInt8)
    rows = []
    for block, sparsity in ROWS:
        tag = "int8-dense" if block is None else f"int8-{block}-{sparsity}"
        src, art = work / f"{tag}.onnx", work / f"{tag}.art"
        cmds = [f"{exe} export minilm -o {dense}"]
        cmd = [exe, "compress", str(dense), "-o", str(src), "--quantize", "int8"]
        if block is not None:
            cmd += ["--block", block, "--sparsity", str(sparsity)]
        t0 = time.perf_counter()
        if not art.is_dir():
            _run(cmd, cmds)
            _run([exe, "compile", str(src), "-o", str(art)], cmds)
        else:
            cmds += [" ".join(cmd), f"{exe} compile {src} -o {art}"]
        manifest = json.loads((art / "manifest.json").read_text())
        rows.append({"tag": tag, "block": block, "sparsity": sparsity, "onnx": str(src), "artifact": str(art),
                     "commands": cmds, "build_seconds": round(time.perf_counter() - t0, 1),
                     "verified": manifest.get("verified"),
                     "forms": sorted({layer["form"] for layer in manifest["layers"]})})
    return {"dense": str(dense), "ort_int8": str(ort_int8), "rows": rows, "log": log}


def _worker(plan: dict, threads: int, runs: int, rounds: int) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import onnxruntime as ort
    import tvm

    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import interleaved_medians

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    fp32 = ort.InferenceSession(plan["dense"], so, providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(plan["ort_int8"], so, providers=["CPUExecutionProvider"])
    engines, vms, feeds = {}, {}, None
    for r in plan["rows"]:
        man = check_artifact(r["artifact"])
        feeds = default_feeds(man, r["onnx"])
        arrays = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
        vms[r["tag"]] = vm = load_vm(r["artifact"], man)
        fn = vm["main"]
        engines[r["tag"]] = lambda fn=fn, arrays=arrays: fn(*arrays)
    of = {i.name: feeds[i.name] for i in fp32.get_inputs() if i.name in feeds}
    engines = {"onnxruntime fp32": lambda: fp32.run(None, of), "onnxruntime int8": lambda: int8.run(None, of),
               **engines}
    load = os.getloadavg()[0]
    med = interleaved_medians(engines, runs, rounds)
    out = {"threads": threads, "load_before": load, "load_after": os.getloadavg()[0],
           "ms": {k: v * 1e3 for k, v in med.items()}}
    if threads == 1:  # where the time goes (VM instrumentation; after the timing, so it cannot skew it)
        out["profile"] = {tag: {k.replace("int_", "int8_"): v for k, v in _profile(vms[tag], engines[tag]).items()}
                          for tag in PROFILED if tag in vms}  # _profile strips digits, int8's too
    return out


def table(result: dict) -> str:
    lines = [f"# int8 x blocks, whole MiniLM-L6 (batch 1 x seq 128), {result['date']}", "",
             f"Machine: {result['machine']}. Wall clock, medians; onnxruntime and blockprune interleaved in "
             "one process per thread count. `ORT int8` = `quantize_dynamic(per_channel=True, "
             "weight_type=QInt8)` of the same export. Sparsity = fraction of zero blocks (one-shot, no "
             "retraining: accuracy is in `int8_accuracy.md`).", "",
             "| model | threads | ms | vs ORT fp32 | vs ORT int8 |", "|---|---:|---:|---:|---:|"]
    for t in result["timings"]:
        ms = t["ms"]
        for name, v in ms.items():
            lines.append(f"| {name} | {t['threads']} | {v:.1f} | {ms['onnxruntime fp32'] / v:.2f}x | "
                         f"{ms['onnxruntime int8'] / v:.2f}x |")
    lines += ["", f"Load average before timing: {', '.join(str(round(t['load_before'], 2)) for t in result['timings'])}"
              f"; after: {', '.join(str(round(t['load_after'], 2)) for t in result['timings'])}."]
    for t in result["timings"]:
        for tag, shares in t.get("profile", {}).items():
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:8])
            lines += ["", f"Time shares, {tag}, {t['threads']} thread (Relax VM instrumentation): {top}."]
    lines += ["", "Commands:", ""] + [f"- `{c}`" for r in result["builds"]["rows"] for c in r["commands"][1:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/int8-flow")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reuse", action="store_true", help="time what --work holds (build what is missing)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "int8_flow.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        plan = json.loads(Path(args.worker).read_text())
        print(json.dumps(_worker(plan, args.worker_threads, args.runs, args.rounds)))
        return
    plan = build(Path(args.work))
    plan_path = Path(args.work) / "plan.json"
    plan_path.write_text(json.dumps(plan))
    if args.build_only:
        print(f"built {len(plan['rows'])} artifacts in {args.work}")
        return
    from blockprune.backends.tvm.kernels.int8_kernel import int8_isa
    from blockprune.bench_timing import cpu_name

    timings = []
    for threads in [int(t) for t in args.threads.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--worker", str(plan_path), "--worker-threads", str(threads),
                              "--runs", str(args.runs), "--rounds", str(args.rounds)], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        timings.append(json.loads(res.stdout.strip().splitlines()[-1]))
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, int8 kernels: "
                         f"{int8_isa('host')}",
              "command": "python benchmarks/int8_flow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "builds": plan, "timings": timings}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
