"""The pass framework: validate -> transform -> validate, deferred edits, one clean-up.

Shape borrowed from SparseML's ONNX transforms and TVM's Relax passes, written for our needs:

* a ``Pass`` sees a ``PassContext`` (an onnx-graphsurgeon graph plus the model's metadata) and
  never touches ``onnx.ModelProto`` internals directly;
* structural edits (add/remove nodes, replace constants) are *recorded* during ``transform`` and
  applied together afterwards, so a matcher iterating the graph never sees it half-rewritten;
* the clean-up is done once, here: drop orphan nodes and unused initializers, topologically
  sort, export, restore metadata and opsets, ``onnx.checker``;
* each pass returns a ``PassReport`` (what it matched and changed) for the summary table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from blockprune.errors import BlockpruneError
from blockprune.onnx_io import copy_meta, get_meta, set_meta


@dataclass
class PassReport:
    name: str
    matched: int = 0
    changed: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class PassContext:
    """A graphsurgeon graph plus metadata; edits are deferred until ``commit``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnx_graphsurgeon as gs

        self.source = model
        self.graph = gs.import_onnx(model)
        self.metadata: dict[str, Any] = {}
        self._new_values: dict[str, np.ndarray] = {}
        self._add_nodes: list[Any] = []
        self._remove_nodes: list[Any] = []
        self._functions: dict[tuple[str, str], Any] = {}
        self._opsets: dict[str, int] = {}
        self._forget_shapes = False

    # --- metadata -----------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        return get_meta(self.source, key, default)

    def set_meta(self, key: str, value: Any) -> None:
        self.metadata[key] = value

    # --- constants ----------------------------------------------------------------------------
    def constants(self) -> dict[str, Any]:
        """Every gs.Constant tensor by name (initializers and folded constants)."""
        import onnx_graphsurgeon as gs

        return {n: t for n, t in self.graph.tensors().items() if isinstance(t, gs.Constant)}

    def replace_values(self, name: str, values: np.ndarray) -> None:
        """Defer replacing a constant's values (same name; shape may change)."""
        self._new_values[name] = values

    def pending_values(self, name: str, default: np.ndarray) -> np.ndarray:
        """Values of a constant as edited so far in this pass (deferred edits included)."""
        return self._new_values.get(name, default)

    def add_function(self, function: Any, domain: str, version: int = 1) -> None:
        """Ship a model-local ONNX function (and import its domain) with the rewritten model."""
        self._functions[(function.domain, function.name)] = function
        self._opsets[domain] = version

    def forget_shapes(self) -> None:
        """Drop inferred shapes of inner tensors: a pass that changes widths makes them stale."""
        self._forget_shapes = True

    # --- nodes --------------------------------------------------------------------------------
    def add_node(self, node: Any) -> None:
        self._add_nodes.append(node)

    def remove_node(self, node: Any) -> None:
        self._remove_nodes.append(node)

    def commit(self) -> onnx.ModelProto:
        """Apply deferred edits, clean up once, export, restore metadata, check."""
        import onnx_graphsurgeon as gs

        consts = self.constants()
        for name, values in self._new_values.items():
            if name not in consts:
                raise BlockpruneError(f"internal: constant {name!r} vanished during a pass")
            consts[name].values = values
        for node in self._remove_nodes:
            node.outputs.clear()
            node.inputs.clear()
        self.graph.nodes.extend(self._add_nodes)
        if self._forget_shapes:
            io = {id(t) for t in self.graph.inputs + self.graph.outputs}
            for t in self.graph.tensors().values():
                if not isinstance(t, gs.Constant) and id(t) not in io:
                    t.shape = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
            out = gs.export_onnx(self.graph, do_type_check=False)
        out.ir_version = self.source.ir_version
        out.producer_name = self.source.producer_name or "blockprune"
        domains = {o.domain for o in out.opset_import}
        for o in self.source.opset_import:
            if o.domain not in domains:
                out.opset_import.append(o)
                domains.add(o.domain)
        for domain, version in self._opsets.items():
            if domain not in domains:
                out.opset_import.append(onnx.helper.make_opsetid(domain, version))
                domains.add(domain)
        present = {(f.domain, f.name) for f in out.functions}
        for f in list(self.source.functions) + list(self._functions.values()):
            if (f.domain, f.name) not in present:
                out.functions.append(f)
                present.add((f.domain, f.name))
        for key, value in self.metadata.items():
            set_meta(out, key, value)
        copy_meta(self.source, out)
        if out.ByteSize() < 2_000_000_000:
            try:
                onnx.checker.check_model(out)
            except onnx.checker.ValidationError as exc:
                raise BlockpruneError(f"internal: the rewritten graph fails onnx.checker: {exc}",
                                      "report this as a bug with the input model") from exc
        return out


class Pass:
    """Base class. Subclasses set ``name`` and implement ``transform``; may override validation."""

    name = "pass"

    def validate(self, ctx: PassContext) -> None:
        """Preconditions on the input graph; raise BlockpruneError with the fix."""

    def transform(self, ctx: PassContext) -> PassReport:
        raise NotImplementedError

    def post_validate(self, model: onnx.ModelProto, report: PassReport) -> None:
        """Postconditions on the rewritten model."""

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        ctx = PassContext(model)
        self.validate(ctx)
        report = self.transform(ctx)
        out = ctx.commit()
        self.post_validate(out, report)
        return out, report
