"""Layer roles from the graph's structure, for ONNX models without blockprune's metadata.

Why: ``blockprune export`` names every weight after its Hugging Face parameter, and the passes
read q/k/v/attention-output/FFN roles from those names. A plain ``torch.onnx.export`` (legacy or
dynamo) or an onnxruntime-optimised graph has no such names (``onnx::MatMul_1234``), so reorder,
compact and the head exclusion of pruning would see nothing. The encoder's structure is the same
in every export, so we recognise it instead:

* attention: three Linears (MatMul/Gemm [+ Add bias]) whose outputs, through head-splitting
  Reshape/Transpose (and scaling Mul/Div), meet in two activation-by-activation MatMuls: the
  score MatMul takes q (input 0) and k (input 1), the context MatMul takes the softmax (input 0)
  and v (input 1); the Linear fed by the context (through Transpose/Reshape) is the attention
  output. A fused ``com.microsoft::Attention`` packs q/k/v in one constant (not a Linear here);
  the Linear it feeds is the attention output;
* FFN: a Linear whose output reaches, through elementwise ops only (Gelu, the Erf sub-graph,
  FastGelu, BiasGelu...), a second Linear of the transposed shape;
* layer index: the order of the blocks in the (topologically sorted) graph;
* everything else, once an encoder was recognised, is a head: ``pooler`` when a Tanh follows,
  else ``classifier``; heads stay dense by default, exactly as named heads do on our own
  exports. In a graph with no encoder structure at all roles stay unknown (all prunable).
"""

from __future__ import annotations

from typing import Any

from blockprune.passes.find_weights import LinearWeight

_HEAD_SPLIT = {"Reshape", "Transpose", "Mul", "Div", "Cast", "Squeeze", "Unsqueeze", "Identity"}
_SCORE_PATH = {"Softmax", "Add", "Div", "Mul", "Cast", "Where", "Dropout", "Identity", "Sub"}
_ELEMENTWISE = {"Div", "Mul", "Add", "Sub", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Pow", "Sqrt",
                "FastGelu", "BiasGelu", "Identity", "Cast", "Neg", "Exp", "Softplus", "QuickGelu"}
_MAX_STEPS = 16


def _is_const(t: Any) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def _trace_to_matmul(t: Any) -> tuple[Any, int] | None:
    """Follow single-consumer head-splitting ops to an activation x activation MatMul: (node, input index)."""
    for _ in range(_MAX_STEPS):
        if len(t.outputs) != 1:
            return None
        n = t.outputs[0]
        if n.op == "MatMul" and not any(_is_const(x) for x in n.inputs):
            return n, [i for i, x in enumerate(n.inputs) if x is t][0]
        if n.op not in _HEAD_SPLIT:
            return None
        t = n.outputs[0]
    return None


def _producer_chain(t: Any, ops: set[str]) -> Any | None:
    """Walk back (breadth first) through ``ops`` to the nearest MatMul; None if none that way."""
    frontier, seen = [t], set()
    for _ in range(_MAX_STEPS):
        nxt = []
        for x in frontier:
            if not x.inputs:
                continue
            n = x.inputs[0]
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op == "MatMul":
                return n
            if n.op in ops:
                nxt.extend(i for i in n.inputs if not _is_const(i))
        if not nxt:
            return None
        frontier = nxt
    return None


def _linear_after(t: Any, linears: dict[int, Any], ops: set[str]) -> Any | None:
    """The Linear fed by ``t`` through single-consumer ``ops``."""
    for _ in range(_MAX_STEPS):
        if len(t.outputs) != 1:
            return None
        n = t.outputs[0]
        if id(n) in linears:
            return linears[id(n)]
        if n.op not in ops:
            return None
        t = n.outputs[0]
    return None


def _ffn_partner(start: Any, a: LinearWeight, linears: dict[int, Any]) -> Any | None:
    """The second FFN Linear reached from ``start`` through elementwise ops only."""
    seen: set[int] = set()
    frontier = [start]
    hits = []
    for _ in range(_MAX_STEPS):
        nxt = []
        for t in frontier:
            for n in t.outputs:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if id(n) in linears and n.inputs[0] is t:
                    hits.append(linears[id(n)])
                elif n.op in _ELEMENTWISE:
                    nxt.extend(n.outputs)
                else:
                    return None  # the intermediate leaves the elementwise region: not an FFN
        if not nxt:
            break
        frontier = nxt
    good = [b for b in hits if b[0].shape == (a.shape[1], a.shape[0])]
    return good[0] if len(good) == 1 else None


def infer_roles(graph: Any, weights: list[LinearWeight]) -> list[LinearWeight]:
    """Fill ``role`` and ``layer`` of ``weights`` (in place) from the graph structure; returns them."""
    from blockprune.passes.patterns import match_linear

    nodes = {n.name: n for n in graph.nodes}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    linears: dict[int, Any] = {}
    for w in weights:
        if w.node in nodes:
            lm = match_linear(w, nodes)
            linears[id(lm.node)] = (w, lm)

    attention: list[tuple[int, dict[str, LinearWeight]]] = []
    by_matmul: dict[int, dict[int, LinearWeight]] = {}
    for w, lm in linears.values():
        hit = _trace_to_matmul(lm.output)
        if hit is not None:
            by_matmul.setdefault(id(hit[0]), {})[hit[1]] = w
    mm_nodes = {id(n): n for n in graph.nodes if n.op == "MatMul"}
    for mid, ins in by_matmul.items():
        ctx_mm = mm_nodes[mid]
        if 1 not in ins or 0 in ins:
            continue
        score = _producer_chain(ctx_mm.inputs[0], _SCORE_PATH)  # softmax(...) -> back to the score MatMul
        if score is None or id(score) not in by_matmul:
            continue
        qk = by_matmul[id(score)]
        if set(qk) != {0, 1}:
            continue
        out = _linear_after(ctx_mm.outputs[0], linears, {"Transpose", "Reshape", "Cast", "Identity"})
        roles = {"q": qk[0], "k": qk[1], "v": ins[1]}
        if out is not None:
            roles["attn_out"] = out[0]
        attention.append((order[id(nodes[qk[0].node])], roles))
    for n in graph.nodes:  # fused attention: q/k/v packed inside the node, attention output after it
        if n.op in ("Attention", "MultiHeadAttention") and n.outputs:
            out = _linear_after(n.outputs[0], linears, {"Reshape", "Cast", "Identity"})
            if out is not None:
                attention.append((order[id(n)], {"attn_out": out[0]}))

    ffns: list[tuple[int, dict[str, LinearWeight]]] = []
    taken = {id(w) for _, r in attention for w in r.values()}
    for w, lm in linears.values():
        if id(w) in taken:
            continue
        b = _ffn_partner(lm.output, w, linears)
        if b is not None and id(b[0]) not in taken:
            ffns.append((order[id(lm.node)], {"ffn_in": w, "ffn_out": b[0]}))
            taken |= {id(w), id(b[0])}

    for layer, (_, roles) in enumerate(sorted(attention, key=lambda x: x[0])):
        for role, w in roles.items():
            w.role, w.layer = role, layer
    for layer, (_, roles) in enumerate(sorted(ffns, key=lambda x: x[0])):
        for role, w in roles.items():
            w.role, w.layer = role, layer
    if not attention and not ffns:
        return weights  # not a transformer encoder: roles stay unknown (every weight prunable, as before)
    for w, lm in linears.values():
        if w.role is None:
            tanh = len(lm.output.outputs) == 1 and lm.output.outputs[0].op == "Tanh"
            w.role = "pooler" if tanh else "classifier"
    return weights
