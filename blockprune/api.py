"""The toolchain as Python functions: ``export -> prune -> compress -> compile -> run / bench``.

Why a module of its own: build systems and notebooks drive blockprune without a shell, and need
result objects rather than printed tables. Each function is the same code path as its CLI
command (the CLI formats these results), raises one ``BlockpruneError`` with a fix on bad
input, and writes its output atomically (temporary file or directory, then rename). Heavy
dependencies (torch, TVM) are imported inside the functions, so ``import blockprune`` stays light.

    import blockprune as bp
    bp.export("bert-tiny", "model.onnx")
    bp.prune("model.onnx", "pruned.onnx", block="1x32", sparsity=0.5)
    bp.compress("pruned.onnx", "small.onnx")
    art = bp.compile("small.onnx", "out/x86", target="x86-64", seq=128)   # verified vs onnxruntime
    out = bp.run("out/x86", compare="small.onnx")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover - types only
    import numpy as np

    from blockprune.backends.tvm.runtime.artifact import Manifest
    from blockprune.compress_api import CompressResult
    from blockprune.models.export import ExportResult
    from blockprune.prune_api import PruneResult



def export(model: str, output: str | os.PathLike, exporter: str = "dynamo", head: str | None = None,
           num_labels: int | None = None, opset: int | None = None, seed: int = 0, check: bool = True,
           atol: float = 1e-4) -> "ExportResult":
    """Export ``model`` (``minilm``, a named config, or a local HF directory) to verified ONNX.

    ``head=None`` keeps a local checkpoint's own head (``config.architectures``, e.g. a
    ``BertForSequenceClassification`` trained by ``blockprune train``), else the encoder.
    """
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model

    loaded = load_model(model, head=head, num_labels=num_labels, seed=seed)
    return export_onnx(loaded, output, exporter=exporter, opset=opset, check=check, atol=atol)


def prune(model: str | os.PathLike, output: str | os.PathLike, block: str = "1x32", sparsity: float = 0.5,
          global_ranking: bool = False, include_heads: bool = False, config: str | os.PathLike | None = None,
          masks: str | os.PathLike | None = None, save_masks: str | os.PathLike | None = None,
          verify: bool = True, atol: float = 1e-4) -> "PruneResult":
    """One-shot block pruning (or apply ``masks``), verified against the numpy masked reference."""
    from blockprune.passes import PruneConfig
    from blockprune.prune_api import prune_file

    cfg = None
    if masks is None:
        cfg = PruneConfig(block=block, sparsity=sparsity, global_ranking=global_ranking, include_heads=include_heads)
        if config is not None:
            cfg = PruneConfig.from_yaml(config, defaults=cfg)
    return prune_file(model, output, config=cfg, masks_path=masks, save_masks_to=save_masks, verify=verify,
                      atol=atol, progress=False)


def compress(model: str | os.PathLike, output: str | os.PathLike, sparsity: float | None = None,
             block: str = "1x32", masks: str | os.PathLike | None = None, reorder: bool = True,
             form: str = "auto", break_even: "float | None" = None, include_heads: bool = False,
             verify: bool = True, atol: float = 1e-4, quantize: str | None = None) -> "CompressResult":
    """Reorder -> compact -> policy -> block-sparse rewrite [-> int8], each stage verified.

    ``sparsity`` prunes one-shot first; without it (and without ``masks``) the model is taken as
    already pruned, and the block shape is read from its metadata or detected from its zeros.
    ``break_even`` None uses the measured per-shape table shipped for x86-64 AVX2.
    ``quantize="int8"``: int8 weights (per output channel) and dynamic uint8 activations for
    dense and block-sparse layers alike, heads only with ``include_heads``; verified against the
    float32 model with the quantization tolerance (sentence-vector cosine, relative error).
    """
    from blockprune.compress_api import compress_file
    from blockprune.passes import PruneConfig

    cfg = PruneConfig(block=block, sparsity=sparsity, include_heads=include_heads) \
        if (sparsity is not None and masks is None) else None
    return compress_file(model, output, prune=cfg, masks_path=masks, reorder=reorder, form=form,
                         break_even=break_even, verify=verify, atol=atol, progress=False, quantize=quantize,
                         quantize_heads=include_heads)


@dataclass
class CompiledArtifact:
    """A compiled artifact directory and what its manifest says (incl. the verification)."""

    directory: Path
    manifest: "Manifest"

    @property
    def verified(self) -> dict[str, Any] | None:
        return self.manifest.verified


def compile(model: str | os.PathLike, output: str | os.PathLike, target: Any = "x86-64",  # noqa: A001
            batch: int = 1, seq: int = 128, verify: bool = True, atol: float = 1e-4,
            bsr_below: float | None = None, bsr_block: str | None = None,
            cross_compiler: str | None = None) -> CompiledArtifact:
    """Compile with TVM into ``output`` (``model.so`` + ``manifest.json``), verified against
    onnxruntime on ``model`` before the directory appears (aarch64 under qemu)."""
    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.onnx_import.compile_checks import static_dim

    res = compile_model(model, output, target=target, batch=static_dim(batch, "batch"),
                        seq=static_dim(seq, "seq"), lower_dense_below=bsr_below, dense_block=bsr_block,
                        cross_compiler=cross_compiler, verify=verify, atol=atol)
    return CompiledArtifact(res.directory, res.manifest)


@dataclass
class RunOutput:
    """Outputs of one run, how it ran, and (with ``compare``) max |TVM - onnxruntime| per output."""

    outputs: dict[str, "np.ndarray"]
    seconds: float
    how: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)


def run(artifact: str | os.PathLike, inputs: "Mapping[str, np.ndarray] | str | os.PathLike | None" = None,
        compare: str | os.PathLike | None = None, target: Any = None) -> RunOutput:
    """Run a compiled artifact once (random valid inputs by default); ``compare``: an ONNX model."""
    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact

    res = run_artifact(artifact, inputs, expect_target=target, model=compare)
    diffs = compare_with_onnx(res, compare) if compare is not None else {}
    return RunOutput(res.outputs, res.seconds, res.how, diffs)


def bench(artifact: str | os.PathLike, number: int = 10, repeat: int = 5,
          rpc: str | None = None) -> list[float]:
    """Seconds per call: here (native artifacts) or on a board's TVM RPC server (``HOST:PORT``)."""
    if rpc:
        from blockprune.backends.tvm.cli import _parse_rpc
        from blockprune.backends.tvm.runtime.rpc import bench_rpc

        host, port = _parse_rpc(rpc)
        return list(bench_rpc(artifact, host, port, number=number, repeat=repeat))
    from blockprune.backends.tvm.runtime.runner import bench_artifact

    return bench_artifact(artifact, number=number, repeat=repeat)
