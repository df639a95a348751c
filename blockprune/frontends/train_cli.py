"""`blockprune train`: the three-stage recipe (``frontends.recipe``) from the command line.

Kept out of ``cli.py`` so the CLI module does not grow with every training option; ``cli.py``
wires it in with ``add_train_parser(sub)``. Flags map one-to-one onto ``RecipeConfig`` fields,
and validation is left to ``RecipeConfig.validate`` / ``run_recipe`` so the Python API and the
CLI refuse bad input with the same messages.
"""

from __future__ import annotations

import argparse
from typing import Any

from blockprune.errors import BlockpruneError

EXAMPLE = ("blockprune train --model minilm --task rte --data-dir ../shared/data/glue/RTE "
           "--block 1x32 --ratio 0.5 --out runs/rte-50")


def _regex_value(text: str) -> tuple[str, float]:
    """``REGEX=LAMBDA`` (split at the last ``=`` so the regex may contain one)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise BlockpruneError(f"--layer-lambda {text!r} is not REGEX=VALUE",
                              "write e.g. --layer-lambda 'attention\\.self=1e-5'")
    try:
        return pattern, float(value)
    except ValueError:
        raise BlockpruneError(f"--layer-lambda {text!r}: {value!r} is not a number", "write e.g. 'output\\.dense=1e-3'")


def _regex_block(text: str) -> tuple[str, str]:
    pattern, sep, block = text.rpartition("=")
    if not sep or not pattern:
        raise BlockpruneError(f"--block-override {text!r} is not REGEX=RxC", "write e.g. --block-override 'output\\.dense=16x1'")
    return pattern, block


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    t = subparsers.add_parser(
        "train", help="learn block masks on a GLUE task: dense -> reweighted group Lasso -> prune + retrain",
        description=__doc__.split("\n\n")[0] + f"\n\nexample: {EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = t.add_argument_group("what")
    g.add_argument("--model", default="minilm", help="'minilm' (bundled), a local HF directory, or a named config")
    g.add_argument("--task", default=None, help="GLUE task: rte, mrpc, sst2, cola, stsb, qnli, wnli, ... (glue mode)")
    g.add_argument("--data-dir", default=None, help="the task folder (holding train.tsv, dev.tsv) or the GLUE root")
    g.add_argument("--out", required=True, help="run directory; an interrupted run resumes from it")
    g.add_argument("--method", choices=["rgl", "magnitude", "gradual", "transfer"], default="rgl",
                   help="rgl: reweighted group Lasso; magnitude: one-shot prune of the dense model (baseline); "
                        "gradual: cubic sparsity schedule during --epochs-rew, then retraining with masks fixed; "
                        "transfer: start retraining from the pruned encoder of --sparse-init")
    g.add_argument("--sparse-init", default=None, metavar="RUN_DIR",
                   help="method transfer: a finished pruned run (e.g. --mode embedding) whose encoder weights and "
                        "masks replace the dense encoder before masked retraining (prune once, fine-tune per task)")
    g.add_argument("--mode", choices=["glue", "embedding"], default="glue",
                   help="glue: a labelled GLUE task; embedding: task-agnostic sentence-embedding distillation on "
                        "--text (see `blockprune train --mode embedding --help`)")
    p = t.add_argument_group("pruning")
    p.add_argument("--block", default=None,
                   help="block rows x cols in the PyTorch W[out, in] layout (default 1x32; 16x1 in embedding mode)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of weights removed per layer, in [0, 1)")
    p.add_argument("--prune-mode", choices=["layer", "global", "threshold"], default="layer",
                   help="layer: same ratio per layer (paper); global: one ratio over all layers; threshold: --threshold")
    p.add_argument("--threshold", type=float, default=None, help="block L2 norm below which blocks are pruned (threshold mode)")
    p.add_argument("--include-heads", action="store_true", help="also prune pooler and classifier")
    p.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="parameter-name regex of weights to prune (repeatable; default: every .weight)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="parameter-name regex to leave dense (repeatable; default: embed)")
    p.add_argument("--block-override", action="append", default=[], type=_regex_block, metavar="REGEX=RxC")
    p.add_argument("--score", choices=["activation", "weight"], default="activation",
                   help="block importance: ||W_g * s|| with per-input-feature activation norms s, or plain ||W_g||")
    p.add_argument("--calib-examples", type=int, default=256, help="training examples for the activation norms")
    p.add_argument("--allocation", choices=["uniform", "sensitivity", "plan"], default="uniform",
                   help="per-layer ratios: the same everywhere, or chosen from each layer's measured sensitivity "
                        "so the overall ratio is --ratio")
    p.add_argument("--plan", default=None, help="plan.yaml from `blockprune plan`: per-layer blocks and ratios "
                                                "(sets --allocation plan; --ratio and --block are then unused)")
    p.add_argument("--sensitivity-ratios", default="0.25,0.5,0.75,0.9", help="ratios each layer is tried at alone")
    p.add_argument("--sensitivity-examples", type=int, default=128, help="training examples for the sensitivity")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="no layer is pruned beyond this ratio")
    p.add_argument("--prune-every", type=int, default=10, help="gradual: optimizer steps between mask updates")
    p.add_argument("--ramp-fraction", type=float, default=0.75,
                   help="gradual: share of the sparse stage's steps over which sparsity rises to the target")
    s = t.add_argument_group("stages")
    s.add_argument("--epochs-dense", type=int, default=3, help="dense fine-tuning epochs (0: the model is already fine-tuned)")
    s.add_argument("--epochs-rew", type=int, default=3, help="epochs with the reweighted group Lasso penalty")
    s.add_argument("--epochs-retrain", type=int, default=3, help="masked retraining epochs")
    s.add_argument("--lr", type=float, default=None, help="learning rate of every stage (default 2e-5)")
    s.add_argument("--lr-dense", type=float, default=None)
    s.add_argument("--lr-rew", type=float, default=None)
    s.add_argument("--lr-retrain", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--warmup-ratio", type=float, default=0.1)
    s.add_argument("--weight-decay", type=float, default=0.01)
    s.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="group Lasso lambda of every layer (default 10 proximal, 1e-4 penalty)")
    s.add_argument("--rgl-form", choices=["proximal", "penalty"], default="proximal",
                   help="proximal: shrink groups after each optimizer step (reaches exact zeros); penalty: the "
                        "paper's term in the loss")
    s.add_argument("--rgl-scope", choices=["auto", "all", "target"], default="auto",
                   help="proximal form: shrink every group (all), or only the groups due for pruning as "
                        "sparsity ramps to each layer's ratio (target); auto: target with per-layer ratios")
    s.add_argument("--rgl-distill", action=argparse.BooleanOptionalAction, default=None,
                   help="distil the reweighted stage from the dense model too (default: when --distill or "
                        "--distill-hidden is on)")
    s.add_argument("--layer-lambda", action="append", default=[], type=_regex_value, metavar="REGEX=VALUE",
                   help="per-layer lambda, first matching regex wins (repeatable)")
    s.add_argument("--eps", type=float, default=1e-3, help="alpha = 1 / (||W_g|| + eps)")
    s.add_argument("--refresh-every-epochs", type=int, default=1, help="recompute alphas every N epochs (0: never)")
    s.add_argument("--refresh-every-steps", type=int, default=None, help="recompute alphas every N optimizer steps")
    s.add_argument("--distill", type=float, default=0.0, metavar="A",
                   help="masked retraining learns from the model before pruning too: loss = (1-A) task + A teacher "
                        "(0: off)")
    s.add_argument("--distill-temperature", type=float, default=2.0, help="softmax temperature of the teacher term")
    s.add_argument("--distill-hidden", type=float, default=0.0, metavar="B",
                   help="add B * MSE between the student's and the teacher's hidden states (0: off)")
    s.add_argument("--augment", type=int, default=0, metavar="N",
                   help="N perturbed copies of each training example, labelled by the teacher alone, in the "
                        "distilled stages (needs --distill; each copy is one more pass per epoch)")
    s.add_argument("--teacher", default=None, metavar="DIR",
                   help="distil from this fine-tuned checkpoint (same model) instead of the starting model")
    s.add_argument("--stop-after", choices=["dense", "reweighted", "gradual", "retrain"], default=None,
                   help="stop after this stage (a later call with the same settings resumes)")
    r = t.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    r.add_argument("--limit-eval", type=int, default=None, help="use only the first N dev examples")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--freeze-embeddings", action="store_true", help="do not train the word embeddings (faster)")
    r.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="attention kernel while training (the export always uses eager)")
    r.add_argument("--optimizer", choices=["fused", "foreach", "default"], default="fused", help="AdamW implementation")
    e = t.add_argument_group("embedding mode (--mode embedding)",
                             "gradual pruning during --epochs-rew epochs, then --epochs-retrain with masks fixed, distilling "
                             "the dense model's sentence embeddings; --lr defaults to 5e-5; scored by zero-shot STS-B Spearman")
    e.add_argument("--text", default=None, help="plain text file, one sentence per line (no labels needed)")
    e.add_argument("--sts-dir", default=None,
                   help="STS-B folder holding dev.tsv for the zero-shot Spearman (default: DATA_DIR/STS-B)")
    e.add_argument("--cosine-weight", type=float, default=1.0, help="weight of 1 - cos(student, teacher embedding)")
    e.add_argument("--mse-weight", type=float, default=0.0, help="weight of the embedding MSE")
    e.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state MSE")
    e.add_argument("--relation-weight", type=float, default=0.0,
                   help="weight of the MSE between the in-batch cosine-similarity matrices (what STS ranks)")
    t.set_defaults(func=cmd_train)
    return t


def config_from_args(args: argparse.Namespace):
    """``RecipeConfig`` from parsed flags (per-stage lr > --lr > default)."""
    from blockprune.frontends.hard_prune import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from blockprune.frontends.recipe import RecipeConfig

    base_lr = args.lr if args.lr is not None else RecipeConfig.lr_dense
    if args.task is None or args.data_dir is None:
        raise BlockpruneError("glue mode needs --task and --data-dir",
                              f"e.g. {EXAMPLE}; or --mode embedding --text FILE for task-agnostic pruning")
    return RecipeConfig(
        model=args.model, task=args.task, data_dir=args.data_dir, out=args.out, method=args.method,
        block=args.block or "1x32", ratio=args.ratio, prune_mode=args.prune_mode, threshold=args.threshold,
        include=list(args.include or DEFAULT_INCLUDE), exclude=list(args.exclude or DEFAULT_EXCLUDE),
        include_heads=args.include_heads, block_overrides=list(args.block_override),
        epochs_dense=args.epochs_dense, epochs_rew=args.epochs_rew, epochs_retrain=args.epochs_retrain,
        lr_dense=args.lr_dense or base_lr, lr_rew=args.lr_rew or base_lr, lr_retrain=args.lr_retrain or base_lr,
        batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, lam=args.lam, layer_lambdas=list(args.layer_lambda), eps=args.eps,
        refresh_every_epochs=args.refresh_every_epochs or None, refresh_every_steps=args.refresh_every_steps,
        distill=args.distill, distill_temperature=args.distill_temperature,
        seed=args.seed, limit_train=args.limit_train, limit_eval=args.limit_eval, exporter=args.exporter,
        stop_after=args.stop_after, progress=not args.no_progress, threads=args.threads,
        rgl_form=args.rgl_form, rgl_scope=args.rgl_scope, rgl_distill=args.rgl_distill, score=args.score, calib_examples=args.calib_examples,
        distill_hidden=args.distill_hidden, prune_every=args.prune_every, ramp_fraction=args.ramp_fraction,
        allocation="plan" if getattr(args, "plan", None) else args.allocation,
        sensitivity_ratios=_ratios(args.sensitivity_ratios),
        sensitivity_examples=args.sensitivity_examples, max_layer_ratio=args.max_layer_ratio,
        freeze_embeddings=args.freeze_embeddings, attention=args.attention, optimizer=args.optimizer,
        plan_file=getattr(args, "plan", None), sparse_init=getattr(args, "sparse_init", None),
        augment=args.augment, teacher=args.teacher,
    )


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BlockpruneError(f"--sensitivity-ratios {text!r} is not a comma-separated list of numbers",
                              "write e.g. --sensitivity-ratios 0.25,0.5,0.75,0.9") from None


def cmd_train(args: argparse.Namespace) -> int:
    """Run the recipe; ``BlockpruneError`` for bad input propagates to the CLI (exit code 2)."""
    from blockprune.console import console
    from blockprune.frontends.recipe import run_recipe

    if args.mode == "embedding":
        from blockprune.frontends.embedding import embedding_config_from_args, run_embedding

        res = run_embedding(embedding_config_from_args(args))
        if res.finished:
            console.print(f"wrote {res.model_dir}, {res.onnx_path}, {res.masks_path}, {res.report_path}")
        return 0
    cfg = config_from_args(args)
    res = run_recipe(cfg)
    if res.stages_skipped:
        console.print(f"resumed: stages already finished in {res.out}: {', '.join(res.stages_skipped)}")
    if not res.finished:
        done = ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items())
        console.print(f"stopped after {args.stop_after} as asked (dev {res.metric_name}: {done}); "
                      "rerun the same command without --stop-after to continue")
        return 0
    console.print(f"wrote {res.model_dir}, {res.onnx_path}, {res.masks_path}, {res.report_path}")
    return 0
