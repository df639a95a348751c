"""Run a compiled artifact: natively through the Relax VM, or an aarch64 one under qemu-aarch64.

Why two paths: an x86 artifact loads into this Python process (``tvm.runtime.load_module``); an
ARM artifact cannot, so it runs in the small C++ runner (``cpp/bp_runner.cc``), cross-built
against the aarch64 TVM runtime of the PyPI wheels and executed by qemu-user. Both paths check
the inputs against the manifest first, so a wrong shape or an artifact for another machine gives
a clear error, not a crash inside TVM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.runtime.artifact import Manifest
from blockprune.backends.tvm.targets.presets import AARCH64_CROSS_CXX, AARCH64_CROSS_PACKAGE, QEMU_AARCH64, QEMU_PACKAGE, host_arch, resolve_target

# Shipped inside the package (package-data), so a non-editable install finds them too.
FETCH_SCRIPT = Path(__file__).resolve().parent / "scripts" / "fetch-aarch64-runtime.sh"
CPP_RUNNER = Path(__file__).resolve().parent / "cpp" / "bp_runner.cc"
QEMU_LD_PREFIX = "/usr/aarch64-linux-gnu"
_ELF_MACHINE = {62: "x86_64", 183: "aarch64"}


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    seconds: float
    how: str  # "native" or "qemu-aarch64"
    feeds: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def default_feeds(manifest: Manifest, model=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs: from the source ONNX model when at hand (vocabulary-aware)."""
    from blockprune.sample_inputs import make_feeds

    if model is None and manifest.source.get("path") and Path(manifest.source["path"]).is_file():
        model = manifest.source["path"]
    if model is not None:
        from blockprune.onnx_io import load_onnx

        proto = load_onnx(model) if isinstance(model, (str, os.PathLike)) else model
        feeds = make_feeds(proto, manifest.batch, manifest.seq, seed=seed)
        return {i["name"]: feeds[i["name"]] for i in manifest.inputs if i["name"] in feeds} or feeds
    rng = np.random.default_rng(seed)
    out = {}
    for spec in manifest.inputs:
        dt = np.dtype(spec["dtype"])
        if np.issubdtype(dt, np.integer) or dt == np.bool_:
            out[spec["name"]] = np.ones(spec["shape"], dt) if "mask" in spec["name"] else \
                rng.integers(0, 2, spec["shape"]).astype(dt)
        else:
            out[spec["name"]] = rng.standard_normal(spec["shape"]).astype(dt)
    return out


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` (one array per input name)."""
    path = Path(path)
    if not path.is_file():
        raise BlockpruneError(f"inputs file {path} not found", "pass an .npz with one array per model input")
    with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def check_inputs(manifest: Manifest, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Arrays in the manifest's order; errors for missing names, wrong shapes, incompatible dtypes."""
    expected = {i["name"] for i in manifest.inputs}
    extra = sorted(set(feeds) - expected)
    if extra:
        raise BlockpruneError(f"unknown inputs {extra}", f"the artifact takes {sorted(expected)}")
    arrays = []
    for spec in manifest.inputs:
        name, shape, dtype = spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"])
        if name not in feeds:
            raise BlockpruneError(f"input {name!r} is missing", f"the artifact takes {sorted(expected)}")
        arr = np.asarray(feeds[name])
        if tuple(arr.shape) != shape:
            raise BlockpruneError(
                f"input {name!r} has shape {list(arr.shape)} but the artifact was compiled for {list(shape)} "
                f"(batch {manifest.batch}, seq {manifest.seq})",
                f"pass inputs of that shape, or recompile with --batch {arr.shape[0] if arr.ndim else 1}"
                + (f" --seq {arr.shape[1]}" if arr.ndim > 1 else ""),
            )
        if arr.dtype != dtype:
            if arr.dtype.kind != dtype.kind and not (arr.dtype.kind in "iub" and dtype.kind in "iub"):
                raise BlockpruneError(f"input {name!r} is {arr.dtype} but the artifact takes {dtype}",
                                      f"convert it to {dtype}")
            arr = arr.astype(dtype)
        arrays.append(np.ascontiguousarray(arr))
    return arrays


# ---------------------------------------------------------------------------------------------
# artifact checks
# ---------------------------------------------------------------------------------------------
def library_arch(path: str | os.PathLike) -> str:
    """Machine of an ELF shared library (``x86_64``/``aarch64``), from its header."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise BlockpruneError(f"{path} is not an ELF shared library", "recompile the model")
    machine = int.from_bytes(head[18:20], "little")
    return _ELF_MACHINE.get(machine, f"machine {machine}")


def check_artifact(directory: str | os.PathLike, expect_target: Any = None) -> Manifest:
    """Read the manifest; refuse an artifact for another target than expected or inconsistent."""
    manifest = Manifest.read(directory)
    lib_arch = library_arch(Path(directory) / manifest.library)
    if lib_arch != manifest.arch:
        raise BlockpruneError(
            f"{manifest.library} is built for {lib_arch} but the manifest says {manifest.arch}",
            "the artifact directory was mixed up; recompile the model",
        )
    if expect_target is not None:
        want = resolve_target(expect_target)
        if want.arch != manifest.arch or (want.name != manifest.target_name and not _same_config(want, manifest)):
            raise BlockpruneError(
                f"artifact {directory} was built for target {manifest.target_name!r} ({manifest.arch}), "
                f"not {want.name!r} ({want.arch})",
                f"recompile with --target {want.name}, or run it where {manifest.target_name} code runs",
            )
    return manifest


def _same_config(preset, manifest: Manifest) -> bool:
    return dict(preset.config) == dict(manifest.target.get("config", {}))


# ---------------------------------------------------------------------------------------------
# native
# ---------------------------------------------------------------------------------------------
def _unique_library_path(path: Path) -> Path:
    """A content-addressed copy of the library: ``dlopen`` caches by path, so a library that was
    recompiled in place would otherwise silently keep running its old code in this process."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / f"blockprune-tvm-libs-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / f"{digest}.so"
    if not dst.is_file():
        tmp = cache / f".{digest}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    return dst


def load_vm(directory: str | os.PathLike, manifest: Manifest, device=None):
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(_unique_library_path(Path(directory) / manifest.library)))
    return relax.VirtualMachine(lib, device or tvm.cpu())


def _outputs_to_dict(manifest: Manifest, ret) -> dict[str, np.ndarray]:
    items = [ret] if hasattr(ret, "numpy") else list(ret)
    return {spec["name"]: np.asarray(t.numpy()) for spec, t in zip(manifest.outputs, items)}


def run_native(directory: str | os.PathLike, manifest: Manifest, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    import tvm

    vm = load_vm(directory, manifest)
    ret = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return _outputs_to_dict(manifest, ret)


# ---------------------------------------------------------------------------------------------
# aarch64 under qemu
# ---------------------------------------------------------------------------------------------
def runtime_cache() -> Path:
    """Where the aarch64 runtime and runner live: beside the venv, else ~/.cache/blockprune."""
    env = os.environ.get("BLOCKPRUNE_AARCH64_RUNTIME")
    if env:
        return Path(env)
    import sys

    in_venv = sys.prefix != sys.base_prefix
    venv = Path(os.environ.get("VIRTUAL_ENV") or (sys.prefix if in_venv else "/nonexistent"))
    if venv.is_dir() and os.access(venv, os.W_OK):
        return venv / "blockprune-aarch64-runtime"
    return Path.home() / ".cache" / "blockprune" / "aarch64-runtime"


def ensure_aarch64_runtime(dest: Path | None = None) -> Path:
    """Fetch (once) libtvm_runtime/libtvm_ffi + headers of the aarch64 wheels into the cache."""
    import sys

    dest = dest or runtime_cache()
    if (dest / "lib" / "libtvm_runtime.so").is_file() and (dest / "lib" / "libtvm_ffi.so").is_file():
        return dest
    if not FETCH_SCRIPT.is_file():
        raise BlockpruneError(f"{FETCH_SCRIPT} is missing", "reinstall blockprune from its repository")
    proc = subprocess.run(["bash", str(FETCH_SCRIPT), str(dest), sys.executable],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BlockpruneError(
            f"could not fetch the aarch64 TVM runtime wheels: {proc.stderr.strip()[-400:]}",
            "check network access to PyPI (pip download apache-tvm for manylinux_2_28_aarch64)",
        )
    return dest


def build_cpp_runner(runtime: Path) -> Path:
    """Cross-build ``bp_runner`` for aarch64 (cached by source hash)."""
    cxx = shutil.which(AARCH64_CROSS_CXX)
    if cxx is None:
        raise BlockpruneError(f"cross compiler {AARCH64_CROSS_CXX} is not on PATH (needed for the aarch64 runner)",
                              f"install it: apt-get install {AARCH64_CROSS_PACKAGE}")
    digest = hashlib.sha256(CPP_RUNNER.read_bytes()).hexdigest()[:12]
    exe = runtime / "bin" / f"bp_runner-{digest}"
    if exe.is_file():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O2", f"-I{runtime / 'include'}", str(CPP_RUNNER), "-o", str(tmp),
           f"-L{runtime / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
           f"-Wl,-rpath,{runtime / 'lib'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BlockpruneError(f"building the aarch64 runner failed:\n{proc.stderr[-2000:]}",
                              "check the cross toolchain (g++-aarch64-linux-gnu, libc6-dev-arm64-cross)")
    os.replace(tmp, exe)
    return exe


def find_qemu() -> str:
    path = shutil.which(QEMU_AARCH64)
    if path is None:
        raise BlockpruneError(f"{QEMU_AARCH64} is not installed, so aarch64 artifacts cannot run on this host",
                              f"install it: apt-get install {QEMU_PACKAGE} (plus libc6-dev-arm64-cross), "
                              "or run the artifact on the board")
    return path


def run_qemu(directory: str | os.PathLike, manifest: Manifest, arrays: list[np.ndarray],
             timeout: float = 600) -> dict[str, np.ndarray]:
    """Run through the C++ runner under qemu-aarch64 (inputs/outputs as raw files).

    One TVM worker thread unless the caller's environment sets ``TVM_NUM_THREADS``: the runtime's
    thread pool spin-waits, and emulated spinning on a busy host starves the worker it waits for
    (a 4-second check ran past 600 s while training shared the two cores). qemu runs check
    numbers, not speed, so one thread costs nothing that matters."""
    qemu = find_qemu()
    runtime = ensure_aarch64_runtime()
    exe = build_cpp_runner(runtime)
    with tempfile.TemporaryDirectory(prefix="bp-qemu-") as tmp:
        tmp = Path(tmp)
        write_runner_inputs(tmp / "in", arrays)
        (tmp / "out").mkdir()
        env = dict(os.environ, QEMU_LD_PREFIX=QEMU_LD_PREFIX)
        env.setdefault("TVM_NUM_THREADS", "1")
        proc = subprocess.run([qemu, str(exe), str(Path(directory).resolve() / manifest.library),
                               str(tmp / "in"), str(tmp / "out")],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise BlockpruneError(f"the aarch64 runner failed under qemu (exit {proc.returncode}):\n"
                                  f"{(proc.stderr or proc.stdout)[-2000:]}",
                                  f"check that {QEMU_LD_PREFIX} exists (apt-get install libc6-dev-arm64-cross)")
        return read_runner_outputs(tmp / "out", manifest)


def write_runner_inputs(in_dir: Path, arrays: list[np.ndarray]) -> None:
    """Inputs in bp_runner's format: ``in<i>.bin`` (raw, C order) + ``inputs.txt`` (dtype ndim dims)."""
    in_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, a in enumerate(arrays):
        a = np.ascontiguousarray(a)
        (in_dir / f"in{i}.bin").write_bytes(a.tobytes())
        lines.append(" ".join([str(a.dtype), str(a.ndim)] + [str(d) for d in a.shape]))
    (in_dir / "inputs.txt").write_text("\n".join(lines) + "\n")


def read_runner_outputs(out_dir: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Outputs written by bp_runner, named after the manifest's outputs."""
    specs = (out_dir / "outputs.txt").read_text().split("\n")
    outs = {}
    for i, (spec, line) in enumerate(zip(manifest.outputs, [s for s in specs if s.strip()])):
        parts = line.split()
        shape = tuple(int(d) for d in parts[2:2 + int(parts[1])])
        data = np.fromfile(out_dir / f"out{i}.bin", dtype=np.dtype(parts[0]))
        outs[spec["name"]] = data.reshape(shape)
    return outs


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def run_artifact(directory: str | os.PathLike, inputs: "Mapping[str, np.ndarray] | str | os.PathLike | None" = None,
                 expect_target: Any = None, model=None) -> RunResult:
    """Run ``directory`` once on ``inputs`` (dict, .npz path, or None: random valid inputs).

    Native when the artifact's arch is this host's; aarch64 on x86 through qemu automatically.
    """
    manifest = check_artifact(directory, expect_target)
    if inputs is None:
        feeds = default_feeds(manifest, model)
    elif isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(inputs)
    else:
        feeds = dict(inputs)
    arrays = check_inputs(manifest, feeds)
    feeds = {spec["name"]: a for spec, a in zip(manifest.inputs, arrays)}
    t = time.perf_counter()
    if manifest.arch == host_arch():
        outs, how = run_native(directory, manifest, arrays), "native"
    elif manifest.arch == "aarch64":
        outs, how = run_qemu(directory, manifest, arrays), "qemu-aarch64"
    else:
        raise BlockpruneError(f"artifact is for {manifest.arch}, which cannot run on this {host_arch()} host",
                              "run it on a matching machine")
    return RunResult(outs, time.perf_counter() - t, how, feeds)


def compare_with_onnx(result: RunResult, model) -> dict[str, float]:
    """Max-abs difference per output against onnxruntime on the same inputs."""
    return {name: float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
            for name, (got, ref) in paired_with_onnx(result, model).items()}


def paired_with_onnx(result: RunResult, model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each output of the artifact run next to onnxruntime's on the same inputs."""
    import onnxruntime as ort

    from blockprune.onnx_io import load_onnx

    proto = load_onnx(model) if isinstance(model, (str, os.PathLike)) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    refs = sess.run(None, {k: v for k, v in result.feeds.items() if k in wanted})
    pairs = {}
    for i, (name, ref) in enumerate(zip(names, refs)):
        got = result.outputs.get(name)
        if got is None:
            got = list(result.outputs.values())[i]
        if got.shape != ref.shape:
            raise BlockpruneError(f"output {name!r}: TVM gives {list(got.shape)}, onnxruntime {list(ref.shape)}",
                                  "compare against the model the artifact was compiled from")
        pairs[name] = (got, ref)
    return pairs


def bench_artifact(directory: str | os.PathLike, number: int = 10, repeat: int = 5) -> list[float]:
    """Seconds per call of ``main`` (native artifacts), TVM's time_evaluator."""
    import tvm

    manifest = check_artifact(directory)
    if manifest.arch != host_arch():
        raise BlockpruneError(f"timing a {manifest.arch} artifact on this {host_arch()} host says nothing",
                              "bench it on the board: blockprune bench DIR --rpc HOST:PORT")
    vm = load_vm(directory, manifest)
    arrays = check_inputs(manifest, default_feeds(manifest))
    vm.set_input("main", *[tvm.runtime.tensor(a) for a in arrays])
    timer = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=number, repeat=repeat)
    return list(timer("main").results)
