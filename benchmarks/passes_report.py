"""Measure what the ONNX passes buy on the bundled MiniLM (not a test).

    .venv/bin/python benchmarks/passes_report.py [--masks masks.safetensors] [--sparsity 0.8] [--block 1x32]

* empty blocks before/after Reorder for 1x32, 4x4, 16x1 and 32x32 targets, over all 36 Linears;
* file size: dense, pruned (dense storage), compressed (compact + BSR);
* onnxruntime latency, batch 1 x seq 128, median of 20 (after 5 warm-ups), same thread count:
  dense vs pruned vs compacted (``--form compact``) vs compressed (auto).

Masks come from ``--masks`` (the frontend's learned masks) or else one-shot block-L2 pruning.
Writes ``benchmarks/results/passes.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockprune.bench_timing import cpu_name  # noqa: E402
from blockprune.blocks import BlockShape  # noqa: E402
from blockprune.compress_api import compress_model  # noqa: E402
from blockprune.masks import load_masks  # noqa: E402
from blockprune.models.export import export_onnx  # noqa: E402
from blockprune.models.zoo import load_model  # noqa: E402
from blockprune.passes import PruneConfig  # noqa: E402
from blockprune.passes.find_weights import find_weights  # noqa: E402
from blockprune.passes.reorder import Reorder  # noqa: E402
from blockprune.passes.weight_edit import empty_blocks  # noqa: E402
from blockprune.prune_api import prune_model  # noqa: E402
from blockprune.sample_inputs import make_feeds  # noqa: E402


def total_empty(model: onnx.ModelProto, block: BlockShape) -> int:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(empty_blocks(w.to_out_in(inits[w.initializer]), block) for w in find_weights(model))


def latency_ms(path: Path, threads: int, runs: int = 20, warmup: int = 5) -> float:
    """Median onnxruntime latency: process CPU clock with 1 thread (steady on a shared machine), else wall."""
    import onnxruntime as ort

    from blockprune.bench_timing import time_calls

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = make_feeds(onnx.load(str(path), load_external_data=False), 1, 128, seed=0)
    feeds["attention_mask"][:] = 1
    wall, cpu = time_calls(lambda: sess.run(None, feeds), runs, warmup)
    return (cpu if threads == 1 else wall) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masks")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--block", default="1x32")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: process CPU clock)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "passes.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="passes-report-"))

    dense = export_onnx(load_model("minilm"), work / "dense.onnx", exporter="dynamo").model
    if args.masks:
        pruned = prune_model(dense, masks=load_masks(args.masks)).model
        source = f"learned masks {args.masks}"
    else:
        pruned = prune_model(dense, PruneConfig(block=args.block, sparsity=args.sparsity)).model
        source = f"one-shot block-L2 magnitude, {args.block} at {args.sparsity:.0%}"
    onnx.save(pruned, str(work / "pruned.onnx"))

    rows_reorder = []
    for blk in ("1x32", "4x4", "16x1", "32x32"):
        b = BlockShape.parse(blk)
        before = total_empty(pruned, b)
        out, rep = Reorder(blk).run(pruned)
        rows_reorder.append((blk, before, total_empty(out, b), rep.changed))

    compacted = compress_model(pruned, reorder=True, reorder_block=args.block, form="compact").model
    compressed = compress_model(pruned, reorder=True, reorder_block=args.block, form="auto")
    onnx.save(compacted, str(work / "compacted.onnx"))
    onnx.save(compressed.model, str(work / "compressed.onnx"))

    sizes = {k: (work / f"{k}.onnx").stat().st_size for k in ("dense", "pruned", "compacted", "compressed")}
    lat = {k: latency_ms(work / f"{k}.onnx", args.threads) for k in ("dense", "pruned", "compacted", "compressed")}
    compact_info = [st.report.details.get("removed", {}) for st in compressed.stages
                    if st.report is not None and st.report.name == "compact"]
    removed = compact_info[0] if compact_info else {}
    neurons = sum(v.get("neurons_before", 0) - v.get("neurons_after", 0) for v in removed.values())
    heads = sum(v.get("heads_before", 0) - v.get("heads_after", 0) for v in removed.values())

    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        "# ONNX passes on the bundled MiniLM-L6-H384",
        "",
        f"Date {date.today()}, {cpu_name()}, {os.cpu_count()} cores, "
        f"onnxruntime intra-op threads = {args.threads} ({'process CPU' if args.threads == 1 else 'wall'} clock). "
        f"Masks: {source}.",
        f"Command: `.venv/bin/python benchmarks/passes_report.py"
        f"{' --masks ' + args.masks if args.masks else ''} --sparsity {args.sparsity} --block {args.block}`",
        "",
        "## Reorder: all-zero blocks over the 36 Linears",
        "",
        "| target block | empty before | empty after | gain | FFN/heads permuted |",
        "|---|---:|---:|---:|---:|",
        *[f"| {b} | {x} | {y} | {y - x:+d} ({(y - x) / max(x, 1):+.1%}) | {c} |" for b, x, y, c in rows_reorder],
        "",
        "## Size and onnxruntime latency (batch 1, seq 128, median of 20)",
        "",
        "| model | file size | latency ms | vs dense |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {mb(sizes[k])} | {lat[k]:.2f} | {lat['dense'] / lat[k]:.2f}x |"
          for k in ("dense", "pruned", "compacted", "compressed")],
        "",
        f"Compaction removed {neurons} FFN neurons and {heads} heads. "
        f"Compression rate (paper's count) of the compressed model: {compressed.stats.compression_rate:.2f}x.",
        "The compressed model's BSR layers run in onnxruntime through their ONNX-function decomposition "
        "(rebuilt dense at session start), so its onnxruntime latency is the dense one; the speed of BSR "
        "comes from the TVM backend's kernels.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
