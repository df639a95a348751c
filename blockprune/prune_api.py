"""The one-shot prune workflow as a Python API: load -> prune or apply masks -> verify -> write.

Used by `blockprune prune` and by the demo. Verification against the numpy masked-dense reference
happens before anything is written; on failure nothing is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from blockprune.masks import MaskSet, load_masks, save_masks
from blockprune.onnx_io import load_onnx, save_onnx
from blockprune.passes import ApplyMasks, BlockPrune, PassManager, PruneConfig
from blockprune.passes.layer_stats import ModelStats, model_stats
from blockprune.passes.verify import DEFAULT_ATOL, VerifyResult, compare, masked_reference


@dataclass
class PruneResult:
    model: onnx.ModelProto
    masks: MaskSet
    stats: ModelStats
    verify: VerifyResult | None
    output: Path | None


def prune_model(model: onnx.ModelProto, config: PruneConfig | None = None, masks: MaskSet | None = None,
                verify: bool = True, atol: float = DEFAULT_ATOL, progress: bool = False) -> PruneResult:
    """Prune in memory: one-shot by block norm (``config``) or by given ``masks``."""
    if masks is not None:
        p = ApplyMasks(masks)
    else:
        p = BlockPrune(config or PruneConfig())
    out = PassManager([p], show_progress=progress).run(model)
    used = p.applied if masks is not None else p.masks  # applied: renamed to this model's weights
    result = None
    if verify:
        result = compare(out, masked_reference(model, used.masks), atol=atol, what="pruned model")
    return PruneResult(out, used, model_stats(out), result, None)


def prune_file(src: str | Path, dst: str | Path, config: PruneConfig | None = None,
               masks_path: str | Path | None = None, save_masks_to: str | Path | None = None,
               verify: bool = True, atol: float = DEFAULT_ATOL, progress: bool = True) -> PruneResult:
    model = load_onnx(src)
    masks = load_masks(masks_path) if masks_path else None
    res = prune_model(model, config, masks, verify=verify, atol=atol, progress=progress)
    res.output = save_onnx(res.model, dst)
    if save_masks_to:
        save_masks(save_masks_to, res.masks)
    return res
