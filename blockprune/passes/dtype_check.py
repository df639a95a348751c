"""Refuse non-float32 Linear weights up front, with the fix, before any stage runs.

Why: the compression stages (masks, reorder, compaction, BSR) and the TVM CPU kernels are
float32; an fp16/bf16 model used to get as far as onnxruntime's verification and fail there with
a type error that named neither the weight nor the way out.
"""

from __future__ import annotations

import onnx

from blockprune.errors import BlockpruneError

_NAMES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
          onnx.TensorProto.DOUBLE: "float64"}


def require_float32_weights(model: onnx.ModelProto, what: str = "compression") -> None:
    """Raise when a MatMul/Gemm weight initializer (directly or via Cast/Transpose) is not float32."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        for _ in range(3):  # through Transpose/Cast to the stored constant
            if name in inits or name not in producers or producers[name].op_type not in ("Transpose", "Cast"):
                break
            name = producers[name].input[0]
        t = inits.get(name)
        if t is not None and t.data_type in _NAMES:
            raise BlockpruneError(
                f"weight {name!r} (node {node.name or node.op_type!r}) is {_NAMES[t.data_type]}; {what} supports "
                "float32 weights only",
                "export or convert the model in float32 (onnxruntime.transformers.float16 can convert back), "
                "compress and compile it, then quantise the result",
            )
