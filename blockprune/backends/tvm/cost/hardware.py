"""What the analytic cost model assumes about each target's CPU core (stated, not measured).

Why a table of its own: without a board there is nothing to time, so the planner predicts from
first principles — how many float32 multiply-adds a core retires per cycle, its clock, its cache
sizes and memory bandwidth. These are datasheet figures (or, for the x86 hosts the shipped tables
were measured on, their class: AMD EPYC Zen 3 with AVX2, Intel Xeon with AVX-512; ``HOST_CORES``);
``blockprune plan`` prints the ones it used next to every unmeasured
prediction, so a reader can see what the numbers rest on. One core, since the flow is timed at
one thread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blockprune.errors import BlockpruneError


@dataclass(frozen=True)
class CoreSpec:
    """One CPU core as the analytic model sees it."""

    name: str
    isa: str
    lanes: int  # float32 lanes per vector register (AVX2: 8, NEON: 4)
    fma_pipes: int  # vector FMA instructions retired per cycle
    ghz: float  # sustained clock
    l1d_kib: int
    l2_kib: int
    l3_kib: int  # 0: none
    dram_gbs: float  # sustained single-core read bandwidth from DRAM
    note: str = ""

    @property
    def peak_gflops(self) -> float:
        """float32 peak of one core: lanes x 2 (multiply + add) x FMA pipes x clock."""
        return self.lanes * 2 * self.fma_pipes * self.ghz

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_gflops": self.peak_gflops}


CORES: dict[str, CoreSpec] = {
    # The project's machine class (the shipped calibration table was measured on it).
    "x86-64": CoreSpec("x86-64", "AVX2+FMA", 8, 2, 3.0, 32, 512, 32768, 12.0,
                       "AMD EPYC Zen 3 (this host's class)"),
    "aarch64": CoreSpec("aarch64", "NEON", 4, 2, 1.8, 32, 512, 0, 4.0, "generic ARMv8-A, assumed A72-like"),
    "cortex-a53": CoreSpec("cortex-a53", "NEON", 4, 1, 1.2, 32, 512, 0, 2.0,
                           "Raspberry Pi 3: in-order, 64-bit NEON datapath (one 128-bit FMA per cycle at best)"),
    "cortex-a72": CoreSpec("cortex-a72", "NEON", 4, 2, 1.5, 32, 1024, 0, 4.0,
                           "Raspberry Pi 4 (BCM2711): two 128-bit NEON pipes, 1 MiB shared L2, LPDDR4"),
    "cortex-a76": CoreSpec("cortex-a76", "NEON", 4, 2, 2.4, 64, 512, 2048, 8.0,
                           "Raspberry Pi 5 (BCM2712): two 128-bit NEON FMA pipes, 2 MiB L3, LPDDR4X"),
    "android-arm64": CoreSpec("android-arm64", "NEON", 4, 2, 2.4, 64, 512, 2048, 8.0,
                              "a big Cortex-A76-class phone core, assumed"),
}


# The x86 hosts the shipped tables were measured on, by vector unit (what the analytic model's
# efficiencies are fitted against; not targets of their own: x86 is planned from measured tables).
HOST_CORES: dict[str, CoreSpec] = {
    "avx2": CORES["x86-64"],
    # 3.0 GHz: at 2.6 the fitted in-L2 efficiencies of 32x1/32x32 BSR came out above 1 (the VM
    # does not report the clock; a peak below what was measured cannot be right).
    "avx512": CoreSpec("x86-64-avx512", "AVX-512+FMA", 16, 2, 3.0, 48, 2048, 491520, 12.0,
                       "Intel Xeon with AVX-512 (two 512-bit FMA ports assumed, ~3.0 GHz)"),
}


def host_core(isa: str) -> CoreSpec:
    """The stated core of an x86 host by vector unit (AVX2's for anything else)."""
    return HOST_CORES.get(isa, HOST_CORES["avx2"])


def core_spec(target: str) -> CoreSpec:
    """The stated core for a preset name, or one clear error listing the presets it knows."""
    if target not in CORES:
        raise BlockpruneError(f"no analytic cost model for target {target!r}",
                              f"use one of: {', '.join(CORES)} (or give measured tables with --cost-table)")
    return CORES[target]
