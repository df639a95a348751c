"""A deployable folder: the artifact plus the C++ runner and RPC server built for its architecture.

Why: a board (or a deployment toolchain) has no Python. ``bundle`` builds ``bp_runner`` (run the
model once from raw input files) and ``bp_rpc_server`` (serve ``blockprune bench --rpc``) for the
artifact's architecture, copies ``libtvm_runtime.so``/``libtvm_ffi.so`` into ``lib/`` and links
the programs with ``rpath=$ORIGIN/lib``, so the folder runs wherever it is copied:

    bundle/
      model.so  manifest.json  bp_runner  bp_rpc_server  lib/  README.txt

The folder is assembled in a temporary directory and renamed into place.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from blockprune.backends.tvm.runtime.rpc_server import CPP_SERVER, toolchain
from blockprune.backends.tvm.runtime.runner import CPP_RUNNER, check_artifact
from blockprune.errors import BlockpruneError

USAGE = """blockprune bundle for {target} ({arch})

Run the model once (inputs as raw files, see bp_runner.cc for the format):
  ./bp_runner model.so IN_DIR OUT_DIR
Serve it to `blockprune bench --rpc HOST:PORT` from a development machine:
  ./bp_rpc_server --host 0.0.0.0 --port 9090 --max-sessions 1000 --timeout 86400
Inputs: {inputs}
"""


def _compile(cxx: str, include: Path, libs: list[Path], source: Path, exe: Path, hint: str) -> None:
    cmd = [cxx, "-std=c++17", "-O2", f"-I{include}", str(source), "-o", str(exe), "-pthread"]
    cmd += [f"-L{d}" for d in libs] + ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BlockpruneError(f"building {exe.name} failed:\n{proc.stderr[-2000:]}", hint)


def bundle(artifact_dir: str | Path, out_dir: str | Path) -> Path:
    """Assemble the deployable folder for a CPU artifact written by `blockprune compile`."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = check_artifact(artifact_dir)
    cxx, include, libs, hint = toolchain(manifest.arch)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    try:
        for name in (manifest.library, "manifest.json"):
            shutil.copy2(artifact_dir / name, tmp / name)
        (tmp / "lib").mkdir()
        for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
            src = next((d / lib for d in libs if (d / lib).is_file()), None)
            if src is None:
                raise BlockpruneError(f"{lib} not found in {', '.join(map(str, libs))}", hint)
            shutil.copy2(src, tmp / "lib" / lib)
        _compile(cxx, include, libs, CPP_RUNNER, tmp / "bp_runner", hint)
        _compile(cxx, include, libs, CPP_SERVER, tmp / "bp_rpc_server", hint)
        inputs = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in manifest.inputs)
        (tmp / "README.txt").write_text(USAGE.format(target=manifest.target.get("name"), arch=manifest.arch,
                                                     inputs=inputs))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
