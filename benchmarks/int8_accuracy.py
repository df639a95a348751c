"""What int8 costs on real sentences: zero-shot STS-B dev Spearman of the bundled MiniLM's
mean-pooled sentence embeddings, fp32 against int8, dense and one-shot block-sparse (issue #15).

Rows, all run in onnxruntime with 1 thread (accuracy only, no timing):
* fp32 dense (``blockprune export minilm``) and onnxruntime's one-line quantizer on it
  (``quantize_dynamic(weight_type=QInt8)``, per channel as ours and per tensor as in issue #15);
* ``blockprune compress --quantize int8`` dense, and at 16x1 50% / 80% one-shot
  (``compress --block 16x1 --sparsity S [--quantize int8]``) next to fp32 at the same sparsity.

For each int8 file two runs: as onnxruntime executes it on this machine, and with its integer
matmuls made exact (``blockprune.passes.int8_reference``): onnxruntime's AVX2 u8s8 kernel
saturates pairs of products in int16, the contract (and the TVM kernels) do not. Also reported:
the mean and lowest cosine of each model's sentence embeddings to those of its fp32 model.

Usage: python benchmarks/int8_accuracy.py [--work /tmp/bp-int8-acc] [--exporter dynamo] [--limit N]
Output: benchmarks/results/int8_accuracy.{json,md} (GLUE data is read from ../shared, never copied)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(path: Path, features: list[dict], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised ``last_hidden_state`` (sentence-transformers pooling), in
    onnxruntime; batches sorted by length so padding is small (padding is masked anyway)."""
    sess = _session(path)
    wanted = {i.name for i in sess.get_inputs()}
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    out = np.empty((len(features), 0), np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        longest = max(len(features[i]["input_ids"]) for i in idx)
        feeds = {}
        for key in wanted:
            rows = [list(features[i][key]) + [0] * (longest - len(features[i][key])) for i in idx]
            feeds[key] = np.asarray(rows, dtype=np.int64)
        hidden = sess.run(None, feeds)[0]
        m = feeds["attention_mask"][..., None].astype(np.float32)
        e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        e /= np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        if out.shape[1] == 0:
            out = np.empty((len(features), e.shape[1]), np.float32)
        out[idx] = e
    return out


def build_models(work: Path, exporter: str, ratios: list[float], block: str) -> dict[str, dict]:
    """Every model of the table (skipped when already built), with the command that made it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import blockprune as bp
    from blockprune.passes.int8_reference import exact_int8_model

    work.mkdir(parents=True, exist_ok=True)
    dense = work / f"minilm-{exporter}.onnx"
    models: dict[str, dict] = {}
    if not dense.exists():
        bp.export("minilm", dense, exporter=exporter)
    models["fp32 dense"] = {"path": dense, "ref": "fp32 dense", "sparsity": 0.0, "kind": "fp32",
                            "command": f"blockprune export minilm -o minilm.onnx --exporter {exporter}"}
    for per_channel in (True, False):  # per tensor: the one-liner of issue #15 (per_channel defaults to False)
        ort_q = work / f"minilm-ort-int8{'' if per_channel else '-per-tensor'}.onnx"
        if not ort_q.exists():
            quantize_dynamic(str(dense), str(ort_q), per_channel=per_channel, weight_type=QuantType.QInt8)
        models[f"onnxruntime quantize_dynamic int8{'' if per_channel else ' per tensor'}"] = {
            "path": ort_q, "ref": "fp32 dense", "sparsity": 0.0, "kind": "int8 (onnxruntime)",
            "command": f"onnxruntime.quantization.quantize_dynamic(minilm.onnx, out, per_channel={per_channel}, "
                       "weight_type=QuantType.QInt8)"}
    specs = [(0.0, True)] + [(r, q) for r in ratios for q in (False, True)]
    for ratio, quant in specs:
        tag = "dense" if ratio == 0 else f"{block} {int(round(ratio * 100))}%"
        name = f"{'int8' if quant else 'fp32'} {tag}"
        path = work / f"minilm-{tag.replace(' ', '-').replace('%', '')}-{'int8' if quant else 'fp32'}.onnx"
        cmd = "blockprune compress minilm.onnx -o out.onnx" + (
            f" --block {block} --sparsity {ratio:g}" if ratio else "") + (" --quantize int8" if quant else "")
        if not path.exists():
            bp.compress(dense, path, sparsity=ratio or None, block=block, quantize="int8" if quant else None)
        models[name] = {"path": path, "ref": "fp32 dense" if ratio == 0 else f"fp32 {tag}", "sparsity": ratio,
                        "kind": "int8 (blockprune)" if quant else "fp32", "command": cmd}
    ordered: dict[str, dict] = {}
    for name, m in models.items():  # each int8 file followed by its exact-arithmetic twin
        ordered[name] = m
        if m["kind"].startswith("int8"):
            exact = m["path"].with_name(m["path"].stem + "-exact.onnx")
            if not exact.exists():
                onnx.save(exact_int8_model(onnx.load(str(m["path"]))), str(exact))
            ordered[name + ", exact integer arithmetic"] = {**m, "path": exact, "exact": True}
    return ordered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bp-int8-accuracy"))
    ap.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    ap.add_argument("--glue", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    ap.add_argument("--block", default="16x1")
    ap.add_argument("--ratios", default="0.5,0.8")
    ap.add_argument("--limit", type=int, default=None, help="first N dev pairs only (smoke runs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_accuracy")
    args = ap.parse_args(argv)

    import onnxruntime

    from blockprune.bench_timing import cpu_name
    from blockprune.frontends import embedding as E
    from blockprune.frontends.metrics import spearman
    from blockprune.models.zoo import load_model

    t0 = time.perf_counter()
    pairs = E.read_sts_dev(args.glue / "STS-B", limit=args.limit)
    tok = load_model("minilm", head="encoder").tokenizer()
    fa, fb = (E._Texts(t, tok, 128).features for t in (pairs.a, pairs.b))
    models = build_models(args.work, args.exporter, [float(r) for r in args.ratios.split(",") if r], args.block)
    emb, rows = {}, []
    for name, m in models.items():
        ea, eb = embed(m["path"], fa), embed(m["path"], fb)
        emb[name] = (ea, eb)
        rows.append({"model": name, "kind": m["kind"], "sparsity": m["sparsity"], "exact": bool(m.get("exact")),
                     "spearman": float(spearman((ea * eb).sum(-1), pairs.gold)), "reference": m["ref"],
                     "command": m["command"]})
        print(f"{name}: {rows[-1]['spearman']:.4f}", flush=True)
    for r in rows:
        ra, rb = emb[r["reference"]]
        ea, eb = emb[r["model"]]
        cos = np.concatenate([(ea * ra).sum(-1), (eb * rb).sum(-1)])
        r["cosine_to_reference_mean"], r["cosine_to_reference_min"] = float(cos.mean()), float(cos.min())
        base = next(x for x in rows if x["model"] == r["reference"])
        r["delta_vs_reference_points"] = 100 * (r["spearman"] - base["spearman"])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(),
            "onnxruntime": onnxruntime.__version__, "threads": 1, "exporter": args.exporter,
            "pairs": len(pairs.gold), "seconds": time.perf_counter() - t0,
            "command": "python benchmarks/int8_accuracy.py" + _options(args)}
    write_results(args.out, meta, rows)
    return 0


def _options(args: argparse.Namespace) -> str:
    """The options that change the table, as given (not --work: where the models are cached)."""
    out = [f"--exporter {args.exporter}"] if args.exporter != "dynamo" else []
    out += [f"--ratios '{args.ratios}'"] if args.ratios != "0.5,0.8" else []
    out += [f"--block {args.block}"] if args.block != "16x1" else []
    out += [f"--limit {args.limit}"] if args.limit else []
    out += [f"--out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"] \
        if args.out != RESULTS / "int8_accuracy" else []
    return "".join(" " + o for o in out)


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    md = ["## int8 x blocks: zero-shot STS-B dev Spearman, bundled MiniLM (issue #15)", "",
          f"Measured {meta['date']}; onnxruntime {meta['onnxruntime']}, 1 thread, {meta['exporter']} export; "
          f"{meta['pairs']} dev pairs, mean-pooled `last_hidden_state`, cosine -> Spearman (x100). "
          "Cosine columns: each sentence's embedding against its fp32 model's (dense or same sparsity). "
          "\"exact\": the same file with its integer matmuls computed exactly "
          "(`blockprune/passes/int8_reference.py`), as the contract and the TVM kernels define them; "
          "the plain rows are onnxruntime's run on this machine (AVX2 without VNNI: int16-saturating u8s8 "
          "kernel). One-shot block-L2 pruning, no retraining.", "",
          "| model | Spearman | vs fp32 at same sparsity | cosine to fp32 (mean / min) |", "|---|---:|---:|---|"]
    for r in rows:
        delta = "-" if r["model"] == r["reference"] else f"{r['delta_vs_reference_points']:+.2f}"
        cos = "-" if r["model"] == r["reference"] else \
            f"{r['cosine_to_reference_mean']:.4f} / {r['cosine_to_reference_min']:.4f}"
        md.append(f"| {r['model']} | {100 * r['spearman']:.2f} | {delta} | {cos} |")
    md += ["", "Commands (the Python API runs the same code): " + "; ".join(
        dict.fromkeys(f"`{r['command']}`" for r in rows)), "",
        f"Reproduce: `{meta['command']}` ({meta['seconds'] / 60:.1f} min here).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"meta": meta, "rows": rows}, indent=2)), (".md", "\n".join(md))):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
