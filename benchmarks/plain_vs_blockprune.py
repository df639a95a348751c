"""Same weights, two exports: a plain ``torch.onnx.export`` vs ``blockprune export`` (issue #13).

A BERT-base-shaped encoder (random weights, seeded) is pruned to 80% in 1x32 row segments by a
user's own numpy-style script (largest segment norms kept), then exported twice: plainly (legacy
exporter, opset 14, as Hugging Face tutorials do) and by ``blockprune export``. Both go through
the default ``compress`` and ``compile``; the artifacts and onnxruntime on the plain dense export
are timed side by side in one process (wall clock, interleaved medians, 1 and 2 threads). The
acceptance is equal speed-ups: blockprune must understand a graph it did not write.

Usage:
  python benchmarks/plain_vs_blockprune.py --work /tmp/pvb --build-only
  scripts/quiet_timing.sh python benchmarks/plain_vs_blockprune.py --work /tmp/pvb
Writes benchmarks/results/plain_vs_blockprune.{json,md}.
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

RESULTS = Path(__file__).resolve().parent / "results"
TAGS = ("plain", "blockprune")


def build(work: Path) -> dict:
    import torch

    import blockprune as bp
    from blockprune.models.export import export_onnx
    from blockprune.models.foreign import plain_torch_export
    from blockprune.models.zoo import load_model

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = load_model("bert-base")
    dense = work / "dense-plain.onnx"
    if not dense.is_file():
        plain_torch_export(loaded, dense, exporter="legacy")
    with torch.no_grad():  # the user's own pruning: 80% of 1x32 segments per encoder Linear
        for name, mod in loaded.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "encoder.layer" in name:
                seg = mod.weight.abs().reshape(mod.weight.shape[0], -1, 32).sum(-1)
                keep = seg > torch.quantile(seg.flatten(), 0.8)
                mod.weight.mul_(keep.repeat_interleave(32, dim=1).to(mod.weight.dtype))
    sources = {"plain": work / "p80-plain.onnx", "blockprune": work / "p80-bp.onnx"}
    if not sources["plain"].is_file():
        plain_torch_export(loaded, sources["plain"], exporter="legacy")
    if not sources["blockprune"].is_file():
        export_onnx(loaded, sources["blockprune"])
    rows = {}
    for tag, src in sources.items():
        small, art = work / f"{tag}-small.onnx", work / f"{tag}.art"
        t0 = time.perf_counter()
        res = bp.compress(src, small)
        bsr = next((s.report.changed for s in res.stages if s.report and s.report.name == "block-sparse"), 0)
        a = bp.compile(small, art)
        manifest = json.loads((art / "manifest.json").read_text())
        rows[tag] = {"source": str(src), "onnx": str(small), "artifact": str(art), "bsr_layers": bsr,
                     "verified": a.verified, "build_seconds": round(time.perf_counter() - t0, 1),
                     "epilogues": sorted({str(layer.get("epilogue")) for layer in manifest["layers"]})}
    return {"dense": str(dense), "rows": rows}


def _worker(plan: dict, threads: int, runs: int, rounds: int) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import onnxruntime as ort
    import tvm

    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import interleaved_medians

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(plan["dense"], so, providers=["CPUExecutionProvider"])
    engines, feeds = {}, None
    for tag, r in plan["rows"].items():
        man = check_artifact(r["artifact"])
        feeds = default_feeds(man, r["onnx"])
        arrays = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
        fn = load_vm(r["artifact"], man)["main"]
        engines[tag] = lambda fn=fn, arrays=arrays: fn(*arrays)
    of = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
    engines = {"onnxruntime dense": lambda: sess.run(None, of), **engines}
    load = os.getloadavg()[0]
    med = interleaved_medians(engines, runs, rounds)
    return {"threads": threads, "load_before": load, "ms": {k: v * 1e3 for k, v in med.items()}}


def table(result: dict) -> str:
    lines = [f"# Plain torch.onnx export vs blockprune export, same 80% 1x32 weights ({result['date']})", "",
             "BERT-base shape (random seeded weights), batch 1 x seq 128, default `compress` + `compile`; wall "
             "clock, interleaved medians in one process per thread count.", "",
             "| export | threads | BSR layers | ms | vs onnxruntime dense |", "|---|---:|---:|---:|---:|"]
    for t in result["timings"]:
        for tag in TAGS:
            r = result["builds"]["rows"][tag]
            lines.append(f"| {tag} | {t['threads']} | {r['bsr_layers']} | {t['ms'][tag]:.1f} | "
                         f"{t['ms']['onnxruntime dense'] / t['ms'][tag]:.2f}x |")
        lines.append(f"| onnxruntime dense | {t['threads']} | - | {t['ms']['onnxruntime dense']:.1f} | 1.00x |")
    lines += ["", "Load average before each timing: " +
              ", ".join(f"{t['threads']}t {t['load_before']:.2f}" for t in result["timings"]) + ".", "",
              f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/plain-vs-blockprune")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "plain_vs_blockprune.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        plan = json.loads(Path(args.worker).read_text())
        print(json.dumps(_worker(plan, args.worker_threads, args.runs, args.rounds)))
        return
    work = Path(args.work)
    plan_path = work / "plan.json"
    if plan_path.is_file() and all(Path(r["artifact"]).is_dir() for r in json.loads(plan_path.read_text())["rows"].values()):
        plan = json.loads(plan_path.read_text())
    else:
        plan = build(work)
        plan_path.write_text(json.dumps(plan, default=str))
    if args.build_only:
        print(json.dumps(plan["rows"], indent=1, default=str))
        return
    timings = []
    for threads in [int(t) for t in args.threads.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--worker", str(plan_path), "--worker-threads", str(threads),
                              "--runs", str(args.runs), "--rounds", str(args.rounds)], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        timings.append(json.loads(res.stdout.strip().splitlines()[-1]))
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/plain_vs_blockprune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "builds": plan, "timings": timings}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
