"""Editing a Linear's weight (and bias) along its output or input axis, whatever its stored layout.

Reorder permutes and Compact shrinks with the same operation: ``take`` the given indices along
the PyTorch ``out`` (rows) or ``in`` (columns) axis. The stored layout (``in_out`` for MatMul,
``out_in`` for Gemm or Transpose-fed weights) is handled here once.
"""

from __future__ import annotations

import numpy as np

from blockprune.errors import BlockpruneError
from blockprune.passes.base import PassContext
from blockprune.passes.patterns import AttentionMatch, FFNMatch, LinearMatch, match_attentions, match_ffns


def current_values(ctx: PassContext, tensor) -> np.ndarray:
    """The constant's values including edits deferred earlier in the same pass."""
    return ctx.pending_values(tensor.name, np.asarray(tensor.values))


def require_float32(lm: LinearMatch) -> None:
    const = lm.node.inputs[1] if lm.weight.via_transpose is None else lm.node.inputs[1].inputs[0].inputs[0]
    if np.dtype(const.dtype) != np.float32:
        raise BlockpruneError(
            f"weight {lm.weight.display_name!r} is {np.dtype(const.dtype).name}; reorder, compaction and "
            "block-sparse rewriting support float32 weights only",
            "export or convert the model in float32 (onnxconverter-common can convert fp16 back), "
            "then quantise after compression",
        )


def _weight_const(lm: LinearMatch):
    b = lm.node.inputs[1]
    return b if lm.weight.via_transpose is None else b.inputs[0].inputs[0]


def exclusive(lm: LinearMatch) -> str | None:
    """Why this Linear's constants cannot be edited alone (shared with another node), or None."""
    w = _weight_const(lm)
    if len(w.outputs) != 1:
        return f"weight {w.name} is shared by {len(w.outputs)} nodes"
    if lm.bias is not None and len(lm.bias.outputs) != 1:
        return f"bias {lm.bias.name} is shared by {len(lm.bias.outputs)} nodes"
    return None


def take(ctx: PassContext, lm: LinearMatch, axis: str, index: np.ndarray) -> None:
    """Keep/permute ``index`` along ``axis`` ("out" = rows of W[out, in], with the bias; "in" = columns)."""
    const = _weight_const(lm)
    stored = current_values(ctx, const)
    oi = lm.weight.to_out_in(stored)
    oi = oi[index, :] if axis == "out" else oi[:, index]
    ctx.replace_values(const.name, np.ascontiguousarray(lm.weight.from_out_in(oi)))
    if axis == "out" and lm.bias is not None:
        ctx.replace_values(lm.bias.name, np.ascontiguousarray(current_values(ctx, lm.bias)[index]))


def zero_slices(ctx: PassContext, lm: LinearMatch, axis: str, index: np.ndarray) -> None:
    """Set rows ("out") or columns ("in") ``index`` of W[out, in] to zero, whatever the stored layout."""
    const = _weight_const(lm)
    oi = lm.weight.to_out_in(current_values(ctx, const)).copy()
    if axis == "out":
        oi[index, :] = 0
    else:
        oi[:, index] = 0
    ctx.replace_values(const.name, np.ascontiguousarray(lm.weight.from_out_in(oi)))


def out_in(ctx: PassContext, lm: LinearMatch) -> np.ndarray:
    return lm.weight.to_out_in(current_values(ctx, _weight_const(lm)))


def empty_blocks(w_out_in: np.ndarray, block) -> int:
    """All-zero blocks (edge blocks included) of a weight for a target block shape."""
    from blockprune.blocks import block_keep_from_mask

    return int((~block_keep_from_mask(w_out_in != 0, block)).sum())


def _editable(matches, parts, kind: str, skipped: dict[str, str]):
    ok = []
    for m in matches:
        why = next(filter(None, (exclusive(x) for x in parts(m))), None)
        if why:
            skipped[f"layer {m.layer} {kind}"] = why
            continue
        for x in parts(m):
            require_float32(x)
        ok.append(m)
    return ok, skipped


def editable_ffns(graph, weights) -> tuple[list[FFNMatch], dict[str, str]]:
    """FFN blocks that are provably free to permute/shrink and whose constants are ours alone."""
    found, skipped = match_ffns(graph, weights)
    return _editable(found, lambda m: (m.ffn_in, m.ffn_out), "ffn", skipped)


def editable_attentions(graph, weights) -> tuple[list[AttentionMatch], dict[str, str]]:
    """Attention blocks whose heads are provably free to permute/remove, constants unshared."""
    found, skipped = match_attentions(graph, weights)
    return _editable(found, lambda m: (m.q, m.k, m.v, m.out), "heads", skipped)
