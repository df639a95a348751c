"""TVM backend: target presets, TensorIR block-sparse kernels, compilation for x86 / aarch64.

Why our own kernels: TVM 0.27 (Relax) has no sparse matmul op, and its default CPU pipeline
schedules nothing, so every hot op needs a hand-written schedule (see tvm-notes).
Importing this package imports ``tvm``; the rest of blockprune does not need it.
"""
