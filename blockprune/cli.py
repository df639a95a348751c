"""`blockprune`: one command, subcommands in the order of the flow.

    blockprune export MODEL -o model.onnx          # models: PyTorch -> verified ONNX
    blockprune prune MODEL.onnx -o pruned.onnx     # passes: one-shot block pruning or --masks
    blockprune inspect MODEL.onnx                  # per-layer table and compression rate
    blockprune demo                                # the main job on the bundled MiniLM

A ``BlockpruneError`` becomes one readable message (problem + fix) and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from blockprune import __version__
from blockprune.errors import BlockpruneError


def _check_output(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise BlockpruneError(f"output {path!r} is a directory", "give a file name, e.g. out/model.onnx")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from blockprune.console import console
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model

    out = _check_output(args.output)
    with console.status(f"loading {args.model}"):
        loaded = load_model(args.model, head=args.head, num_labels=args.num_labels, seed=args.seed)
    with console.status(f"exporting ({args.exporter}) and checking against PyTorch"):
        res = export_onnx(loaded, out, exporter=args.exporter, opset=args.opset, check=not args.no_check,
                          atol=args.atol)
    console.print(f"wrote {res.path} (opset {res.opset}, {args.exporter} exporter, "
                  f"{res.renamed} initializers named after HF parameters)")
    if res.max_abs_diff:
        console.print("check vs PyTorch (onnxruntime): max |diff| "
                      + ", ".join(f"{v:.2e} at batch x seq {k}" for k, v in res.max_abs_diff.items())
                      + f" (tolerance {args.atol:g})")
    return 0


def _prune_config(args: argparse.Namespace):
    from blockprune.passes import PruneConfig

    base = PruneConfig(block=args.block, sparsity=args.sparsity, global_ranking=args.global_ranking,
                       include_heads=args.include_heads)
    return PruneConfig.from_yaml(args.config, defaults=base) if args.config else base


def cmd_prune(args: argparse.Namespace) -> int:
    from blockprune.console import console, kv_table, layer_table
    from blockprune.prune_api import prune_file

    out = _check_output(args.output)
    config = None if args.masks else _prune_config(args)
    res = prune_file(args.model, out, config=config, masks_path=args.masks, save_masks_to=args.save_masks,
                     verify=not args.no_verify, atol=args.atol)
    console.print(layer_table(res.stats, title=f"{out.name}: prunable layers"))
    rows = [("output", str(res.output)),
            ("masks", f"{args.masks} ({res.masks.source})" if args.masks else f"one-shot block L2 norm ({res.masks.source})"),
            ("density of Linear weights", f"{res.stats.density:.3f}"),
            ("compression rate (paper's count)", f"{res.stats.compression_rate:.2f}x")]
    if res.verify:
        rows.append(("verification vs numpy masked reference",
                     f"max |diff| {res.verify.max_abs_diff:.2e} (tolerance {res.verify.atol:g})"))
    else:
        rows.append(("verification", "skipped (--no-verify)"))
    if args.save_masks:
        rows.append(("saved masks", args.save_masks))
    console.print(kv_table("summary", rows))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from blockprune.compress_api import compress_file
    from blockprune.console import console, human_bytes, kv_table, layer_table

    out = _check_output(args.output)
    prune = None
    plan = _compress_plan(args) if getattr(args, "plan", None) else None
    if plan is not None:
        prune = plan
    elif args.masks is None and (args.sparsity is not None or args.config):
        if args.sparsity is None:
            args.sparsity = 0.5
        prune = _prune_config(args)
    break_even = args.break_even
    if args.break_even_file:
        from blockprune.backends.tvm.cost.calibrate import BreakEvenTable

        break_even = BreakEvenTable.load(args.break_even_file)
    res = compress_file(args.model, out, prune=prune, masks_path=args.masks, reorder=args.reorder,
                        reorder_block=args.reorder_block, form=args.form, break_even=break_even,
                        verify=not args.no_verify, atol=args.atol, progress=True, quantize=args.quantize,
                        quantize_heads=args.include_heads)
    console.print(layer_table(res.stats, title=f"{out.name}: prunable layers"))
    rows = [("output", str(res.output)),
            ("file size", f"{human_bytes(res.input_bytes)} -> {human_bytes(res.output_bytes)} "
                          f"({res.input_bytes / max(res.output_bytes, 1):.2f}x smaller)"),
            ("compression rate (paper's count)", f"{res.stats.compression_rate:.2f}x")]
    for st in res.stages:
        what = f"{st.seconds:.1f}s"
        if st.max_abs_diff is not None:
            what += f", verified: max |diff| {st.max_abs_diff:.2e} (tolerance {args.atol:g})"
        if st.report is not None and st.report.name == "reorder":
            d = st.report.details
            what += f", empty {d['block']} blocks {d['empty_blocks_before']} -> {d['empty_blocks_after']}"
        if st.report is not None and st.report.name == "compact":
            what += f", {st.report.changed} block(s) shrunk"
        if st.report is not None and st.report.name == "detect-blocks":
            blocks = sorted(set(st.report.details.get("blocks", {}).values()))
            what += (f", {st.report.changed} pruned layer(s) without a recorded block: {', '.join(blocks)}"
                     if st.report.changed else ", every pruned layer has its block recorded")
            rows.append((f"stage {st.name}", what))
            continue
        if st.report is not None and st.report.name == "block-sparse":
            what += f", {st.report.changed} layer(s) rewritten to BSR"
        if st.quality is not None:
            q = st.quality
            cos = q["min_sentence_cosine"]
            what += (", verified: " + ("logits: " if cos is None else
                                       f"sentence cosine >= {cos:.4f} (bound {q['min_cosine_bound']:g}), ")
                     + f"relative error {q['max_rel_error']:.3f} (bound {q['max_rel_error_bound']:g})")
        if st.report is not None and st.report.name == "quantize-int8":
            what += f", {st.report.changed} layer(s) int8"
        rows.append((f"stage {st.name}", what))
        for note in (st.report.notes if st.report else [])[:6]:
            rows.append(("", note))
    console.print(kv_table("summary", rows))
    if plan is not None:
        from blockprune.plan.cli import planned_vs_achieved

        table, off = planned_vs_achieved(plan, res.model)
        console.print(table)
        console.print(f"plan: predicted {plan.plan['predicted_ms']:.2f} ms on {plan.plan['target']}"
                      + (f", {plan.plan['predicted_speedup']:.2f}x" if plan.plan.get("predicted_speedup") else "")
                      + (f"; {len(off)} layer(s) off the plan" if off else "; every layer as planned")
                      + "; time it with `blockprune compile` then `blockprune bench ARTIFACT --plan PLAN`")
    return 0


def _compress_plan(args: argparse.Namespace):
    """The plan as the pruning config (one-shot); reorder off when it mixes block shapes, since the
    reorder objective counts empty blocks of one shape and could fill another shape's blocks."""
    from blockprune.console import console
    from blockprune.plan.plan_file import planned_blocks, read_plan

    if args.masks or args.config or args.sparsity is not None:
        raise BlockpruneError("--plan gives every layer's block and ratio; it cannot be combined with "
                              "--masks, --config or --sparsity", "drop the other option, or edit the plan")
    plan = read_plan(args.plan)
    if args.reorder and len(planned_blocks(plan)) > 1:
        args.reorder = False
        console.print(f"plan mixes blocks {', '.join(sorted(planned_blocks(plan)))}: reorder off (its objective "
                      "scores one block shape)")
    return plan


def cmd_inspect(args: argparse.Namespace) -> int:
    from blockprune.console import console, kv_table, layer_table
    from blockprune.onnx_io import get_meta, load_onnx
    from blockprune.passes.find_weights import require_weights
    from blockprune.passes.layer_stats import model_stats

    model = load_onnx(args.model)
    stats = model_stats(model, block=args.block)
    require_weights(stats.layers, what=f"model {args.model!r}")
    if args.json:
        print(json.dumps({"layers": [r.as_dict() for r in stats.layers], "total": stats.total,
                          "nonzero": stats.nonzero, "compression_rate": stats.compression_rate}, indent=2))
        return 0
    console.print(layer_table(stats, title=f"{Path(args.model).name}: prunable layers"))
    console.print(kv_table("summary", [
        ("architecture", str(get_meta(model, "architecture", "unknown"))),
        ("source", str(get_meta(model, "source", "unknown"))),
        ("opset", ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)),
        ("prunable layers", str(len(stats.layers))),
        ("density of Linear weights", f"{stats.density:.3f}"),
        ("compression rate (paper's count)", f"{stats.compression_rate:.2f}x"),
    ]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blockprune.demo import run_demo

    run_demo(args.workdir, block=args.block, sparsity=args.sparsity, exporter=args.exporter, threads=args.threads)
    return 0


def _sparsity(text: str) -> float:
    from blockprune.blocks import check_sparsity

    try:
        value = float(text)
    except ValueError:
        raise BlockpruneError(f"sparsity {text!r} is not a number", "give a fraction in [0, 1), e.g. 0.5")
    return check_sparsity(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockprune", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"blockprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a model to verified ONNX")
    e.add_argument("model", help="'minilm' (bundled), a named config (bert-base, bert-tiny, ...), or a local HF directory")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    e.add_argument("--head", choices=["encoder", "classification", "regression"], default=None,
                   help="default: a local checkpoint's own head (config.architectures), else encoder")
    e.add_argument("--num-labels", type=int, default=None, help="default: the checkpoint's, else 2")
    e.add_argument("--opset", type=int, default=None, help="default 18 (dynamo) / 17 (legacy); at least 17")
    e.add_argument("--seed", type=int, default=0, help="seed of random weights for named configs")
    e.add_argument("--atol", type=float, default=1e-4, help="max |ONNX - PyTorch| allowed (default 1e-4)")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime check against PyTorch")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("prune", help="one-shot block pruning, or apply learned masks")
    pr.add_argument("model")
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("--block", default="1x32", help="block rows x cols in the PyTorch W[out, in] layout (default 1x32)")
    pr.add_argument("--sparsity", type=_sparsity, default=0.5, help="fraction of weights removed, in [0, 1)")
    pr.add_argument("--global", dest="global_ranking", action="store_true", help="rank blocks across all layers")
    pr.add_argument("--include-heads", action="store_true", help="also prune pooler and classifier")
    pr.add_argument("--config", help="YAML: per-layer regex -> {block, sparsity}")
    pr.add_argument("--masks", help="masks.safetensors to apply instead of one-shot pruning")
    pr.add_argument("--save-masks", help="write the applied masks here (safetensors)")
    pr.add_argument("--atol", type=float, default=1e-4, help="verification tolerance (default 1e-4)")
    pr.add_argument("--no-verify", action="store_true", help="write without checking against the reference")
    pr.set_defaults(func=cmd_prune)

    c = sub.add_parser("compress", help="prune/apply masks -> reorder -> compact -> block-sparse rewrite -> verify")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--masks", help="masks.safetensors to apply first")
    c.add_argument("--block", default="1x32", help="block for pruning and BSR (default 1x32, or as recorded)")
    c.add_argument("--sparsity", type=_sparsity, default=None, help="prune one-shot first (default: model is already pruned)")
    c.add_argument("--global", dest="global_ranking", action="store_true")
    c.add_argument("--include-heads", action="store_true")
    c.add_argument("--config", help="YAML: per-layer regex -> {block, sparsity}")
    c.add_argument("--plan", help="plan.yaml from `blockprune plan`: per-layer blocks, ratios and forms (one-shot)")
    c.add_argument("--reorder", action=argparse.BooleanOptionalAction, default=True,
                   help="permute FFN neurons and heads to cluster nonzero blocks (default on)")
    c.add_argument("--reorder-block", help="target block of the reorder objective (default: the pruning block)")
    c.add_argument("--form", choices=["auto", "bsr", "compact", "dense"], default="auto")
    c.add_argument("--break-even", type=float, default=None,
                   help="one density at or below which every layer goes block-sparse (default: the measured "
                        "per-shape table shipped for x86-64 AVX2; see `blockprune calibrate`)")
    c.add_argument("--break-even-file", help="measured break-evens from `blockprune calibrate` (overrides --break-even)")
    c.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights (symmetric per output channel) and dynamic uint8 activations, dense and "
                        "block-sparse layers; heads only with --include-heads; verified with a quantization "
                        "tolerance (sentence-vector cosine >= 0.98, relative error <= 0.35)")
    c.add_argument("--atol", type=float, default=1e-4)
    c.add_argument("--no-verify", action="store_true")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="per-layer table: shape, block, density, bytes; compression rate")
    i.add_argument("model")
    i.add_argument("--block", help="count nonzero blocks of this shape (default: as recorded by prune)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    from blockprune.frontends.train_cli import add_train_parser  # train: learn masks on GLUE (torch, lazily)

    add_train_parser(sub)

    from blockprune.backends.tvm.cli import add_backend_parsers  # compile, run, bench (TVM imported lazily)
    from blockprune.backends.tvm.gpu_cli import add_gpu_parsers  # verify; mali/adreno in compile/run/bench

    add_backend_parsers(sub)
    add_gpu_parsers(sub)

    from blockprune.report_cli import add_report_parser  # report: one run rendered to Markdown

    add_report_parser(sub)

    from blockprune.plan.cli import add_plan_parser  # plan: per-layer choices under a latency budget

    add_plan_parser(sub)

    d = sub.add_parser("demo", help="the main job on the bundled MiniLM")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--block", default="16x1")
    d.add_argument("--sparsity", type=_sparsity, default=0.5)
    d.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    d.add_argument("--threads", type=int, default=1, help="threads for both engines in the timing (default 1)")
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch.onnx", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from blockprune.console import print_error

    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except BlockpruneError as exc:
        print_error(exc.problem, exc.fix)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted", None)
        return 130


if __name__ == "__main__":
    sys.exit(main())
