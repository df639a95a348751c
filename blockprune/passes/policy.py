"""Policy: decide, per layer, the form it is stored and run in, and say why.

Forms: ``dense`` (as is), ``bsr`` (block-sparse), each possibly after ``compact`` (structure
removed by the Compact pass, recorded as ``compacted`` in the layer's metadata). The decision for
a pruned layer is a break-even density: below it BSR beats dense; the default is a parameter for
now (the TVM backends measure break-evens per target and will feed them here). The decision and
its reason go into metadata ``blockprune.layers`` for `blockprune inspect` and the backends.
A layer pruned from a plan (``planned_form`` in its metadata) gets the planned form under
``--form auto``: the plan chose it with the same cost table, per layer.

``break_even`` is a number, or a measured table from the backend's calibration
(``blockprune.backends.tvm.cost.calibrate.BreakEvenTable``; any object with
``lookup(out, in, block) -> (density, source)``), so that passes never import a backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers

FORMS = ("auto", "bsr", "compact", "dense")
DEFAULT_BREAK_EVEN = 0.6


class Policy(Pass):
    name = "policy"

    def __init__(self, form: str = "auto", break_even: "float | Any" = DEFAULT_BREAK_EVEN,
                 block: str | BlockShape | None = None) -> None:
        if form not in FORMS:
            raise BlockpruneError(f"unknown form {form!r}", f"use one of: {', '.join(FORMS)}")
        self.table = break_even if hasattr(break_even, "lookup") else None
        if self.table is not None:
            break_even = DEFAULT_BREAK_EVEN
        if not 0.0 < break_even <= 1.0:
            raise BlockpruneError(f"break-even density {break_even} is outside (0, 1]",
                                  "give the density below which block-sparse beats dense, e.g. 0.6")
        self.form, self.break_even = form, break_even
        self.block = BlockShape.parse(block) if block else None

    def transform(self, ctx: PassContext) -> PassReport:
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        layers = ctx.meta("layers", {}) or {}
        consts = ctx.constants()
        decisions, report = {}, PassReport(self.name)
        for w in weights:
            info = layers.get(w.initializer, {})
            oi = w.to_out_in(np.asarray(consts[w.initializer].values))
            density = float(np.count_nonzero(oi)) / oi.size
            prefix = "compact+" if info.get("compacted") else ""
            block = BlockShape.parse(info["block"]) if info.get("block") else self.block
            if density == 1.0:
                form, why = "dense", "not pruned"
            elif self.form in ("dense", "compact"):
                form, why = "dense", f"--form {self.form}"
            elif w.op_type != "MatMul":
                form, why = "dense", f"{w.op_type} head: no block-sparse kernel"
            elif block is None:
                form, why = "dense", "no block shape recorded"
            elif oi.shape[0] % block.rows or oi.shape[1] % block.cols:
                form, why = "dense", f"block {block} does not divide {oi.shape[0]}x{oi.shape[1]}"
            elif self.form == "bsr":
                form, why = "bsr", "--form bsr"
            elif self.form == "auto" and info.get("planned_form"):
                form, why = info["planned_form"], f"planned by `blockprune plan` (density {density:.2f})"
            else:
                be, src = (self.table.lookup(oi.shape[0], oi.shape[1], str(block)) if self.table is not None
                           else (self.break_even, "parameter"))
                src = "" if src == "parameter" else f" ({src})"
                if density <= be:
                    form, why = "bsr", f"density {density:.2f} <= break-even {be:.2f}{src}"
                else:
                    form, why = "dense", f"density {density:.2f} > break-even {be:.2f}{src}"
            if prefix:
                why = f"compacted {info['compacted'][0]} -> {info['compacted'][1]}; " + why
            decisions[w.initializer] = {"form": prefix + form, "reason": why, "density": density}
            report.matched += 1
            report.changed += form == "bsr"
        record_layers(ctx, decisions)
        report.details["forms"] = {k: v["form"] for k, v in decisions.items()}
        return report
