"""Compact: remove dead FFN neurons and dead attention heads, leaving a smaller dense graph.

This is the structured form any runtime speeds up (nn_pruning's "filled" models). Removal is
exact:

* FFN neuron j is dead when its ffn_out column is all zero (it adds nothing), or when its
  ffn_in row is all zero: it then outputs the constant ``act(b1[j])`` whatever the input, so
  ``act(b1[j]) * W2[:, j]`` is folded into ffn_out's bias and the neuron removed. ``act`` is
  evaluated by running the graph's own activation nodes in onnxruntime, not re-implemented.
* Head h is dead when its attention-output columns are all zero, or when its value rows and
  value bias are all zero (its context is then zero). Its q, k, v rows and biases and its output
  columns are removed; the Reshape infers the head count, so nothing else changes.

At least one neuron and one head stay in each block so no tensor becomes empty.

Block alignment: with blocks that span several neurons (ffn_in's block rows, ffn_out's block
columns: ``m`` = their lcm with ``NEURON_ALIGN``, 16 for 16x1, 32 for 1x32, 16 when neither layer
has a block), neurons are removed only as whole aligned groups of ``m``. Removing single dead neurons would shift every later block boundary: a
16x1-pruned ffn_in compacted that way had 1.75x the nonzero blocks of the uncompacted layer
(density 0.20 -> 0.35) and ran slower than not compacting at all. Whole groups keep every
remaining block intact (so compaction never adds work) and the width a multiple of the block.
Dead neurons in a group that stays are zeroed in place instead (a constant one folded into the
bias first), so they still cost no weight and no block.
"""

from __future__ import annotations

import math

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers
from blockprune.passes.patterns import FFNMatch
from blockprune.passes.weight_edit import (current_values, editable_attentions, editable_ffns, out_in, take,
                                           zero_slices)


# Kept FFN widths stay a multiple of this many neurons (a vector of float32 on AVX-512; AVX2's 8 and
# NEON's 4 divide it). Removing single neurons once left ffn_out with K = 1531 (prime): its 16x1 BSR
# kernel fell off every vectorised K path and took 4.6 ms instead of ~0.6 ms, making a planned model
# 25% slower than predicted. Dead neurons in a kept group are zeroed, so alignment costs no block.
NEURON_ALIGN = 16


def neuron_multiple(ctx: PassContext, m: FFNMatch) -> int:
    """Neurons are removed in aligned groups of lcm(ffn_in block rows, ffn_out block cols,
    ``NEURON_ALIGN``): whole blocks, and a kept width the kernels vectorise."""
    layers = ctx.meta("layers", {}) or {}

    def extent(lm, axis: str) -> int:
        block = (layers.get(lm.weight.initializer) or {}).get("block")
        if not block:
            return 1
        b = BlockShape.parse(block)
        return b.rows if axis == "out" else b.cols

    return math.lcm(extent(m.ffn_in, "out"), extent(m.ffn_out, "in"), NEURON_ALIGN)


def aligned_groups(dead: np.ndarray, multiple: int) -> np.ndarray:
    """``dead`` restricted to whole aligned groups of ``multiple`` consecutive neurons."""
    if multiple <= 1:
        return dead
    group = np.arange(dead.size) // multiple
    all_dead = np.bincount(group, weights=dead.astype(np.int64)) == np.bincount(group)
    return all_dead[group]


def evaluate_activation(ctx: PassContext, m: FFNMatch, x: np.ndarray) -> np.ndarray:
    """Run the FFN's activation nodes on a 1-D input with onnxruntime."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    inp = gs.Variable("act_in", dtype=np.float32, shape=[1, 1, x.size])
    out = gs.Variable("act_out", dtype=np.float32, shape=None)
    nodes = []
    mapping = {id(m.act_input): inp, id(m.act_output): out}

    def mapped(t):
        if isinstance(t, gs.Constant):
            return gs.Constant(f"c{len(mapping)}_{t.name}", np.asarray(t.values))
        if id(t) not in mapping:
            mapping[id(t)] = gs.Variable(f"t{len(mapping)}", dtype=np.float32)
        return mapping[id(t)]

    for n in m.act_nodes:
        nodes.append(gs.Node(n.op, attrs=dict(n.attrs), inputs=[mapped(t) for t in n.inputs],
                             outputs=[mapped(t) for t in n.outputs]))
    if not nodes:  # ffn_in feeds ffn_out directly: identity activation
        return x.astype(np.float32)
    g = gs.Graph(nodes=nodes, inputs=[inp], outputs=[out], opset=ctx.graph.opset)
    g.toposort()
    model = gs.export_onnx(g)
    model.ir_version = min(model.ir_version, 10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"act_in": x.reshape(1, 1, -1).astype(np.float32)})[0].reshape(-1)


class Compact(Pass):
    name = "compact"

    def __init__(self, ffn: bool = True, heads: bool = True) -> None:
        self.ffn = ffn
        self.heads = heads

    def transform(self, ctx: PassContext) -> PassReport:
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        report = PassReport(self.name)
        skipped: dict[str, str] = {}
        removed: dict[str, dict] = {}
        layers_meta: dict[str, dict] = {}
        if self.ffn:
            ffns, skipped_ffn = editable_ffns(ctx.graph, weights)
            skipped.update(skipped_ffn)
            for m in ffns:
                key = f"layer {m.layer} ffn"
                report.matched += 1
                w1, w2 = out_in(ctx, m.ffn_in), out_in(ctx, m.ffn_out)
                dead_out = ~(w2 != 0).any(axis=0)
                dead_in = ~(w1 != 0).any(axis=1) & ~dead_out
                if dead_in.any() and m.out_bias is None:
                    dead_in[:] = False  # nowhere to fold the constant activation
                    skipped[key + " (constant neurons)"] = "ffn_out has no bias to fold constant neurons into"
                keep = ~aligned_groups(dead_out | dead_in, neuron_multiple(ctx, m))
                if not keep.any():
                    keep[:neuron_multiple(ctx, m)] = True
                # dead neurons that stay (their group is not all dead) become all-zero neurons:
                # constant ones are folded like removed ones, then their ffn_out column zeroed
                zero_in = keep & dead_in  # ffn_out column to zero after folding
                zero_out = keep & dead_out & (w1 != 0).any(axis=1)  # ffn_in row to zero
                if keep.all() and not zero_in.any() and not zero_out.any():
                    continue
                if dead_in.any():
                    b1 = current_values(ctx, m.ffn_in.bias)
                    const_act = evaluate_activation(ctx, m, b1[dead_in])
                    b2 = current_values(ctx, m.out_bias).astype(np.float64)
                    b2 = b2 + w2[:, dead_in].astype(np.float64) @ const_act.astype(np.float64)
                    ctx.replace_values(m.out_bias.name, b2.astype(np.float32))
                if zero_in.any():
                    zero_slices(ctx, m.ffn_out, "in", np.flatnonzero(zero_in))
                if zero_out.any():
                    zero_slices(ctx, m.ffn_in, "out", np.flatnonzero(zero_out))
                index = np.flatnonzero(keep)
                take(ctx, m.ffn_in, "out", index)
                take(ctx, m.ffn_out, "in", index)
                removed[key] = {"neurons_before": int(keep.size), "neurons_after": int(index.size),
                                "folded_constant_neurons": int(dead_in.sum()),
                                "zeroed_in_place": int((zero_in | zero_out).sum())}
                for lm, shape in ((m.ffn_in, (index.size, w1.shape[1])), (m.ffn_out, (w2.shape[0], index.size))):
                    layers_meta[lm.weight.initializer] = {"compacted": [list(lm.weight.shape), list(shape)]}
                report.changed += 1
        if self.heads:
            atts, skipped_att = editable_attentions(ctx.graph, weights)
            skipped.update(skipped_att)
            for m in atts:
                key = f"layer {m.layer} heads"
                report.matched += 1
                d, h = m.head_dim, m.num_heads
                wv, wo = out_in(ctx, m.v), out_in(ctx, m.out)
                bv = current_values(ctx, m.v.bias)
                dead = np.array([
                    not (wo[:, i * d:(i + 1) * d] != 0).any()
                    or (not (wv[i * d:(i + 1) * d] != 0).any() and not (bv[i * d:(i + 1) * d] != 0).any())
                    for i in range(h)])
                if dead.all():
                    dead[0] = False
                if not dead.any():
                    continue
                rows = np.concatenate([np.arange(i * d, (i + 1) * d) for i in range(h) if not dead[i]])
                for x in (m.q, m.k, m.v):
                    take(ctx, x, "out", rows)
                    layers_meta[x.weight.initializer] = {"compacted": [list(x.weight.shape), [rows.size, x.weight.shape[1]]]}
                take(ctx, m.out, "in", rows)
                layers_meta[m.out.weight.initializer] = {"compacted": [list(m.out.weight.shape), [m.out.weight.shape[0], rows.size]]}
                removed[key] = {"heads_before": int(h), "heads_after": int(h - dead.sum()),
                                "removed": [int(i) for i in np.flatnonzero(dead)]}
                report.changed += 1
        if report.changed:
            ctx.forget_shapes()
            record_layers(ctx, layers_meta)
            ctx.set_meta("compacted", {**(ctx.meta("compacted", {}) or {}), **removed})
        report.details.update(removed=removed, skipped=skipped)
        report.notes = [f"{k}: left alone ({v})" for k, v in skipped.items()]
        return report
