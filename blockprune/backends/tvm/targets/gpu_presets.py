"""Mobile GPU (OpenCL) target presets, ``mali`` and ``adreno``, and a launch-limit check.

Why presets: TVM's OpenCL target defaults (``max_num_threads`` 256, 16 KiB of shared memory)
are generic; the schedules we write and the dlight rules size work-groups and local-memory
tiles from these numbers, so they should be the phone's. The host side of an OpenCL module
is ordinary aarch64 code, so each preset carries the aarch64 LLVM host target of
:mod:`.targets`.

The limits and where they come from (OpenCL device queries, as ``clinfo`` prints them; check
your own board with ``clinfo`` and pass a JSON target when it differs):

* **Mali Bifrost/Valhall** (G52/G57/G76/G77/G78/G710, Arm *Mali GPU OpenCL Developer Guide*
  and *Bifrost/Valhall performance guides*): ``CL_DEVICE_MAX_WORK_GROUP_SIZE`` is 384 on the
  Bifrost G7x parts and larger on Valhall, 256 on the older Midgard; we use 256, which every
  part launches (and TVM's own OpenCL default). ``CL_DEVICE_LOCAL_MEM_SIZE`` is 32 KiB, but
  Mali has no on-chip scratchpad: local memory is cached system memory, so staging pays only
  through reuse, never by itself. Execution width ("warp"): 4/8 lanes on Bifrost, 16 on
  Valhall.
* **Adreno 6xx/7xx** (Qualcomm *Snapdragon OpenCL General Programming and Optimization*
  guide): ``CL_DEVICE_MAX_WORK_GROUP_SIZE`` 1024, but a kernel's
  ``CL_KERNEL_WORK_GROUP_SIZE`` drops with register use (to 512 or less for register-heavy
  kernels); we use 512. ``CL_DEVICE_LOCAL_MEM_SIZE`` is 32 KiB of on-chip memory, so staging
  is cheap there. Waves are 64 or 128 fibers wide.

``thread_warp_size`` stays 1 in the TVM target for both: TVM's OpenCL code generator emits no
sub-group shuffles, and a larger value would make it lower reductions to warp intrinsics
OpenCL C does not have. The hardware width is kept as ``hw_warp`` for sizing work-groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.targets.presets import AARCH64_TRIPLE


@dataclass(frozen=True)
class GPULimits:
    """The device limits a launch must respect (names as in TVM's target attributes)."""

    max_num_threads: int  # work-items per work-group
    max_shared_memory_per_block: int  # bytes of __local memory per work-group
    max_work_item_sizes: tuple[int, int, int]  # per-dimension work-group extents
    hw_warp: int  # lanes executed together (documentation and sizing only)
    thread_warp_size: int = 1  # what TVM is told (see module doc)


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel launch: grid (work-groups) and block (work-items per group), x/y/z."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    local_bytes: int = 0  # __local memory per work-group

    @property
    def threads_per_group(self) -> int:
        return math.prod(self.block)

    @property
    def global_size(self) -> tuple[int, int, int]:
        """OpenCL's NDRange global size: grid x block, per dimension."""
        return tuple(g * b for g, b in zip(self.grid, self.block))  # type: ignore[return-value]


@dataclass(frozen=True)
class GPUPreset:
    """A named OpenCL GPU target with its limits and aarch64 host."""

    name: str
    description: str
    device: str  # TVM's "device" attribute: selects dlight/adreno rules and keys
    limits: GPULimits
    host: Mapping[str, Any] = field(default_factory=lambda: {
        "kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"]})

    @property
    def config(self) -> dict[str, Any]:
        """The JSON dict for ``tvm.target.Target``."""
        return {
            "kind": "opencl",
            "device": self.device,
            "max_num_threads": self.limits.max_num_threads,
            "max_threads_per_block": self.limits.max_num_threads,
            "max_shared_memory_per_block": self.limits.max_shared_memory_per_block,
            "thread_warp_size": self.limits.thread_warp_size,
            "host": dict(self.host),
        }

    def target(self):
        """The ``tvm.target.Target`` (imports tvm)."""
        import tvm

        return tvm.target.Target(self.config)

    def to_json(self) -> str:
        return json.dumps(self.config, sort_keys=True)


_MALI = GPUPreset(
    name="mali",
    description="Arm Mali Bifrost/Valhall (G52-G710) over OpenCL, aarch64 host",
    device="mali",
    limits=GPULimits(max_num_threads=256, max_shared_memory_per_block=32 * 1024,
                     max_work_item_sizes=(256, 256, 256), hw_warp=16),
)
_ADRENO = GPUPreset(
    name="adreno",
    description="Qualcomm Adreno 6xx/7xx over OpenCL, aarch64 host",
    device="adreno",
    limits=GPULimits(max_num_threads=512, max_shared_memory_per_block=32 * 1024,
                     max_work_item_sizes=(512, 512, 512), hw_warp=64),
)
_GPU_PRESETS = {"mali": _MALI, "adreno": _ADRENO}


def gpu_preset_names() -> list[str]:
    return list(_GPU_PRESETS)


def resolve_gpu_target(target: "str | GPUPreset | Mapping[str, Any]") -> GPUPreset:
    """A preset from its name, a preset, or an OpenCL target dict (limits taken from it)."""
    if isinstance(target, GPUPreset):
        return target
    if isinstance(target, str):
        key = target.strip().lower()
        if key in _GPU_PRESETS:
            return _GPU_PRESETS[key]
        if key.startswith("{"):
            try:
                return resolve_gpu_target(json.loads(key))
            except json.JSONDecodeError as err:
                raise BlockpruneError(f"GPU target {target!r} is not valid JSON ({err.msg})",
                                      "use a JSON dict with double quotes") from None
        raise BlockpruneError(f"unknown GPU target {target!r}",
                              f"use one of {', '.join(gpu_preset_names())}, or an OpenCL target JSON dict")
    if isinstance(target, Mapping) and target.get("kind") == "opencl":
        base = _GPU_PRESETS.get(str(target.get("device", "")), _MALI)
        threads = int(target.get("max_num_threads", base.limits.max_num_threads))
        limits = GPULimits(
            max_num_threads=threads,
            max_shared_memory_per_block=int(target.get("max_shared_memory_per_block",
                                                       base.limits.max_shared_memory_per_block)),
            max_work_item_sizes=(threads, threads, threads),
            hw_warp=base.limits.hw_warp,
            thread_warp_size=int(target.get("thread_warp_size", 1)),
        )
        host = target.get("host", base.host)
        return GPUPreset("custom", f"custom OpenCL target {json.dumps(dict(target), sort_keys=True)}",
                         str(target.get("device", base.device)), limits,
                         dict(host) if isinstance(host, Mapping) else base.host)
    raise BlockpruneError(f"cannot interpret {target!r} as a GPU target",
                          f"use one of {', '.join(gpu_preset_names())}, or a dict with \"kind\": \"opencl\"")


def launch_problems(preset: GPUPreset, launch: LaunchConfig) -> list[str]:
    """What in ``launch`` exceeds ``preset``'s limits (empty: it fits)."""
    lim = preset.limits
    problems = []
    if any(d < 1 for d in launch.grid + launch.block):
        problems.append(f"a launch extent is below 1 (grid {launch.grid}, block {launch.block})")
    if launch.threads_per_group > lim.max_num_threads:
        problems.append(f"{launch.threads_per_group} work-items per group > {lim.max_num_threads}")
    for axis, (b, cap) in enumerate(zip(launch.block, lim.max_work_item_sizes)):
        if b > cap:
            problems.append(f"work-group extent {b} on axis {'xyz'[axis]} > {cap}")
    if launch.local_bytes > lim.max_shared_memory_per_block:
        problems.append(f"{launch.local_bytes} bytes of local memory > {lim.max_shared_memory_per_block}")
    return problems


def check_launch(preset: "GPUPreset | str", launch: LaunchConfig, kernel: str = "kernel") -> None:
    """Raise a BlockpruneError naming the limit when ``launch`` does not fit ``preset``."""
    preset = resolve_gpu_target(preset)
    problems = launch_problems(preset, launch)
    if problems:
        raise BlockpruneError(
            f"kernel {kernel!r} cannot launch on {preset.name}: " + "; ".join(problems),
            "pick a schedule with fewer work-items or a smaller local tile "
            "(choose_gpu_schedule() sizes them from the preset), or a preset whose limits match the device",
        )


def get_gpu_preset(name: str) -> GPUPreset:
    """The preset called ``name`` (``mali`` or ``adreno``)."""
    return resolve_gpu_target(str(name))
