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
from blockprune.masks import MaskSet
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class ApplyMasks(Pass):
    name = "apply-masks"

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks

    def transform(self, ctx: PassContext) -> PassReport:
        if not self.masks.masks:
            raise BlockpruneError("the masks file holds no masks", "regenerate it")
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        by_init = {w.initializer: w for w in weights}
        consts = ctx.constants()
        unknown = sorted(k for k in self.masks.masks if k not in by_init)
        bad_shape, prepared = [], {}
        for key, mask in self.masks.masks.items():
            if key not in by_init:
                continue
            w = by_init[key]
            stored = np.asarray(consts[key].values)
            info = self.masks.layers.get(key)
            m = np.asarray(mask)
            if info is not None and info.layout in ("in_out", "out_in") and info.layout != w.layout:
                m = m.T
            if m.shape != stored.shape:
                bad_shape.append(f"{key}: mask {tuple(np.asarray(mask).shape)} vs weight {tuple(stored.shape)}")
                continue
            prepared[key] = (w, stored, (m != 0))
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
        for key, (w, stored, keep) in prepared.items():
            ctx.replace_values(key, np.where(keep, stored, 0).astype(stored.dtype))
            info = self.masks.layers.get(key)
            layers[key] = {"block": info.block if info else None,
                           "sparsity": 1.0 - float(keep.mean()), "source": self.masks.source}
        record_layers(ctx, layers)
        return PassReport(self.name, matched=len(weights), changed=len(prepared),
                          details={"source": self.masks.source})
