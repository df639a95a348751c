"""ApplyMasks: multiply weights by masks learned elsewhere (the PyTorch frontend, or a saved run).

Masks are keyed by initializer name and stored in the initializer's layout. When the masks file
records a layout (``in_out`` / ``out_in``) different from how this graph stores the weight (for
example a Gemm head from the legacy exporter vs a MatMul from dynamo), the mask is transposed.
Any name that is not a prunable weight here, or any shape that does not fit, is an error that
lists every mismatch: a masks file for another model must never be half-applied.
"""

from __future__ import annotations

import numpy as np

from blockprune.errors import BlockpruneError
from blockprune.masks import LayerMaskInfo, MaskSet
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers


ARCH_PREFIXES = ("bert.", "roberta.", "distilbert.")


def _bare(name: str) -> str:
    """An HF parameter name without the task model's architecture prefix (``bert.`` ...)."""
    for p in ARCH_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def resolve_mask_names(keys: list[str], weights: list, hf_names: dict[str, str] | None = None) -> dict[str, str]:
    """Mask key -> initializer name: exact, else equal modulo the architecture prefix.

    Why: ``blockprune train`` on a ``BertForSequenceClassification`` keys masks by that model's
    names (``bert.encoder.layer.0...``) while an encoder export of the same checkpoint names the
    weight ``encoder.layer.0...`` (and vice versa). A bare name that is ambiguous is left out.
    ``hf_names`` (mask key -> HF name recorded in the masks file) is tried as well.
    """
    by_init = {w.initializer: w for w in weights}
    bare: dict[str, list[str]] = {}
    for w in weights:
        for n in {w.initializer, w.hf_name or w.initializer}:
            bare.setdefault(_bare(n), []).append(w.initializer)
    out = {}
    for key in keys:
        if key in by_init:
            out[key] = key
            continue
        for cand in (key, (hf_names or {}).get(key)):
            hits = sorted(set(bare.get(_bare(cand), []))) if cand else []
            if len(hits) == 1:
                out[key] = hits[0]
                break
    return out


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class ApplyMasks(Pass):
    name = "apply-masks"

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks
        self.applied: MaskSet | None = None  # keyed by this model's initializers, in their layout

    def transform(self, ctx: PassContext) -> PassReport:
        if not self.masks.masks:
            raise BlockpruneError("the masks file holds no masks", "regenerate it")
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        by_init = {w.initializer: w for w in weights}
        consts = ctx.constants()
        names = resolve_mask_names(list(self.masks.masks), weights,
                                   {k: v.hf_name for k, v in self.masks.layers.items() if v.hf_name})
        unknown = sorted(k for k in self.masks.masks if k not in names)
        taken = [n for n in names.values()]
        dup = sorted({n for n in taken if taken.count(n) > 1})
        if dup:
            raise BlockpruneError(f"several masks name the same weight(s) {_listing(dup)} (with and without "
                                  "the architecture prefix)", "keep one mask per weight in the masks file")
        bad_shape, prepared = [], {}
        for mkey, mask in self.masks.masks.items():
            if mkey not in names:
                continue
            key = names[mkey]
            w = by_init[key]
            stored = np.asarray(consts[key].values)
            info = self.masks.layers.get(mkey)
            m = np.asarray(mask)
            if info is not None and info.layout in ("in_out", "out_in") and info.layout != w.layout:
                m = m.T
            if m.shape != stored.shape:
                bad_shape.append(f"{key}: mask {tuple(np.asarray(mask).shape)} vs weight {tuple(stored.shape)}")
                continue
            prepared[key] = (w, stored, (m != 0), self.masks.layers.get(mkey))
        if unknown or bad_shape:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} mask name(s) are not prunable weights of this model: {_listing(unknown)}")
            if bad_shape:
                parts.append(f"{len(bad_shape)} shape mismatch(es): {_listing(bad_shape)}")
            raise BlockpruneError(
                "the masks do not match this model: " + "; ".join(parts),
                "use the masks written for this exact model (same architecture, size and export); "
                "`blockprune inspect MODEL` lists its weight names and shapes",
            )
        layers = {}
        for key, (w, stored, keep, info) in prepared.items():
            ctx.replace_values(key, np.where(keep, stored, 0).astype(stored.dtype))
            layers[key] = {"block": info.block if info else None,
                           "sparsity": 1.0 - float(keep.mean()), "source": self.masks.source}
        record_layers(ctx, layers)
        self.applied = MaskSet({k: keep.astype(np.uint8) for k, (_, _, keep, _) in prepared.items()},
                               source=self.masks.source,
                               layers={k: LayerMaskInfo(v[3].block, v[3].sparsity, v[3].hf_name, v[0].layout)
                                       for k, v in prepared.items() if v[3] is not None},
                               extra=self.masks.extra)
        return PassReport(self.name, matched=len(weights), changed=len(prepared),
                          details={"source": self.masks.source})
