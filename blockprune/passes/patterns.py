"""Matchers for the encoder sub-graphs whose permutations and shrinking are free at run time.

In the spirit of onnxruntime's ``fusion_*`` matchers: each matcher either returns a small record
of the nodes and constants it proved are there, or a *reason* (a string) saying why not, which
the passes report instead of guessing.

* ``LinearMatch``: MatMul/Gemm with a constant weight, optionally followed by ``Add(bias)`` with a
  1-D constant of the output width.
* ``FFNMatch``: ffn_in Linear (+bias) -> elementwise activation chain (nodes that take only the
  intermediate tensor and scalar constants, e.g. the Div/Erf/Add/Mul/Mul of exact GELU) ->
  ffn_out MatMul, with the intermediate tensor consumed by nothing else. Permuting or removing
  intermediate neurons is then free.
* ``AttentionMatch``: q/k/v Linears (+bias) -> Reshape whose shape ends in ``[-1, head_dim]``
  (the head count is inferred, so removing heads needs no constant edits), and the attention
  output Linear fed by a Reshape ending in ``-1``. Permuting or removing heads is then free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from blockprune.passes.find_weights import LinearWeight

ELEMENTWISE = {"Div", "Mul", "Add", "Sub", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Pow", "Sqrt",
               "FastGelu", "BiasGelu", "Identity", "Cast", "Neg", "Exp", "HardSigmoid", "Softplus"}


@dataclass
class LinearMatch:
    weight: LinearWeight
    node: Any  # the MatMul/Gemm gs.Node
    bias: Any | None  # gs.Constant of shape [out], or None
    bias_add: Any | None  # the Add gs.Node
    output: Any  # tensor after the bias (or the MatMul output)


@dataclass
class FFNMatch:
    layer: int
    ffn_in: LinearMatch
    ffn_out: LinearMatch
    act_input: Any  # tensor entering the activation chain
    act_output: Any  # tensor entering ffn_out
    act_nodes: list[Any]
    out_bias: Any | None  # ffn_out's bias constant, where the constant activation of a dead neuron folds


@dataclass
class AttentionMatch:
    layer: int
    q: LinearMatch
    k: LinearMatch
    v: LinearMatch
    out: LinearMatch
    head_dim: int
    num_heads: int


def _const(t: Any) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def _const_values(t: Any) -> np.ndarray | None:
    """Values of a constant tensor: an initializer, or the output of a ``Constant`` node (plain
    legacy exports keep their scalars and shape pieces in Constant nodes)."""
    if _const(t):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
        v = t.inputs[0].attrs["value"]
        return np.asarray(v.values if hasattr(v, "values") else v)
    return None


def _shape_tail(shape_tensor: Any) -> list[int] | None:
    """Known trailing entries of a Reshape's shape input: a constant, or a Concat of pieces."""
    whole = _const_values(shape_tensor)
    if whole is not None:
        return [int(v) for v in whole.ravel()]
    if len(shape_tensor.inputs) != 1 or shape_tensor.inputs[0].op != "Concat":
        return None
    tail: list[int] = []
    for piece in shape_tensor.inputs[0].inputs:
        values = _const_values(piece)
        if values is not None:
            tail.extend(int(v) for v in values.ravel())
        else:
            tail = []  # a computed piece: only what follows the last one is known
    return tail


def match_linear(w: LinearWeight, nodes_by_name: dict[str, Any]) -> LinearMatch:
    node = nodes_by_name[w.node]
    out = node.outputs[0]
    bias = add = None
    if node.op == "Gemm" and len(node.inputs) > 2 and _const(node.inputs[2]):
        bias = node.inputs[2]
    elif len(out.outputs) == 1 and out.outputs[0].op == "Add":
        cand = out.outputs[0]
        other = [t for t in cand.inputs if t is not out]
        if len(other) == 1 and _const(other[0]) and tuple(other[0].shape) == (w.shape[0],):
            bias, add, out = other[0], cand, cand.outputs[0]
    return LinearMatch(w, node, bias, add, out)


def _layers(weights: list[LinearWeight]) -> dict[int, dict[str, LinearWeight]]:
    layers: dict[int, dict[str, LinearWeight]] = {}
    for w in weights:
        if w.role is not None and w.layer is not None:
            layers.setdefault(w.layer, {})[w.role] = w
    return layers


def _elementwise_region(start: Any, end: Any, graph_outputs: set[int] = frozenset()) -> tuple[list[Any], str | None]:
    """Nodes between two tensors, if they form a closed elementwise region (else a reason).

    Closed: every node is elementwise with scalar constants; every non-constant input is ``start``
    or made inside the region; nothing made inside (but ``end``) is used outside; ``start`` is
    used only inside; ``end`` is used only by the ffn_out MatMul.
    """
    region: dict[int, Any] = {}
    frontier = [start]
    while frontier:
        t = frontier.pop()
        if t is end:
            continue
        for n in t.outputs:
            if id(n) not in region:
                region[id(n)] = n
                frontier.extend(n.outputs)
    made = {id(start)} | {id(o) for n in region.values() for o in n.outputs}
    if start is not end and id(end) not in made:
        return [], "no elementwise path from ffn_in to ffn_out"
    for n in region.values():
        if n.op not in ELEMENTWISE:
            return [], f"the intermediate tensor feeds a {n.op} node ({n.name}), not an elementwise op"
        for x in n.inputs:
            if _const(x):
                if np.asarray(x.values).size != 1:
                    return [], f"{n.name} mixes in a non-scalar constant"
            elif id(x) not in made:
                return [], f"{n.name} mixes in a tensor from outside the FFN"
        for o in n.outputs:
            if o is not end and any(id(c) not in region for c in o.outputs):
                return [], f"an intermediate value of {n.name} is used outside the FFN"
    if len(end.outputs) != 1:
        return [], "the activation output is used outside the FFN"
    exposed = [t.name for t in [start, end] + [o for n in region.values() for o in n.outputs]
               if id(t) in graph_outputs]
    if exposed:
        return [], f"{exposed[0]} inside the FFN is also a graph output (used outside the FFN)"
    return list(region.values()), None


_NO_ROLES = {"model": "no layer roles in metadata (export the model with `blockprune export`)"}


def match_ffns(graph: Any, weights: list[LinearWeight]) -> tuple[list[FFNMatch], dict[str, str]]:
    """All provably free FFN blocks, and for the others layer -> reason."""
    nodes = {n.name: n for n in graph.nodes}
    found, skipped = [], {}
    layers = _layers(weights)
    if not layers:
        return [], dict(_NO_ROLES)
    for idx, roles in sorted(layers.items()):
        key = f"layer {idx} ffn"
        if "ffn_in" not in roles or "ffn_out" not in roles:
            skipped[key] = "ffn_in or ffn_out weight not found"
            continue
        a, b = match_linear(roles["ffn_in"], nodes), match_linear(roles["ffn_out"], nodes)
        if a.bias is None:
            skipped[key] = "ffn_in has no bias Add with a constant of the intermediate width"
            continue
        if b.node.op != "MatMul":
            skipped[key] = f"ffn_out is a {b.node.op}, not a MatMul"
            continue
        target = b.node.inputs[0]
        chain, reason = _elementwise_region(a.output, target, {id(t) for t in graph.outputs})
        if reason:
            skipped[key] = reason
            continue
        found.append(FFNMatch(idx, a, b, a.output, target, chain, b.bias))
    return found, skipped


def match_attentions(graph: Any, weights: list[LinearWeight]) -> tuple[list[AttentionMatch], dict[str, str]]:
    """All attention blocks whose heads can be permuted or removed for free."""
    nodes = {n.name: n for n in graph.nodes}
    found, skipped = [], {}
    layers = _layers(weights)
    if not layers:
        return [], dict(_NO_ROLES)
    for idx, roles in sorted(layers.items()):
        key = f"layer {idx} attention"
        if not all(r in roles for r in ("q", "k", "v", "attn_out")):
            skipped[key] = "q, k, v or attention-output weight not found"
            continue
        q, k, v, o = (match_linear(roles[r], nodes) for r in ("q", "k", "v", "attn_out"))
        head_dims = set()
        reason = None
        for name, lm in (("q", q), ("k", k), ("v", v)):
            if lm.bias is None:
                reason = f"{name} has no bias Add"
                break
            consumers = lm.output.outputs
            if len(consumers) != 1 or consumers[0].op != "Reshape":
                reason = f"{name} is not followed by a head-splitting Reshape"
                break
            tail = _shape_tail(consumers[0].inputs[1])
            if not tail or len(tail) < 2 or tail[-2] != -1 or tail[-1] <= 0:
                reason = f"{name}'s Reshape does not infer the head count (shape tail {tail}); heads are fixed"
                break
            head_dims.add(tail[-1])
        if reason is None:
            src = o.node.inputs[0]
            if not src.inputs or src.inputs[0].op != "Reshape" or (_shape_tail(src.inputs[0].inputs[1]) or [0])[-1] != -1:
                reason = "the attention output is not fed by a Reshape that infers its width"
        if reason is None and len(head_dims) != 1:
            reason = f"q, k, v disagree on the head size ({sorted(head_dims)})"
        if reason is None:
            d = head_dims.pop()
            hidden = q.weight.shape[0]
            if hidden % d or k.weight.shape[0] != hidden or v.weight.shape[0] != hidden or o.weight.shape[1] != hidden:
                reason = "q/k/v/output widths are not a whole number of heads"
            else:
                found.append(AttentionMatch(idx, q, k, v, o, d, hidden // d))
                continue
        skipped[key] = reason
    return found, skipped
