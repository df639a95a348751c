"""ConstantNodesToInitializers: ``Constant`` nodes become initializers, so matchers see constants.

Why: the plain legacy ``torch.onnx.export`` keeps scalars (GELU's ``sqrt(2)``, ``0.5``) and shape
pieces in ``Constant`` nodes rather than initializers. To the FFN/attention matchers those look
like tensors from elsewhere, so every free permutation was refused ("mixes in a tensor from
outside the FFN"). Moving the values into initializers changes nothing numerically.
"""

from __future__ import annotations

import numpy as np

from blockprune.passes.base import Pass, PassContext, PassReport


class ConstantNodesToInitializers(Pass):
    name = "constants"

    def transform(self, ctx: PassContext) -> PassReport:
        report = PassReport(self.name)
        for node in list(ctx.graph.nodes):
            if node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or "value" not in node.attrs:
                continue
            out = node.outputs[0]
            if any(t is out for t in ctx.graph.outputs):
                continue  # a graph output stays produced by its node
            value = node.attrs["value"]
            values = np.asarray(value.values if hasattr(value, "values") else value)
            node.outputs.clear()  # the node is now dead; commit's cleanup drops it
            out.to_constant(values)  # same tensor, same name, consumers untouched
            report.changed += 1
        report.matched = report.changed
        return report
