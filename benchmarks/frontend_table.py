"""The frontend comparison table: reweighted group Lasso vs one-shot magnitude, same retraining.

Why a script: the comparison must be rebuilt from the runs themselves (their ``report.json``,
``state.json``, masks and group-norm snapshots), not typed by hand. The RGL runs are the 1x32
cells of the accuracy grid (``benchmarks/accuracy.py``, runs under ``runs/accuracy``); the
magnitude runs are ``blockprune train --method magnitude`` from the same dense checkpoint with the
same masked-retraining budget (``runs/fe2-<task>-mag-<NN>``). Besides metrics, it reports what
tells whether the regulariser did anything:

* the mean group norm of the groups that end up pruned over that of the kept ones, in the dense
  model and after the reweighted stage (the regulariser should push the ratio down), and
* the overlap of the RGL and magnitude masks (Jaccard of the pruned groups): near 1 means RGL
  picked what magnitude would have picked.

Usage: python benchmarks/frontend_table.py [--tasks RTE,MRPC] [--ratios 0.5,0.8] [--block 1x32]
Output: benchmarks/results/frontend_runs.md (the part between the generated-table markers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- frontend_table.py: begin -->", "<!-- frontend_table.py: end -->"


def pruned_groups(masks_path: Path, block: str) -> dict[str, np.ndarray]:
    """Per HF weight name: boolean [groups_out, groups_in] array, True where the whole block is zero."""
    from blockprune.blocks import BlockShape, block_keep_from_mask
    from blockprune.masks import load_masks

    b = BlockShape.parse(block)
    ms = load_masks(masks_path)
    out = {}
    for key, mask in ms.masks.items():
        info = ms.layers.get(key)
        m = np.asarray(mask)
        if info is not None and info.layout == "in_out":
            m = m.T
        out[(info.hf_name if info and info.hf_name else key)] = ~block_keep_from_mask(m != 0, b)
    return out


def norm_ratio(norms_path: Path, pruned: dict[str, np.ndarray]) -> float:
    """Mean norm of the pruned groups / mean norm of the kept groups, over every layer."""
    from safetensors.numpy import load_file

    norms = load_file(str(norms_path))
    p, k = [], []
    for name, mask in pruned.items():
        if name in norms and norms[name].shape == mask.shape:
            p.append(norms[name][mask])
            k.append(norms[name][~mask])
    if not p:
        return float("nan")
    return float(np.concatenate(p).mean() / np.concatenate(k).mean())


def jaccard(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a if n in b)
    union = sum(int((a[n] | b[n]).sum()) for n in a if n in b)
    return inter / union if union else float("nan")


def _fmt(values: dict[str, float], metric: str) -> str:
    if "f1" in values:
        return f"F1 {100 * values['f1']:.2f} (acc {100 * values['accuracy']:.2f})"
    return f"{metric} {100 * values.get(metric, float('nan')):.2f}"


def _stage_eval(run: Path, stage: str) -> dict[str, Any] | None:
    st = run / "state.json"
    if not st.is_file():
        return None
    rec = json.loads(st.read_text())["stages"].get(stage)
    return rec.get("eval") if rec else None


def rows_for(task: str, ratio: float, block: str, acc_runs: Path, runs: Path) -> list[dict[str, Any]]:
    dense_run = acc_runs / task / "dense"
    rew_run = acc_runs / task / f"rgl-{block}" / "reweighted"
    dense_norms = dense_run / "checkpoints" / "dense" / "group_norms.safetensors"
    rew_norms = rew_run / "checkpoints" / "reweighted" / "group_norms.safetensors"
    runs_by_method = {"rgl": acc_runs / task / f"rgl-{block}" / f"r{ratio:g}",
                      "magnitude": runs / f"fe2-{task.lower().replace('-', '')}-mag-{round(100 * ratio)}"}
    pruned: dict[str, dict[str, np.ndarray]] = {}
    out = []
    for method, run in runs_by_method.items():
        rep = run / "report.json"
        row: dict[str, Any] = {"task": task, "ratio": ratio, "method": method, "run": str(run.relative_to(ROOT))
                               if run.is_relative_to(ROOT) else str(run)}
        if not rep.is_file():
            row["status"] = "not finished"
            out.append(row)
            continue
        r = json.loads(rep.read_text())
        final = {s["stage"]: s for s in r["stages"]}["retrain"]
        row.update(metric=r["metric"], pruned=final["metrics"], cr=r["compression_rate"],
                   retrain_min=final["seconds"] / 60, verified_zero=r.get("masked_entries_verified_zero"),
                   onnx_diff=r.get("onnx_export_max_abs_diff"))
        pruned[method] = pruned_groups(run / "masks.safetensors", block)
        row["ratio_dense"] = norm_ratio(dense_norms, pruned[method]) if dense_norms.is_file() else float("nan")
        if method == "rgl":
            row["ratio_rew"] = norm_ratio(rew_norms, pruned[method]) if rew_norms.is_file() else float("nan")
            ev = _stage_eval(rew_run, "reweighted")
            row["after_rew"] = ev["values"] if ev else None
        out.append(row)
    if len(pruned) == 2:
        j = jaccard(pruned["rgl"], pruned["magnitude"])
        for row in out:
            row["jaccard"] = j
    return out


def markdown(task_rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> str:
    lines = ["| task | ratio | method | dense | after reweighting | after masked retraining | vs dense (points) | "
             "CR | pruned/kept group norm: dense -> reweighted | mask overlap RGL vs magnitude | retrain min |",
             "|---|---:|---|---|---|---|---:|---:|---|---:|---:|"]
    for row in task_rows:
        d = dense.get(row["task"])
        dtxt = _fmt(d["values"], d["metric"]) if d else "-"
        if "status" in row:
            lines.append(f"| {row['task']} | {row['ratio']:g} | {row['method']} | {dtxt} | | {row['status']} | | | | | |")
            continue
        m = row["metric"]
        delta = 100 * (row["pruned"][m] - d["values"][m]) if d else float("nan")
        rew = _fmt(row["after_rew"], m) if row.get("after_rew") else "-"
        norms = (f"{row['ratio_dense']:.3f} -> {row['ratio_rew']:.3f}" if "ratio_rew" in row
                 else f"{row['ratio_dense']:.3f} (dense weights)")
        lines.append(f"| {row['task']} | {row['ratio']:g} | {row['method']} | {dtxt} | {rew} | "
                     f"{_fmt(row['pruned'], m)} | {delta:+.2f} | {row['cr']:.2f}x | {norms} | "
                     f"{row.get('jaccard', float('nan')):.3f} | {row['retrain_min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="RTE,MRPC")
    ap.add_argument("--ratios", default="0.5,0.8")
    ap.add_argument("--block", default="1x32")
    ap.add_argument("--accuracy-runs", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "frontend_runs.md")
    args = ap.parse_args(argv)
    dense: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for task in args.tasks.split(","):
        ev = _stage_eval(args.accuracy_runs / task / "dense", "dense")
        if ev:
            dense[task] = {"values": ev["values"], "metric": ev["metric"]}
        for ratio in (float(r) for r in args.ratios.split(",")):
            rows += rows_for(task, ratio, args.block, args.accuracy_runs, args.runs)
    table = markdown(rows, dense)
    print(table)
    from blockprune.io import atomic_path

    text = BEGIN + "\n" + table + END + "\n"
    if args.out.is_file() and BEGIN in args.out.read_text():
        pre, rest = args.out.read_text().split(BEGIN, 1)
        text = pre + BEGIN + "\n" + table + END + (rest.split(END, 1)[1] if END in rest else "")
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
