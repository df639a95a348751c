"""Checking what was compiled against onnxruntime: whole artifacts, GPU kernels on PoCL."""
