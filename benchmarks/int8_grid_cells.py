"""int8 on trained accuracy-grid cells: GLUE dev metric of the fp32 model next to its int8 form (issue #15).

Why: the STS-B zero-shot check (``int8_accuracy.py``) measures what int8 costs a one-shot pruned
embedding model; a user ships a fine-tuned, pruned classifier, so the cost that matters is on the
grid's own trained cells. For each run directory (a ``benchmarks/accuracy.py`` cell: ``model.onnx``
plus the checkpoint's tokenizer) this runs, in onnxruntime with 1 thread on the task's dev set:

* the fp32 ``model.onnx`` as trained;
* ``blockprune compress --quantize int8`` of it (per-channel int8 weights, dynamic uint8
  activations; the pruned layers keep their block structure, in int8), as onnxruntime runs it and
  with its integer matmuls made exact (``blockprune.passes.int8_reference``, what the TVM kernels
  compute).

Usage: python benchmarks/int8_grid_cells.py RUN_DIR:TASK [RUN_DIR:TASK ...] [--out NAME]
Output: benchmarks/results/int8_grid_cells.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def dev_metric(onnx_path: Path, tokenizer, task: str, glue: Path, exact: bool = False) -> float:
    """The task's main dev metric of ``onnx_path`` (logits / score output), batches sorted by length."""
    import onnxruntime as ort

    from blockprune.frontends.glue import get_task, read_glue_split
    from blockprune.frontends.metrics import compute_metrics

    spec = get_task(task)
    path = onnx_path
    if exact:
        from blockprune.passes.int8_reference import exact_int8_model

        import onnx

        path = onnx_path.with_suffix(".exact.onnx")
        onnx.save(exact_int8_model(onnx.load(str(onnx_path))), str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    ex = read_glue_split(glue / spec.dir_name, spec, "dev")
    enc = tokenizer([e.text_a for e in ex], [e.text_b for e in ex] if spec.is_pair else None,
                    truncation=True, max_length=128)
    order = sorted(range(len(ex)), key=lambda i: len(enc["input_ids"][i]))
    preds: list[np.ndarray] = [None] * len(ex)  # type: ignore[list-item]
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]
        longest = max(len(enc["input_ids"][i]) for i in idx)
        feeds = {k: np.asarray([list(enc[k][i]) + [0] * (longest - len(enc[k][i])) for i in idx], np.int64)
                 for k in wanted}
        out = sess.run(None, feeds)[0]
        for j, i in enumerate(idx):
            preds[i] = out[j]
    metrics = compute_metrics(task, np.stack(preds), np.asarray([e.label for e in ex]))
    return float(metrics.values[metrics.main])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", help="RUN_DIR:TASK (a grid cell's run directory and its GLUE task)")
    ap.add_argument("--glue", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    ap.add_argument("--out", default="int8_grid_cells")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip compress's own int8-vs-fp32 check (e.g. an undertrained smoke model with ~0 logits)")
    args = ap.parse_args(argv)

    import onnxruntime
    from transformers import AutoTokenizer

    import blockprune as bp

    rows = []
    for item in args.cells:
        run, _, task = item.rpartition(":")
        run = Path(run)
        fp32 = run / "model.onnx"
        tok = AutoTokenizer.from_pretrained(str(run / "model"))
        int8 = run / "model.int8.onnx"
        res = bp.compress(fp32, int8, quantize="int8", verify=not args.no_verify)
        row = {"run": str(run), "task": task, "fp32": dev_metric(fp32, tok, task, args.glue),
               "int8": dev_metric(int8, tok, task, args.glue),
               "int8_exact": dev_metric(int8, tok, task, args.glue, exact=True),
               "onnx_mb": {"fp32": fp32.stat().st_size / 2**20, "int8": int8.stat().st_size / 2**20},
               "compress": str(getattr(res, "summary", ""))[:300]}
        rows.append(row)
        print(f"{task} {run.name}: fp32 {row['fp32']:.4f} int8 {row['int8']:.4f} (exact {row['int8_exact']:.4f})",
              flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else platform.machine()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu,
            "onnxruntime": onnxruntime.__version__, "command": "python benchmarks/int8_grid_cells.py " + " ".join(
                args.cells) + (" --no-verify" if args.no_verify else "")}
    (RESULTS / f"{args.out}.json" if "/" not in args.out else Path(f"{args.out}.json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["# int8 on trained grid cells: GLUE dev metric, fp32 vs int8 (issue #15)", "",
          f"{meta['date']}, {meta['machine']}, onnxruntime {meta['onnxruntime']}, 1 thread. `{meta['command']}`", "",
          "| task | cell | fp32 | int8 (onnxruntime) | int8 (exact integer) | int8 - fp32 (points) | ONNX MB fp32 / int8 |",
          "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['task']} | {Path(r['run']).parent.name}/{Path(r['run']).name} | {100 * r['fp32']:.2f} | "
                  f"{100 * r['int8']:.2f} | {100 * r['int8_exact']:.2f} | {100 * (r['int8_exact'] - r['fp32']):+.2f} | "
                  f"{r['onnx_mb']['fp32']:.1f} / {r['onnx_mb']['int8']:.1f} |")
    (RESULTS / f"{args.out}.md" if "/" not in args.out else Path(f"{args.out}.md")).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
