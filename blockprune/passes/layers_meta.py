"""Per-layer facts recorded in model metadata (``blockprune.layers``), merged across passes.

Why metadata: ``blockprune inspect`` and the backends must know, from the model file alone, which
block shape each layer was pruned with and by whom, and later which form (dense, compacted,
block-sparse) it got and why.
"""

from __future__ import annotations

from typing import Any

from blockprune.passes.base import PassContext


def record_layers(ctx: PassContext, updates: dict[str, dict[str, Any]]) -> None:
    layers = dict(ctx.meta("layers", {}) or {})
    for name, info in updates.items():
        layers[name] = {**layers.get(name, {}), **info}
    ctx.set_meta("layers", layers)
