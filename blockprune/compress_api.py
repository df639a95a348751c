"""The compression workflow: prune or apply masks -> reorder -> compact -> policy -> rewrite
[-> quantize] -> verify.

Each stage is verified in onnxruntime before the next one runs: pruning against the numpy
masked-dense reference, every later (exact) stage against the pruned model, and the optional
int8 quantization against it too, with the tolerance stated for quantization
(``passes/quant_verify.py``). Nothing is written unless all pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from blockprune.blocks import BlockShape
from blockprune.masks import MaskSet, load_masks
from blockprune.onnx_io import load_onnx, save_onnx
from blockprune.passes import PruneConfig
from blockprune.passes.base import Pass, PassReport
from blockprune.passes.block_sparse import BlockSparseRewrite, uses_block_sparse
from blockprune.passes.compact import Compact
from blockprune.passes.constant_nodes import ConstantNodesToInitializers
from blockprune.passes.detect_blocks import DetectBlocks
from blockprune.passes.dtype_check import require_float32_weights
from blockprune.passes.layer_stats import ModelStats, model_stats
from blockprune.passes.policy import Policy
from blockprune.passes.quant_verify import compare_quantized
from blockprune.passes.quantize import QuantizeInt8, refuse_quantized
from blockprune.passes.reorder import Reorder
from blockprune.passes.verify import DEFAULT_ATOL, compare
from blockprune.prune_api import prune_model


@dataclass
class StageResult:
    name: str
    report: PassReport | None
    max_abs_diff: float | None
    seconds: float
    quality: dict[str, float] | None = None  # quantized stages: sentence cosine and relative error


@dataclass
class CompressResult:
    model: onnx.ModelProto
    stats: ModelStats
    stages: list[StageResult] = field(default_factory=list)
    output: Path | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None


def compress_model(model: onnx.ModelProto, prune: PruneConfig | None = None, masks: MaskSet | None = None,
                   reorder: bool = True, reorder_block: str | BlockShape | None = None, form: str = "auto",
                   break_even: "float | object | None" = None, verify: bool = True, atol: float = DEFAULT_ATOL,
                   progress: bool = False, quantize: str | None = None,
                   quantize_heads: bool | None = None) -> CompressResult:
    """Prune or apply masks, then reorder -> compact -> policy -> block-sparse rewrite, verified.

    ``break_even``: a density, a measured table (``BreakEvenTable``), or None for the table
    shipped with blockprune for this host's vector unit (AVX2 or AVX-512; :func:`default_break_even_table`).
    ``quantize="int8"`` ends with :class:`QuantizeInt8` (dense, compacted and block-sparse layers);
    ``quantize_heads`` (default: the pruning config's ``include_heads``) also quantizes the heads.
    """
    from blockprune.errors import BlockpruneError
    from tqdm.auto import tqdm

    if break_even is None:
        from blockprune.backends.tvm.cost.calibrate import default_break_even_table

        break_even = default_break_even_table()

    if quantize not in QUANTIZE_SCHEMES:
        raise BlockpruneError(f"unknown quantization {quantize!r}",
                              "use --quantize int8, or leave it out to keep float32")
    refuse_quantized(model)
    require_float32_weights(model, "compress")
    if uses_block_sparse(model):
        raise BlockpruneError("the model already contains block-sparse (ai.blockprune) layers",
                              "compress the dense or pruned model it came from")
    stages: list[StageResult] = []
    t = time.perf_counter()
    if prune is not None or masks is not None:
        pr = prune_model(model, prune, masks, verify=verify, atol=atol)
        model = pr.model
        stages.append(StageResult("prune" if masks is None else "apply-masks", None,
                                  pr.verify.max_abs_diff if pr.verify else None, time.perf_counter() - t))
    reference = model
    t = time.perf_counter()
    model, _ = ConstantNodesToInitializers().run(model)  # plain legacy exports: scalars in Constant nodes
    if prune is None and masks is None:  # pruned elsewhere (or by us): the zeros reveal unrecorded blocks
        model, det = DetectBlocks().run(model)
        stages.append(StageResult("detect-blocks", det, None, time.perf_counter() - t))
    block = BlockShape.parse(reorder_block) if reorder_block else (
        prune.block if prune is not None else _recorded_block(model))
    passes: list[Pass] = []
    if reorder:
        passes.append(Reorder(block or "1x32"))
    if form in ("auto", "compact"):
        passes.append(Compact())
    passes.append(Policy(form=form, break_even=break_even, block=block))
    if form in ("auto", "bsr"):
        passes.append(BlockSparseRewrite(block=block))
    for p in tqdm(passes, desc="compress", unit="pass", disable=not progress, leave=False):
        t = time.perf_counter()
        model, report = p.run(model)
        diff = None
        if verify and p.name != "policy":
            diff = compare(model, reference, atol=atol, what=f"model after {p.name}").max_abs_diff
        stages.append(StageResult(p.name, report, diff, time.perf_counter() - t))
    if quantize == "int8":
        heads = quantize_heads if quantize_heads is not None else bool(prune is not None and prune.include_heads)
        model, stage = _quantize_stage(model, reference, heads, verify)
        stages.append(stage)
    return CompressResult(model, model_stats(model), stages)


QUANTIZE_SCHEMES = (None, "int8")


def _quantize_stage(model: onnx.ModelProto, reference: onnx.ModelProto, include_heads: bool,
                    verify: bool) -> tuple[onnx.ModelProto, StageResult]:
    """QuantizeInt8, verified against the float32 model with the quantization tolerance, and the
    verification recorded in the model's ``blockprune.quantization`` metadata."""
    from blockprune.onnx_io import get_meta, set_meta

    t = time.perf_counter()
    model, report = QuantizeInt8(include_heads=include_heads).run(model)
    quality = None
    if verify:
        quality = compare_quantized(model, reference, what="model after quantize-int8").as_dict()
        set_meta(model, "quantization", {**get_meta(model, "quantization", {}), "verified": quality})
    return model, StageResult(report.name, report, None, time.perf_counter() - t, quality)


def _recorded_block(model: onnx.ModelProto) -> BlockShape | None:
    from blockprune.onnx_io import get_meta

    blocks = {v.get("block") for v in (get_meta(model, "layers", {}) or {}).values() if v.get("block")}
    return BlockShape.parse(blocks.pop()) if len(blocks) == 1 else None


def compress_file(src: str | Path, dst: str | Path, prune: PruneConfig | None = None,
                  masks_path: str | Path | None = None, **kw) -> CompressResult:
    model = load_onnx(src)
    masks = load_masks(masks_path) if masks_path else None
    res = compress_model(model, prune, masks, **kw)
    res.output = save_onnx(res.model, dst)
    res.input_bytes = Path(src).stat().st_size
    res.output_bytes = res.output.stat().st_size
    return res
