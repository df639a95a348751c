"""Repairs of well-known, harmless defects in models written by other tools (applied on load).

Why: onnxruntime's transformer optimizer writes ``LayerNormalization`` in the default domain into
models that import opset < 17, where that op does not exist yet; onnxruntime runs them (it
registers the kernel for older opsets) but ``onnx.checker`` rejects them, so such a model could
not even be inspected. Raising the default-domain opset to 17 makes it valid: between opsets 13
and 17 the operators of an encoder only gained types or optional attributes (``Shape``'s
``start``/``end``), so the meaning of every other node is unchanged.
"""

from __future__ import annotations

import onnx

LAYERNORM_OPSET = 17
SAFE_FROM = 13  # below this, Split/Reduce*/Squeeze changed signatures: do not touch such models


def raise_opset_for_layernorm(model: onnx.ModelProto) -> bool:
    """Bump the default opset to 17 when a default-domain LayerNormalization needs it; True if done."""
    if not any(n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return False
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and SAFE_FROM <= o.version < LAYERNORM_OPSET:
            o.version = LAYERNORM_OPSET
            return True
    return False
