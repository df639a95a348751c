"""Timing for benchmarks: medians of wall and process-CPU time.

Why both clocks: on a shared machine the wall clock measures the neighbours too; process-CPU time
is steadier for single-threaded runs, while wall time is the one that counts with several
threads. Benchmarks report which clock they use.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np


def time_calls(call: Callable[[], object], runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median (wall, process-CPU) seconds of ``call()`` over ``runs`` calls."""
    for _ in range(warmup):
        call()
    walls, cpus = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def interleaved_medians(calls: dict[str, Callable[[], object]], runs: int, rounds: int,
                        warmup: int = 3) -> dict[str, float]:
    """Median wall seconds per call of each engine, timed side by side.

    Why interleave: on a shared machine the load drifts; ``rounds`` alternations of ``runs`` calls
    per engine make any drift hit every engine alike, so the ratios stay fair.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in samples.items()}


def cpu_vector_isa(flags_text: str | None = None) -> str:
    """The widest x86 vector extension the CPU reports (``AVX-512``, ``AVX2+FMA``, ``AVX``, ``SSE``),
    or the architecture elsewhere. Why: hosts of one CPU name differ in it (EPYC Zen 3 vs Zen 4),
    and onnxruntime's dense kernels use AVX-512 where it exists, so speed ratios are comparable only
    within one ISA; benchmark headers say which."""
    if flags_text is None:
        try:
            flags_text = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("flags")), "")
        except OSError:
            flags_text = ""
    flags = set(flags_text.split(":", 1)[-1].split())
    if not flags:
        return platform.machine()
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2+FMA" if "fma" in flags else "AVX2"
    return "AVX" if "avx" in flags else "SSE"


def cpu_name(with_isa: bool = True) -> str:
    """The CPU model for benchmark headers (``/proc/cpuinfo``, else what platform knows), followed
    by its vector ISA (:func:`cpu_vector_isa`): one model name covers hosts with and without
    AVX-512, and every timing header must say which one ran."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} ({cpu_vector_isa()})" if with_isa else name
