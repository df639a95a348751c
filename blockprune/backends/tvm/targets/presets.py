"""Named TVM target presets (x86 host, generic aarch64, Cortex-A cores) and their toolchains.

Why presets: a TVM target is a JSON dict whose spelling changes between releases (``mcpu:
native`` is rejected in 0.27, MetaSchedule needs ``num-cores``), and a cross target also needs
a cross compiler to link the shared library. One name (``--target cortex-a72``) carries both,
plus the Debian package to install when the compiler is missing.

Presets are plain JSON dicts; :meth:`TargetPreset.target` builds the ``tvm.target.Target``
(so importing this module costs nothing until a target is needed).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from blockprune.errors import BlockpruneError

AARCH64_CROSS_CXX = "aarch64-linux-gnu-g++"
AARCH64_CROSS_PACKAGE = "g++-aarch64-linux-gnu"
AARCH64_TRIPLE = "aarch64-linux-gnu"
QEMU_AARCH64 = "qemu-aarch64"
QEMU_PACKAGE = "qemu-user"
# The boards these cores ship in (Raspberry Pi 3/4/5, most phones' little/big cores) have 4.
_BOARD_CORES = 4


@dataclass(frozen=True)
class TargetPreset:
    """A named TVM target plus what is needed to build and run code for it from this host."""

    name: str
    description: str
    config: Mapping[str, Any]  # JSON dict accepted by tvm.target.Target
    arch: str  # "x86_64" or "aarch64": picks the kernel schedule and the toolchain
    cross_compiler: str | None = None  # None: TVM's default host compiler links the .so
    cross_package: str | None = None  # Debian package that provides cross_compiler
    emulator: str | None = None  # user-mode emulator able to run the result on this host
    emulator_package: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_cross(self) -> bool:
        """True when code for this target cannot run natively on this host."""
        return self.arch != host_arch()

    def target(self):
        """The ``tvm.target.Target`` (imports tvm)."""
        import tvm

        return tvm.target.Target(dict(self.config))

    def to_json(self) -> str:
        return json.dumps(dict(self.config), sort_keys=True)


def host_arch() -> str:
    """``x86_64`` or ``aarch64`` (normalising ``arm64``/``AMD64`` spellings)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _host_x86() -> TargetPreset:
    # mcpu "native" is rejected by TVM 0.27; ask LLVM for the host CPU name instead
    # (gives e.g. znver3 / znver5 / skylake-avx512, which implies the vector extensions).
    from tvm.target import codegen

    cores = os.cpu_count() or 1
    return TargetPreset(
        name="x86-64",
        description="this x86-64 host (LLVM, -mcpu from the running CPU)",
        # No mtriple: LLVM's default (the host triple) is what the JIT loads.
        config={"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores},
        arch="x86_64",
    )


def _aarch64(name: str, description: str, mcpu: str | None) -> TargetPreset:
    config: dict[str, Any] = {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"],
                              "num-cores": _BOARD_CORES}
    if mcpu:
        config["mcpu"] = mcpu
    return TargetPreset(
        name=name,
        description=description,
        config=config,
        arch="aarch64",
        cross_compiler=AARCH64_CROSS_CXX,
        cross_package=AARCH64_CROSS_PACKAGE,
        emulator=QEMU_AARCH64,
        emulator_package=QEMU_PACKAGE,
    )


ANDROID_TRIPLE = "aarch64-linux-android"
ANDROID_API = 28  # Android 9: the oldest API level the NDK's current releases target by default
NDK_ENV_VARS = ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK")


def _android_arm64() -> TargetPreset:
    """Android phones' arm64 cores: bionic libc, so the NDK's clang links the library.

    The NDK is not packaged for Debian and cannot be fetched here: users point ANDROID_NDK_HOME
    at theirs. There is no emulator for this preset on a Linux host (bionic binaries need an
    Android device or emulator): run and bench on a phone over RPC.
    """
    return TargetPreset(
        name="android-arm64",
        description=f"Android arm64 phone (NDK clang, API {ANDROID_API}, NEON)",
        config={"kind": "llvm", "mtriple": ANDROID_TRIPLE, "mattr": ["+neon"], "num-cores": _BOARD_CORES},
        arch="aarch64",
        cross_compiler=f"{ANDROID_TRIPLE}{ANDROID_API}-clang++",
        cross_package="the Android NDK (set ANDROID_NDK_HOME)",
        extra={"ndk": True, "api": ANDROID_API},
    )


def find_ndk_compiler(preset: TargetPreset) -> str:
    """The NDK clang++ for ``preset``, or a clear error saying how to provide an NDK."""
    tried = []
    for var in NDK_ENV_VARS:
        root = os.environ.get(var)
        if not root:
            continue
        tried.append(f"{var}={root}")
        for host in ("linux-x86_64", "linux-aarch64", "darwin-x86_64"):
            cand = os.path.join(root, "toolchains", "llvm", "prebuilt", host, "bin", preset.cross_compiler)
            if os.path.isfile(cand):
                return cand
    on_path = shutil.which(preset.cross_compiler)
    if on_path:
        return on_path
    where = f" (looked under {', '.join(tried)})" if tried else ""
    raise BlockpruneError(
        f"target {preset.name!r} needs the Android NDK's {preset.cross_compiler}, which was not found{where}",
        "install an Android NDK (r26 or newer) from developer.android.com and set ANDROID_NDK_HOME to it; "
        "for a Linux arm64 board use --target aarch64 or cortex-a72/a76 instead",
    )


# name -> factory; factories because the host preset asks LLVM about the running CPU.
_PRESETS: dict[str, Callable[[], TargetPreset]] = {
    "x86-64": _host_x86,
    "aarch64": lambda: _aarch64("aarch64", "generic ARMv8-A Linux with NEON", None),
    "cortex-a53": lambda: _aarch64("cortex-a53", "Cortex-A53 (Raspberry Pi 3, in-order)", "cortex-a53"),
    "cortex-a72": lambda: _aarch64("cortex-a72", "Cortex-A72 (Raspberry Pi 4)", "cortex-a72"),
    "cortex-a76": lambda: _aarch64("cortex-a76", "Cortex-A76 (Raspberry Pi 5, phone big cores)", "cortex-a76"),
    "android-arm64": _android_arm64,
}


def preset_names() -> list[str]:
    """Known preset names, in a stable order for help texts and errors."""
    return list(_PRESETS) + ["host"]


def host_preset() -> TargetPreset:
    """The preset for the machine we run on: ``x86-64`` or ``aarch64`` (native, no cross)."""
    return _PRESETS["aarch64" if host_arch() == "aarch64" else "x86-64"]()


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name`` (``host``: this machine); an error listing the names otherwise."""
    key = name.strip().lower()
    if key == "host":
        return host_preset()
    if key not in _PRESETS:
        raise BlockpruneError(
            f"unknown target {name!r}",
            f"use one of {', '.join(preset_names())}, or a TVM target as a JSON dict, "
            'e.g. \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}\'',
        )
    return _PRESETS[key]()


def _preset_from_config(config: Mapping[str, Any], name: str = "custom") -> TargetPreset:
    if not isinstance(config, Mapping) or "kind" not in config:
        raise BlockpruneError(
            f"target {config!r} is not a TVM target dict",
            'give a dict with at least "kind", e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}',
        )
    triple = str(config.get("mtriple", "")).lower()
    if triple.startswith(("aarch64", "arm64")):
        return TargetPreset(
            name=name, description=f"custom aarch64 target {json.dumps(dict(config))}",
            config=dict(config), arch="aarch64", cross_compiler=AARCH64_CROSS_CXX,
            cross_package=AARCH64_CROSS_PACKAGE, emulator=QEMU_AARCH64, emulator_package=QEMU_PACKAGE,
        )
    if triple and not triple.startswith(("x86_64", "x86-64")):
        raise BlockpruneError(
            f"target triple {triple!r} is not supported",
            "the CPU backend knows x86_64 and aarch64 triples",
        )
    return TargetPreset(name=name, description=f"custom target {json.dumps(dict(config))}",
                        config=dict(config), arch="x86_64")


def _plain(value: Any) -> Any:
    """TVM containers (ffi Array/String/Int) -> JSON-able Python values."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def resolve_target(name_or_json: "str | Mapping[str, Any] | TargetPreset | Any") -> TargetPreset:
    """A preset from a name (``cortex-a72``), a JSON string/dict, a preset or a tvm Target.

    A JSON dict is taken as-is (the user knows their board); its arch, and hence the cross
    compiler, comes from ``mtriple`` (no triple: the host).
    """
    if isinstance(name_or_json, TargetPreset):
        return name_or_json
    if isinstance(name_or_json, Mapping):
        return _preset_from_config(name_or_json)
    if isinstance(name_or_json, str):
        text = name_or_json.strip()
        if text.startswith("{"):
            try:
                config = json.loads(text)
            except json.JSONDecodeError as err:
                raise BlockpruneError(
                    f"target {text!r} is not valid JSON ({err.msg})",
                    f"use one of {', '.join(preset_names())}, or a JSON dict with double quotes",
                ) from None
            return _preset_from_config(config)
        return get_preset(text)
    # a tvm.target.Target: round-trip through its JSON-able dict
    export = getattr(name_or_json, "export", None)
    if callable(export):
        config = {k: _plain(v) for k, v in dict(export()).items()
                  if k in ("kind", "mtriple", "mcpu", "mattr", "num-cores")}
        return _preset_from_config(config)
    raise BlockpruneError(
        f"cannot interpret {name_or_json!r} as a target",
        f"use one of {', '.join(preset_names())}, or a TVM target JSON dict",
    )


def find_cross_compiler(preset: "TargetPreset | str") -> str | None:
    """Path of the compiler that links libraries for ``preset``; ``None`` for the host.

    Raises a BlockpruneError naming the Debian package when the cross compiler is missing.
    """
    preset = resolve_target(preset)
    if preset.extra.get("ndk"):
        return find_ndk_compiler(preset)
    if preset.cross_compiler is None or not preset.is_cross:
        return None
    path = shutil.which(preset.cross_compiler)
    if path is None:
        raise BlockpruneError(
            f"cross compiler {preset.cross_compiler} for target {preset.name!r} is not on PATH",
            f"install it: apt-get install {preset.cross_package}",
        )
    return path


def find_emulator(preset: "TargetPreset | str") -> str | None:
    """Path of a user-mode emulator (qemu) that can run ``preset`` code here, if installed."""
    preset = resolve_target(preset)
    if not preset.is_cross or preset.emulator is None:
        return None
    return shutil.which(preset.emulator)


def export_fcompile(preset: "TargetPreset | str"):
    """The ``fcompile`` for ``Executable.export_library``: the cross compiler, or None (host)."""
    path = find_cross_compiler(preset)
    if path is None:
        return None
    from tvm.support import cc

    return cc.cross_compiler(path)
