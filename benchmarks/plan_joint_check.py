"""Does the planner's joint loss rank whole plans the way the real metric does? (one-shot, no training)

Why: `plan --selection joint` picks, among candidate plans that all meet the budget, the one of
least *joint* loss (every layer pruned at once, scored on a few training examples). The plan it
replaced was chosen by the *summed per-layer* cost, and that sum ranked plans wrongly: trained,
its plans lost up to 35 STS-B points to the uniform model of the same speed
(`plan_training_additive.md`). This script re-applies every candidate a plan file records
(`info.candidates[].layers`) to the model the plan was made on, with the same one-shot rule
(per-layer block L2, weakest first), and measures the dev metric that matters: the task's GLUE dev
metric for a fine-tuned teacher, zero-shot STS-B dev Spearman for a bare encoder. Then, per plan,
the Spearman rank correlation of each proxy (joint loss, summed per-layer cost) with that metric.

Usage:
  python benchmarks/plan_joint_check.py --plans WORK/plan-1.5x.yaml,WORK/plan-2x.yaml --task STS-B \\
      --data-dir ../shared/data/glue --tag STS-B [--limit 600]
Writes benchmarks/results/plan_joint_check.{json,md} (entries keyed by tag and plan; others kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GLUE = ROOT.parent / "shared" / "data" / "glue"


def _dev_metric(pm, task: str | None, data_dir: Path, limit: int | None):
    """A function: the model as it is now -> its dev metric (x100) and the metric's name."""
    import numpy as np
    import torch

    model, tok = pm.loaded.model.eval(), pm.loaded.tokenizer()
    if pm.loaded.head == "encoder":
        from blockprune.frontends.embedding import EmbeddingConfig, read_sts_dev, sts_spearman

        pairs = read_sts_dev(data_dir / "STS-B", limit)
        cfg = EmbeddingConfig(text="", out="", max_length=128)
        return (lambda: 100 * sts_spearman(model, tok, pairs, cfg)["score"]), "zero-shot STS-B dev Spearman"
    from blockprune.frontends.glue import get_task, read_glue_split
    from blockprune.frontends.metrics import compute_metrics

    spec = get_task(task)
    ex = read_glue_split(data_dir / spec.name, spec, "dev", limit=limit)
    labels = np.array([e.label for e in ex])

    @torch.no_grad()
    def metric() -> float:
        preds = []
        for i in range(0, len(ex), 64):
            part = ex[i:i + 64]
            enc = tok([e.text_a for e in part], [e.text_b for e in part] if part[0].text_b else None,
                      truncation=True, max_length=128, padding=True, return_tensors="pt")
            preds.append(model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}).logits.float())
        m = compute_metrics(spec.name, torch.cat(preds).numpy(), labels)
        return 100 * m.values[m.main]
    return metric, f"{spec.name} dev {spec.metric}"


def _rank_corr(a: list[float], b: list[float]) -> float | None:
    from blockprune.frontends.metrics import spearman

    return round(float(spearman(a, b)), 3) if len(a) >= 3 else None


def check_plan(plan_path: Path, task: str | None, data_dir: Path, limit: int | None, cache: dict) -> dict:
    import torch
    import yaml

    from blockprune.blocks import BlockShape
    from blockprune.frontends.hard_prune import prune_per_layer
    from blockprune.frontends.plan_sensitivity import load_plan_model
    from blockprune.plan.plan_file import portable_name

    info = yaml.safe_load(plan_path.read_text())["plan"]
    if not info.get("candidates") or "layers" not in info["candidates"][0]:
        raise SystemExit(f"{plan_path}: no candidates with their layers (make it with `plan --selection joint`)")
    model_spec = info["model"]
    if not Path(model_spec).is_absolute() and (plan_path.parent / model_spec).exists():
        model_spec = str(plan_path.parent / model_spec)
    if model_spec not in cache:
        pm = load_plan_model(model_spec)
        cache[model_spec] = (pm, *_dev_metric(pm, task, data_dir, limit))
    pm, metric, metric_name = cache[model_spec]
    params = dict(pm.loaded.model.named_parameters())
    by_portable = {portable_name(n): n for n in pm.layers}
    dense = metric()
    rows = []
    for c in info["candidates"]:
        plan = {by_portable[k]: (b, float(r)) for k, (b, r) in c["layers"].items() if float(r) > 0}
        saved = {n: params[n].detach().clone() for n in plan}
        try:
            masks = prune_per_layer(saved, {n: BlockShape.parse(b) for n, (b, _) in plan.items()},
                                    {n: r for n, (_, r) in plan.items()})
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].copy_(saved[n].masked_fill(~m.mask, 0))
            value = metric()
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
        rows.append({"name": c["name"], "selected": c["selected"], "joint_loss": c["joint_loss"],
                     "additive_cost": c["additive_cost"], "overall_ratio": c["overall_ratio"],
                     "max_ratio": c["max_ratio"], "one_shot_metric": round(value, 3)})
        print(f"{plan_path.name} {c['name']}: joint {c['joint_loss']:.2f}, summed {c['additive_cost']:.2f}, "
              f"{metric_name} {value:.2f}", flush=True)
    ys = [r["one_shot_metric"] for r in rows]
    best = max(rows, key=lambda r: r["one_shot_metric"])
    return {"plan": plan_path.name, "goal": info["goal"], "model": info["model"], "data": info["data"],
            "metric": metric_name, "dense_metric": round(dense, 3), "candidates": rows,
            "rank_corr_joint": _rank_corr([-r["joint_loss"] for r in rows], ys),
            "rank_corr_additive": _rank_corr([-r["additive_cost"] for r in rows], ys),
            "selected_is_best": next(r for r in rows if r["selected"])["one_shot_metric"] >= best["one_shot_metric"] - 1e-9,
            "selected_minus_uniform": round(next(r for r in rows if r["selected"])["one_shot_metric"] - max(
                (r["one_shot_metric"] for r in rows if r["name"].startswith("uniform 16x1")), default=float("nan")), 3)}


def markdown(data: dict) -> str:
    lines = ["## Joint loss vs the real metric, one-shot (`benchmarks/plan_joint_check.py`)", "",
             "Every candidate plan a `plan --selection joint` file records, re-applied one-shot (per-layer block L2, "
             "no training) to the model the plan was made on, and scored on the dev set. Rank correlation: Spearman "
             "between each proxy (lower loss = better) and the dev metric over one plan's candidates.", ""]
    for tag, entries in sorted(data["entries"].items()):
        for e in entries.values():
            lines += [f"### {tag}: {e['plan']} ({', '.join(f'{k} {v:g}' for k, v in e['goal'].items())}); "
                      f"{e['metric']} (dense {e['dense_metric']:.2f})", "",
                      "| candidate | summed per-layer cost | joint loss | overall ratio | max ratio | one-shot dev |",
                      "|---|---:|---:|---:|---:|---:|"]
            for r in e["candidates"]:
                name = f"**{r['name']}** (selected)" if r["selected"] else r["name"]
                lines.append(f"| {name} | {r['additive_cost']:.2f} | {r['joint_loss']:.2f} | {r['overall_ratio']:.3f} | "
                             f"{r['max_ratio']:.2f} | {r['one_shot_metric']:.2f} |")
            lines += ["", f"Rank correlation with the dev metric: joint loss {e['rank_corr_joint']}, summed per-layer "
                          f"cost {e['rank_corr_additive']}; selected minus uniform 16x1: "
                          f"{e['selected_minus_uniform']:+.2f} points.", ""]
    lines += [f"Date: {data.get('date')}; machine: {data.get('machine')}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", required=True, help="comma-separated plan files (made with --selection joint)")
    ap.add_argument("--task", default=None, help="GLUE task of a fine-tuned teacher (default: the bare encoder, "
                                                 "zero-shot STS-B)")
    ap.add_argument("--tag", required=True, help="the entry's key in the results (e.g. STS-B, encoder)")
    ap.add_argument("--data-dir", type=Path, default=GLUE)
    ap.add_argument("--limit", type=int, default=None, help="dev examples (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "plan_joint_check.json")
    args = ap.parse_args(argv)
    import torch

    from blockprune.bench_timing import cpu_name
    from blockprune.io import atomic_path

    torch.set_num_threads(args.threads)
    cache: dict = {}
    results = {p: check_plan(Path(p), args.task, args.data_dir, args.limit, cache) for p in args.plans.split(",")}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"entries": {}}
    data["entries"][args.tag] = {Path(p).name: r for p, r in results.items()}
    data["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["machine"] = cpu_name()
    with atomic_path(args.out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    with atomic_path(args.out.with_suffix(".md"), suffix=".md") as tmp:
        tmp.write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
