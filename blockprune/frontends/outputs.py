"""What a finished run writes: the pruned checkpoint, the ONNX export, ``masks.safetensors``
keyed by ONNX initializer names, compression statistics and the report's summary table.

Why shared: the GLUE recipe and the task-agnostic embedding mode must produce the same
artefacts, checked the same way (masked entries exactly zero in PyTorch and in every exported
initializer), so that ``blockprune prune/compress`` treat their outputs alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.grouping import group_norms
from blockprune.frontends.hard_prune import LayerMask
from blockprune.frontends.masked import verify_masked
from blockprune.frontends.run_state import _save_pretrained_atomic
from blockprune.frontends.stages import set_attention


@torch.no_grad()
def snapshot_group_norms(model: torch.nn.Module, layers: dict[str, BlockShape]) -> dict[str, torch.Tensor]:
    """Plain L2 norm of every group of every selected layer (CPU float32, shape = block grid)."""
    params = dict(model.named_parameters())
    return {n: group_norms(params[n].detach().float().cpu(), b).contiguous() for n, b in layers.items()}


def norm_split(norms: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean group norm of the groups that are (will be) pruned vs kept, and their ratio."""
    pruned = torch.cat([norms[n][~keep[n]].reshape(-1) for n in keep]) if keep else torch.zeros(0)
    kept = torch.cat([norms[n][keep[n]].reshape(-1) for n in keep]) if keep else torch.zeros(0)
    mp = float(pruned.mean()) if pruned.numel() else float("nan")
    mk = float(kept.mean()) if kept.numel() else float("nan")
    return {"pruned_mean_norm": mp, "kept_mean_norm": mk,
            "ratio": mp / mk if kept.numel() and mk > 0 and pruned.numel() else float("nan")}


def build_maskset(onnx_model: Any, masks: dict[str, LayerMask], source: str, extra: dict[str, Any]):
    """A ``MaskSet`` keyed by the exported model's initializer names, in each one's layout.

    The exporter renamed initializers to HF parameter names and recorded the layout in
    ``param_map``; a pruned parameter missing there (e.g. two parameters with identical values,
    which the exporter refuses to guess between) is an error: masks that silently skip a layer
    would make the ONNX model denser than the PyTorch one.
    """
    from blockprune.masks import LayerMaskInfo, MaskSet
    from blockprune.onnx_io import get_meta

    param_map = get_meta(onnx_model, "param_map", {}) or {}
    inits = {t.name for t in onnx_model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    info: dict[str, LayerMaskInfo] = {}
    missing = []
    for name, lm in masks.items():
        entry = param_map.get(name)
        if entry is None or name not in inits:
            missing.append(name)
            continue
        layout = entry.get("layout", "out_in")
        m = lm.mask.numpy().astype(np.uint8)
        if layout == "in_out":
            m = np.ascontiguousarray(m.T)
        out[name] = m
        info[name] = LayerMaskInfo(block=str(lm.block), sparsity=lm.sparsity, hf_name=name, layout=layout)
    if missing:
        raise BlockpruneError(
            f"{len(missing)} pruned weight(s) have no initializer in the exported model: {', '.join(missing[:5])}",
            "export with the other exporter (exporter='legacy'|'dynamo'); report this if it persists",
        )
    return MaskSet(masks=out, source=source, layers=info, extra=extra)


def check_onnx_zeros(onnx_model: Any, maskset: Any) -> None:
    """Every masked entry of the exported initializers is exactly 0 (keys and layouts agree)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx_model.graph.initializer}
    bad = [k for k, m in maskset.masks.items() if np.any(numpy_helper.to_array(inits[k])[m == 0] != 0)]
    if bad:
        raise BlockpruneError(f"exported weights are nonzero under their masks: {', '.join(bad[:5])}",
                              "this is a bug in the mask layout handling; please report it")


def compression_stats(model: torch.nn.Module, unused: Sequence[str] = ()) -> dict[str, Any]:
    """The paper's count: every 2-D weight except embeddings (encoder Linears, pooler,
    classifier), CR = total / nonzero; biases are not counted.

    ``unused``: name fragments of weights the deployed graph does not contain (the pooler of a
    sentence-embedding model, whose ONNX outputs only the token states); counting them would add
    dense weights that nobody ships and understate the rate."""
    layers, total, nonzero = {}, 0, 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or any(u in name for u in unused):
            continue
        nz = int(torch.count_nonzero(p.detach()))
        layers[name] = {"shape": list(p.shape), "density": nz / p.numel(), "nonzero": nz, "total": p.numel()}
        total += p.numel()
        nonzero += nz
    return {"layers": layers, "total": total, "nonzero": nonzero,
            "compression_rate": total / nonzero if nonzero else float("inf"),
            "density": nonzero / max(total, 1)}




@dataclass
class ExportedOutputs:
    model_dir: Path
    onnx_path: Path
    masks_path: Path
    max_abs_diff: Any
    masked_entries_checked: int
    seconds: float


def export_outputs(loaded: Any, tokenizer: Any, masks: dict[str, LayerMask], out: Path, exporter: str,
                   source: str, extra: dict[str, Any]) -> ExportedOutputs:
    """Save ``out/model`` (HF checkpoint), ``out/model.onnx`` (eager attention: both exporters
    and TVM want plain MatMul/Softmax) and ``out/masks.safetensors`` (``extra`` in its metadata),
    after checking that every masked entry is exactly 0.0 in PyTorch and in ONNX."""
    from blockprune.masks import save_masks
    from blockprune.models.export import export_onnx

    model = loaded.model.cpu().eval()
    set_attention(model, "eager")
    checked = verify_masked(model, {n: m.mask for n, m in masks.items()})  # raises if any entry is not 0.0
    t0 = time.perf_counter()
    model_dir = out / "model"
    _save_pretrained_atomic(model, tokenizer, model_dir)
    exported = export_onnx(loaded, out / "model.onnx", exporter=exporter)
    maskset = build_maskset(exported.model, masks, source, extra=extra)
    check_onnx_zeros(exported.model, maskset)
    masks_path = save_masks(out / "masks.safetensors", maskset)
    return ExportedOutputs(model_dir, exported.path, masks_path, exported.max_abs_diff, checked,
                           time.perf_counter() - t0)


def pruned_layers_sparsity(masks: dict[str, LayerMask]) -> float:
    total = sum(m.mask.numel() for m in masks.values())
    kept = sum(int(m.mask.sum()) for m in masks.values())
    return 1.0 - kept / max(total, 1)


def _print_summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    from blockprune.console import console, kv_table

    t = Table(title=f"{report['task']} {report['method']}: per stage (dev {report['metric']})", title_justify="left")
    for col in ("stage", "epochs", "dev metric", "train loss", "dev loss", "norm pruned", "norm kept",
                "pruned/kept", "time"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in report["stages"]:
        t.add_row(r["stage"], str(r["epochs"]), f"{r['metric']:.4f}", _fmt(r["train_loss"]), _fmt(r["dev_loss"]),
                  _fmt(r["pruned_mean_norm"]), _fmt(r["kept_mean_norm"]), _fmt(r["ratio"]),
                  f"{r['seconds'] or 0:.0f}s")
    console.print(t)
    console.print(kv_table("result", [
        ("dense -> pruned", f"{report['dense_metric']:.4f} -> {report['pruned_metric']:.4f} ({report['metric']})"),
        ("sparsity of pruned layers", f"{report['pruned_layers_sparsity']:.3f} ({_blocks_used(report)} blocks, "
                                      f"{report['prune_mode']} mode)"),
        ("compression rate (paper's count)", f"{report['compression_rate']:.2f}x"),
        ("masked entries verified 0.0", str(report["masked_entries_verified_zero"])),
        ("outputs", ", ".join(report["outputs"].values())),
    ]))


def _blocks_used(report: dict) -> str:
    """The block shapes the pruned layers really have (a plan mixes them; ``report['block']`` is
    then only the config's unused default)."""
    used = sorted({v["block"] for v in (report.get("layers") or {}).values() if v.get("pruned") and v.get("block")})
    return ", ".join(used) if used else str(report["block"])


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}"
