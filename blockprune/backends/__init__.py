"""Backends: turn a pruned, exported model into something that runs fast on a device.

Each backend lives in its own subpackage (``tvm`` for the CPU/GPU compilers) and consumes the
numpy-only formats of :mod:`blockprune.bsr`, so the passes never import a compiler.
"""
