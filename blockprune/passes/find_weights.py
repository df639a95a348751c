"""Analysis: every MatMul/Gemm whose weight is a constant, with its layout and HF name.

A weight reaches its consumer as a constant either directly (MatMul B stored ``[in, out]``;
Gemm B with ``transB``) or through a ``Transpose(perm=[1, 0])`` of a constant stored in the
PyTorch ``[out, in]`` layout. Both exporters produce these forms. Activations times activations
(the attention score and context MatMuls) are not weights and are not returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from blockprune.errors import BlockpruneError
from blockprune.models.registry import role_of_hf_name


@dataclass
class LinearWeight:
    """One prunable weight as the graph holds it."""

    node: str  # consuming MatMul/Gemm node name
    op_type: str
    initializer: str  # constant tensor name
    layout: str  # "in_out" (MatMul B as stored) or "out_in" (PyTorch layout)
    shape: tuple[int, int]  # (out, in): always the PyTorch view
    hf_name: str | None = None
    role: str | None = None
    layer: int | None = None
    via_transpose: str | None = None  # name of the Transpose node, when there is one

    @property
    def display_name(self) -> str:
        return self.hf_name or self.initializer

    def to_out_in(self, values: np.ndarray) -> np.ndarray:
        """The constant's values viewed in the PyTorch ``[out, in]`` layout."""
        return values.T if self.layout == "in_out" else values

    def from_out_in(self, values: np.ndarray) -> np.ndarray:
        """Back to the stored layout."""
        return values.T if self.layout == "in_out" else values


def _gemm_trans_b(node: Any) -> bool:
    return bool(node.attrs.get("transB", 0))


def find_weights_in_graph(graph: Any, metadata: dict[str, Any] | None = None) -> list[LinearWeight]:
    """Scan a graphsurgeon graph; ``metadata`` gives ``param_map`` and ``architecture`` if known."""
    import onnx_graphsurgeon as gs

    metadata = metadata or {}
    param_map = metadata.get("param_map") or {}
    arch = metadata.get("architecture")
    found: list[LinearWeight] = []
    seen: set[tuple[str, str]] = set()
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        b = node.inputs[1]
        transpose = None
        if isinstance(b, gs.Constant):
            const = b
            layout = "out_in" if (node.op == "Gemm" and _gemm_trans_b(node)) else "in_out"
        elif len(b.inputs) == 1 and b.inputs[0].op == "Transpose" and isinstance(b.inputs[0].inputs[0], gs.Constant):
            tnode = b.inputs[0]
            perm = list(tnode.attrs.get("perm", [1, 0]))
            if perm != [1, 0]:
                continue
            const, transpose = tnode.inputs[0], tnode.name
            layout = "out_in"
            if node.op == "Gemm" and _gemm_trans_b(node):
                layout = "in_out"
        else:
            continue
        if len(const.shape) != 2 or np.dtype(const.dtype).kind != "f":
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        rows, cols = const.shape
        shape = (cols, rows) if layout == "in_out" else (rows, cols)
        key = (node.name, const.name)
        if key in seen:
            continue
        seen.add(key)
        hf = const.name if const.name in param_map else None
        role = layer = None
        if hf and arch:
            rl = role_of_hf_name(arch, hf)
            if rl:
                role, layer = rl
        found.append(LinearWeight(node.name, node.op, const.name, layout, (int(shape[0]), int(shape[1])),
                                  hf, role, layer, transpose))
    if found and not any(w.role for w in found):  # no blockprune names: recognise the encoder by structure
        from blockprune.passes.graph_roles import infer_roles

        infer_roles(graph, found)
    return found


def find_weights(model: onnx.ModelProto) -> list[LinearWeight]:
    """All prunable weights of a model, in graph order."""
    from blockprune.passes.base import PassContext

    ctx = PassContext(model)
    return find_weights_in_graph(ctx.graph, {"param_map": ctx.meta("param_map", {}),
                                             "architecture": ctx.meta("architecture")})


def require_weights(weights: list[LinearWeight], what: str = "model") -> list[LinearWeight]:
    if not weights:
        raise BlockpruneError(
            f"the {what} has no prunable MatMul/Gemm: no matrix multiplication takes a constant weight",
            "pass a transformer exported with `blockprune export` (weights must be initializers, not inputs)",
        )
    return weights
