"""ONNX -> Relax: normalise the graph, lower block-sparse layers (and their epilogues) to our kernels."""
