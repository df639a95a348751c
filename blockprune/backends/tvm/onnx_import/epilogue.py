"""Find what follows a block-sparse MatMul in the ONNX graph that its kernel can do on the way out.

Why: at 80% sparsity the BSR kernels are fast enough that separate passes over the output for the
bias add, the GELU and the residual add cost a sizeable share of the model (each reads and writes
``M x N`` floats that the kernel just had in registers). The kernel applies them to its
accumulators instead (:mod:`.bsr_kernel`, ``BSRKernelSpec.bias/gelu/residual``).

What is matched, in this order, each only when the tensor before it has no other consumer:

* **bias**: ``Add(y, b)`` with ``b`` a constant of shape ``[N]`` (either operand order);
* **GELU** (erf form): an elementwise subgraph from the biased tensor to one output, made only of
  ``Div/Mul/Add/Sub/Erf/Gelu`` and constants, that *computes* ``x * 0.5 * (1 + erf(x / sqrt 2))``
  -- checked numerically on a sweep of inputs, so every exporter's spelling of GELU is found
  (``Div -> Erf -> Add -> Mul -> Mul``, ``Mul(0.5)`` first, opset 20's ``Gelu``) and nothing else is;
* **residual**: ``Add(h, r)`` with ``r`` a non-constant tensor (the transformer's skip
  connection). ``r`` becomes the kernel node's second input; the converter checks that its static
  shape equals the output's and otherwise emits a separate add, so a broadcasting ``r`` stays correct.

The matched nodes are removed from the ONNX graph here; the matmul's output takes the name of
the last removed tensor, so the rest of the graph is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_ELEMENTWISE = {"Div", "Mul", "Add", "Sub", "Erf", "Gelu"}
_GELU_TOL = 1e-5


@dataclass
class Epilogue:
    """What a kernel applies to ``X @ W^T`` before storing it (in this order)."""

    bias: np.ndarray | None = None
    gelu: bool = False
    residual: str | None = None  # the skip connection's tensor, added on the way out

    @property
    def empty(self) -> bool:
        return self.bias is None and not self.gelu and self.residual is None

    def describe(self, residual: bool = True) -> str:
        parts = (["bias"] if self.bias is not None else []) + (["gelu"] if self.gelu else []) + \
            (["residual"] if self.residual and residual else [])
        return "+".join(parts) or "none"


class GraphIndex:
    """Consumers and constants of an ONNX graph, for matching (built once per graph)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.constants: dict[str, np.ndarray] = {t.name: t for t in graph.initializer}  # lazy arrays
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t

    def constant(self, name: str) -> np.ndarray | None:
        c = self.constants.get(name)
        if c is None:
            return None
        if isinstance(c, onnx.TensorProto):
            c = numpy_helper.to_array(c)
            self.constants[name] = c
        return c

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]


def _bias(index: GraphIndex, y: str, n: int) -> tuple[onnx.NodeProto, np.ndarray] | None:
    add = index.only_consumer(y)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.input[1] if add.input[0] == y else add.input[0]
    b = index.constant(other)
    if b is None or b.dtype != np.float32 or b.size != n or b.shape[-1:] != (n,):
        return None  # a bias is [N] (or [1, .., 1, N]): one value per output feature
    return add, b.reshape(n).astype(np.float32)


def _gelu_reference(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(np.float64)


def _eval(nodes: list[onnx.NodeProto], index: GraphIndex, start: str, x: np.ndarray, out: str) -> np.ndarray | None:
    """Evaluate an elementwise subgraph on ``x`` in float64 (None if an op is not understood)."""
    env = {start: x.astype(np.float64)}
    erf = np.vectorize(math.erf)
    for node in nodes:
        args = []
        for name in node.input:
            if name in env:
                args.append(env[name])
            else:
                c = index.constant(name)
                if c is None:
                    return None
                args.append(c.astype(np.float64))
        op = node.op_type
        if op == "Add":
            v = args[0] + args[1]
        elif op == "Sub":
            v = args[0] - args[1]
        elif op == "Mul":
            v = args[0] * args[1]
        elif op == "Div":
            v = args[0] / args[1]
        elif op == "Erf":
            v = erf(args[0])
        elif op == "Gelu":
            approx = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate"),
                          b"none")
            if (approx.decode() if isinstance(approx, bytes) else approx) != "none":
                return None
            v = _gelu_reference(args[0])
        else:
            return None
        env[node.output[0]] = v
    return env.get(out)


def _gelu(index: GraphIndex, h: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The elementwise closure of ``h`` if it is exactly GELU(h) with one output tensor."""
    produced = {h}
    chosen: list[onnx.NodeProto] = []
    frontier = list(index.consumers.get(h, []))
    changed = True
    while changed:
        changed = False
        for node in list(frontier):
            if node in chosen or node.op_type not in _ELEMENTWISE or node.domain not in ("", "ai.onnx"):
                continue
            if all(i in produced or index.constant(i) is not None for i in node.input) and \
                    any(i in produced for i in node.input):
                chosen.append(node)
                produced.update(node.output)
                frontier.extend(index.consumers.get(node.output[0], []))
                changed = True
        if len(chosen) > 8:
            return None
    if not chosen:
        return None
    internal = {o for n in chosen for o in n.output}
    leaving = [t for t in internal if t in index.outputs or any(c not in chosen for c in index.consumers.get(t, []))]
    dangling = [t for t in internal if not index.consumers.get(t) and t not in index.outputs]
    if len(leaving) != 1 or dangling or any(c not in chosen for c in index.consumers.get(h, [])):
        return None
    out = leaving[0]
    xs = np.linspace(-6.0, 6.0, 97)
    got = _eval(chosen, index, h, xs, out)
    if got is None or got.shape != xs.shape or not np.allclose(got, _gelu_reference(xs), atol=_GELU_TOL, rtol=0):
        return None
    return chosen, out


def _residual(index: GraphIndex, h: str) -> onnx.NodeProto | None:
    add = index.only_consumer(h)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.input[1] if add.input[0] == h else add.input[0]
    if other == h or index.constant(other) is not None:
        return None
    return add


def absorb_epilogue(index: GraphIndex, matmul: onnx.NodeProto, n: int, residual: bool = True) -> tuple[Epilogue, list[onnx.NodeProto]]:
    """Match the epilogue after ``matmul`` (output ``[.., N]``) and rewire the graph.

    Returns the epilogue and the ONNX nodes to delete (bias, GELU, residual add). The matmul's
    output is renamed to the last absorbed tensor. The residual is only taken after a plain
    product or bias (GELU(x) + r is not a transformer pattern) and when the other operand is not
    a constant; the converter checks the static shapes before fusing it.
    """
    ep = Epilogue()
    removed: list[onnx.NodeProto] = []
    y = matmul.output[0]
    found = _bias(index, y, n)
    if found is not None:
        add, ep.bias = found
        removed.append(add)
        y = add.output[0]
    gelu = _gelu(index, y)
    if gelu is not None:
        nodes, out = gelu
        removed.extend(nodes)
        ep.gelu = True
        y = out
    if residual and not ep.gelu:
        add = _residual(index, y)
        if add is not None:
            ep.residual = add.input[1] if add.input[0] == y else add.input[0]
            removed.append(add)
            y = add.output[0]
    if removed:
        matmul.output[0] = y
    return ep, removed
