"""One-shot block pruning of the bundled MiniLM as a sentence-embedding model: how much of the
dense embedding survives, per scoring rule and per-layer allocation, before any training.

Why: a cheap (forward passes only, a few minutes on one CPU thread) check of two pieces of the
issue-#12 recipe on real text, independent of the training budget: activation-aware block scores
(``||W_g * s||`` with per-input-feature activation norms) against plain block norms, and
per-layer ratios from measured sensitivity against one ratio everywhere. Reported: mean cosine
between pruned and dense embeddings of held-out sentences, and zero-shot STS-B dev Spearman.

Usage: python benchmarks/oneshot_embedding.py [--block 16x1] [--ratio 0.5] [--threads 1]
Output: benchmarks/results/oneshot_embedding.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", default="16x1")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--text", default=str(ROOT / "runs" / "embedding" / "sentences.txt"))
    ap.add_argument("--glue", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    ap.add_argument("--calib", type=int, default=256, help="sentences for the activation norms")
    ap.add_argument("--sens-examples", type=int, default=32)
    ap.add_argument("--sens-ratios", default="0.5,0.9")
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "oneshot_embedding.md")
    args = ap.parse_args(argv)

    import torch

    from blockprune.frontends import embedding as E
    from blockprune.frontends.allocation import allocate, measure_sensitivity
    from blockprune.frontends.hard_prune import HardPruneConfig, hard_prune, select_layers
    from blockprune.frontends.importance import collect_feature_norms
    from blockprune.models.zoo import load_model

    torch.set_num_threads(args.threads)
    text = Path(args.text)
    if not text.is_file():
        E.extract_glue_sentences(args.glue, text)
    sents = E.read_sentences(text)
    calib, held = sents[: args.calib], sents[args.calib: args.calib + args.held_out]
    pairs = E.read_sts_dev(args.glue / "STS-B")
    loaded = load_model("minilm", head="encoder")
    model, tok = loaded.model.eval(), loaded.tokenizer()
    cfg = E.EmbeddingConfig(text=str(text), out="-", block=args.block, ratio=args.ratio)
    layers = select_layers(model, cfg.selection())
    collate = E._collate(tok.pad_token_id or 0)
    ds = E._Texts(calib, tok, 128)
    batches = E._calib_batches(ds, collate, args.calib)
    t0 = time.perf_counter()
    fn = collect_feature_norms(model, layers, batches, args.calib)
    dense_held = E.embed(model, tok, held)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def sens_loss_factory():
        bs = batches[: max(1, args.sens_examples // 32)]
        ref = [E.mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in bs]

        def loss() -> float:
            c = [(E.mean_pool(model(**b).last_hidden_state, b["attention_mask"]) * r).sum(-1) for b, r in zip(bs, ref)]
            return float(1 - torch.cat(c).mean())

        return loss

    with torch.no_grad():
        curves = measure_sensitivity(model, layers, [float(r) for r in args.sens_ratios.split(",")],
                                     sens_loss_factory(), fn)
    sens_ratios = allocate(curves, args.ratio, max_ratio=max(curves.ratios))
    rows = [("dense", "-", 1.0, E.sts_spearman(model, tok, pairs, cfg)["score"])]
    for score, alloc in (("weight", "uniform"), ("activation", "uniform"), ("activation", "sensitivity")):
        model.load_state_dict(original)
        masks = hard_prune(model, layers, HardPruneConfig(mode="layer", sparsity=args.ratio),
                           feature_norms=fn if score == "activation" else None,
                           layer_ratios=sens_ratios if alloc == "sensitivity" else None)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in masks.items():
                params[n].masked_fill_(~m.mask, 0)
        cos = float((E.embed(model, tok, held) * dense_held).sum(-1).mean())
        rows.append((score, alloc, cos, E.sts_spearman(model, tok, pairs, cfg)["score"]))
        print(rows[-1], flush=True)
    seconds = time.perf_counter() - t0
    md = [f"## One-shot {args.block} at ratio {args.ratio:g}: MiniLM sentence embeddings, no training", "",
          f"Activation norms from {args.calib} GLUE train sentences; sensitivity: each layer pruned alone at "
          f"{args.sens_ratios} on {args.sens_examples} sentences (1 - cosine to dense); cosine: mean over "
          f"{len(held)} held-out sentences; Spearman: zero-shot STS-B dev ({len(pairs.a)} pairs). "
          f"{seconds / 60:.1f} min on {args.threads} thread(s).", "",
          "| score | allocation | cosine to dense | STS-B Spearman |", "|---|---|---:|---:|"]
    md += [f"| {s} | {a} | {c:.3f} | {100 * sp:.2f} |" for s, a, c, sp in rows]
    md += ["", f"Command: `python benchmarks/oneshot_embedding.py --block {args.block} --ratio {args.ratio:g} "
               f"--threads {args.threads}`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
