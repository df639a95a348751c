"""One-shot pruning sensitivity: how much of a fine-tuned model's dev metric survives hard pruning
per block shape and ratio, before any retraining.

Why: the accuracy grid retrains for a fixed budget; when a cell collapses, the question is whether
the budget or the block shape is to blame. This script answers the second part cheaply (a few
minutes on CPU, no training): it takes a fine-tuned checkpoint (say the grid's dense or reweighted
checkpoint of a task), prunes every encoder Linear with the frontend's own hard-pruning rule (the
per-layer percentile of block L2 norms, ``--prune-mode layer``) and evaluates the dev set. 1x1
(unstructured) is the reference: the gap between it and a block shape at the same ratio is what
the structure costs before retraining has a chance to recover it.

Usage: python benchmarks/sensitivity.py --model runs/accuracy/STS-B/rgl-1x32/reweighted/checkpoints/reweighted \\
           --task sts-b [--blocks 1x1,1x32,32x1,4x4,16x1] [--ratios 0.1,0.2,0.3,0.5]
Output: benchmarks/results/sensitivity_<task>.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a fine-tuned HF checkpoint directory (local)")
    ap.add_argument("--task", required=True, help="GLUE task of the checkpoint: rte, mrpc, sst-2, cola, sts-b")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue", help="GLUE root")
    ap.add_argument("--blocks", default="1x1,1x32,32x1,4x4,16x1")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    from blockprune.frontends.glue import GlueDataset, get_task, make_collator, read_glue_split
    from blockprune.frontends.hard_prune import HardPruneConfig, LayerSelection, hard_prune, select_layers
    from blockprune.frontends.metrics import compute_metrics
    from blockprune.frontends.recipe import HEAD_PATTERN, _head_for, resolve_data_dir
    from blockprune.models.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task(args.task)
    root, spec = resolve_data_dir(str(args.data_dir), spec)
    loaded = load_model(args.model, head=_head_for(spec), num_labels=spec.num_labels)
    model = loaded.model.eval()
    tokenizer = loaded.tokenizer()
    dev = GlueDataset(read_glue_split(root, spec, "dev", limit=args.limit_eval), tokenizer, spec)
    loader = DataLoader(dev, batch_size=64, collate_fn=make_collator(tokenizer, spec))
    original = {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def score() -> float:
        preds, labels = [], []
        for batch in loader:
            labels.append(batch.pop("labels"))
            preds.append(model(**batch).logits)
        p = torch.cat(preds).numpy()
        return compute_metrics(spec.name, p.reshape(-1) if spec.is_regression else p, torch.cat(labels).numpy()).score

    t0 = time.perf_counter()
    rows = [("none", 0.0, score())]
    print(f"unpruned: {rows[0][2]:.4f}", flush=True)
    for block in args.blocks.split(","):
        layers = select_layers(model, LayerSelection(block=block, exclude=["embed", HEAD_PATTERN]))
        for ratio in (float(r) for r in args.ratios.split(",")):
            model.load_state_dict(original)
            masks = hard_prune(model, layers, HardPruneConfig(mode="layer", sparsity=ratio))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, m in masks.items():
                    params[name].mul_(m.mask.to(params[name].dtype))
            rows.append((block, ratio, score()))
            print(f"{block} {ratio:g}: {rows[-1][2]:.4f}", flush=True)
    model.load_state_dict(original)

    base = rows[0][2]
    ratios = sorted({r for _, r, _ in rows[1:]})
    table = {(b, r): s for b, r, s in rows[1:]}
    out = [f"## One-shot pruning sensitivity: {spec.name}, no retraining", "",
           f"{time.strftime('%Y-%m-%d %H:%M')}; checkpoint `{args.model}`; dev {spec.name} ({len(dev)} examples), "
           f"metric in points; every encoder Linear pruned at the ratio with the per-layer percentile rule on block "
           f"L2 norms (what `blockprune train` does before retraining); {time.perf_counter() - t0:.0f} s. Command: "
           f"`python benchmarks/sensitivity.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
           f"Unpruned: **{100 * base:.2f}**.", "",
           "| block | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
           "|---|" + "---:|" * len(ratios)]
    for block in args.blocks.split(","):
        out.append(f"| {block} | " + " | ".join(f"{100 * table[(block, r)]:.2f} ({100 * (table[(block, r)] - base):+.1f})"
                                               for r in ratios) + " |")
    text = "\n".join(out) + "\n"
    path = args.out or RESULTS / f"sensitivity_{spec.name.lower().replace('-', '')}.md"
    from blockprune.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print("\n" + text + f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
