"""Build and launch our minimal C++ TVM RPC server (``cpp/rpc_server.cc``), for x86 or aarch64.

Why: a board has no Python TVM, only the runtime libraries; the server does the handshake of
``tvm/rpc/server.py`` and hands the socket to the runtime's ``rpc.ServerLoop``. Here it is
built for this host (against the venv's x86 libtvm_runtime/libtvm_ffi) or cross-built for
aarch64 (against the runtime of the aarch64 wheels, like ``bp_runner``) and run under
qemu-aarch64, so ``rpc.bench_rpc``/``rpc.run_rpc`` can be exercised end to end on one machine.

The server listens on 127.0.0.1 only and is bounded (``max_sessions``, ``timeout``);
:class:`RPCServer` is a context manager that always stops it.

    with start_server("aarch64", max_sessions=1) as srv:
        run_rpc(artifact_dir, "127.0.0.1", srv.port)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.runtime.runner import QEMU_LD_PREFIX, ensure_aarch64_runtime, find_qemu
from blockprune.backends.tvm.targets.presets import AARCH64_CROSS_CXX, AARCH64_CROSS_PACKAGE, host_arch

CPP_SERVER = Path(__file__).resolve().parent / "cpp" / "rpc_server.cc"
_LISTEN_RE = re.compile(r"listening on [0-9.]+:(\d+)")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BlockpruneError(f"Python package {name!r} is not installed", "pip install apache-tvm")
    return Path(list(spec.submodule_search_locations)[0])


def host_runtime_dirs() -> tuple[Path, list[Path]]:
    """(include dir, library dirs) of this host's TVM runtime from the installed wheels."""
    ffi = _package_dir("tvm_ffi")
    tvm = _package_dir("tvm")
    include, libs = ffi / "include", [tvm / "lib", ffi / "lib"]
    for need in (include / "tvm" / "ffi" / "function.h", libs[0] / "libtvm_runtime.so", libs[1] / "libtvm_ffi.so"):
        if not need.is_file():
            raise BlockpruneError(f"{need} is missing from the installed TVM wheels",
                                  "reinstall apache-tvm / apache-tvm-ffi")
    return include, libs


def _build(cxx: str, include: Path, lib_dirs: list[Path], exe: Path, what: str, hint: str) -> Path:
    if exe.is_file():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O2", f"-I{include}", str(CPP_SERVER), "-o", str(tmp), "-pthread"]
    cmd += [f"-L{d}" for d in lib_dirs] + ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"]
    cmd += [f"-Wl,-rpath,{d}" for d in lib_dirs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BlockpruneError(f"building the {what} RPC server failed:\n{proc.stderr[-2000:]}", hint)
    os.replace(tmp, exe)
    return exe


def _digest(*parts: str) -> str:
    h = hashlib.sha256(CPP_SERVER.read_bytes())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:12]


def toolchain(arch: str) -> tuple[str, Path, list[Path], str]:
    """(compiler, include dir, runtime library dirs, fix hint) for programs that run on ``arch``.

    aarch64 on an x86 host: the cross compiler and the aarch64 runtime from PyPI's wheels;
    this host's arch: g++ and the installed wheels' runtime.
    """
    if arch == "aarch64" and host_arch() != "aarch64":
        cxx = shutil.which(AARCH64_CROSS_CXX)
        if cxx is None:
            raise BlockpruneError(f"cross compiler {AARCH64_CROSS_CXX} is not on PATH",
                                  f"install it: apt-get install {AARCH64_CROSS_PACKAGE}")
        rt = ensure_aarch64_runtime()
        return cxx, rt / "include", [rt / "lib"], "check g++-aarch64-linux-gnu and libc6-dev-arm64-cross"
    if arch != host_arch():
        raise BlockpruneError(f"cannot build programs for {arch} on this {host_arch()} host",
                              "build them for this host or for aarch64")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BlockpruneError("no C++ compiler (g++) on PATH", "apt-get install g++")
    include, libs = host_runtime_dirs()
    return cxx, include, libs, "check g++ and the installed apache-tvm wheels"


def build_server(arch: str | None = None) -> Path:
    """The server executable for ``arch`` (``x86_64`` = this host, or ``aarch64``), cached by
    source hash (and, for the host, by the runtime it links)."""
    arch = arch or host_arch()
    cxx, include, libs, hint = toolchain(arch)
    if arch == "aarch64" and host_arch() != "aarch64":
        runtime = libs[0].parent
        exe = runtime / "bin" / f"bp_rpc_server-{_digest(str(runtime))}"
        return _build(cxx, include, libs, exe, "aarch64", hint)
    key = "|".join(str(p.resolve()) for p in [include, *libs])
    key += "|" + "|".join(str((d / n).stat().st_mtime_ns) for d, n in ((libs[0], "libtvm_runtime.so"),
                                                                     (libs[1], "libtvm_ffi.so")))
    cache = Path(tempfile.gettempdir()) / f"blockprune-rpc-server-{os.getuid()}"
    exe = cache / f"bp_rpc_server-{arch}-{_digest(key)}"
    return _build(cxx, include, libs, exe, arch, hint)


class RPCServer:
    """A running server process; ``stop()`` (or leaving the ``with`` block) always ends it."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, arch: str, work_dir: Path) -> None:
        self.proc, self.port, self.log_path, self.arch, self.work_dir = proc, port, log, arch, work_dir
        self.host = "127.0.0.1"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = 5.0) -> int:
        """End the server (if it has not already) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> "RPCServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(arch: str | None = None, port: int = 0, key: str = "", max_sessions: int = 1,
                 timeout: float = 600, startup_timeout: float = 60) -> RPCServer:
    """Build (once) and start the server for ``arch``; aarch64 runs under qemu-aarch64 on x86.

    Returns once it listens; ``port=0`` lets it pick a free port (``RPCServer.port``).
    """
    arch = arch or host_arch()
    exe = build_server(arch)
    cmd = [str(exe)]
    env = dict(os.environ)
    if arch != host_arch():
        cmd = [find_qemu(), str(exe)]
        env["QEMU_LD_PREFIX"] = QEMU_LD_PREFIX
    work_dir = Path(tempfile.mkdtemp(prefix="bp-rpc-server-"))
    cmd += ["--port", str(port), "--max-sessions", str(max_sessions), "--timeout", str(timeout),
            "--work-dir", str(work_dir)]
    if key:
        cmd += ["--key", key]
    log = work_dir / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
    server = RPCServer(proc, 0, log, arch, work_dir)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline().decode(errors="replace")),
                              daemon=True)
    reader.start()
    reader.join(startup_timeout)
    match = _LISTEN_RE.search(line[0]) if line else None
    if match is None:
        status = proc.poll()
        if status is None and line and not line[0]:  # stdout closed: it is exiting, reap it
            try:
                status = proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        text = server.log()
        server.stop()
        why = f"exited with status {status}" if status is not None else f"did not listen within {startup_timeout:g} s"
        raise BlockpruneError(f"the {arch} RPC server {why}:\n{text[-2000:]}",
                              "for aarch64 check qemu-user and libc6-dev-arm64-cross; "
                              "for the host, the installed apache-tvm wheels")
    server.port = int(match.group(1))
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m blockprune.backends.tvm.runtime.rpc_server [--arch aarch64] [--port P] ...``: serve in the
    foreground until the sessions are used up or the timeout."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=None, help="x86_64 (this host, default) or aarch64 (under qemu)")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--key", default="")
    ap.add_argument("--max-sessions", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    srv = start_server(args.arch, args.port, args.key, args.max_sessions, args.timeout)
    print(f"serving on 127.0.0.1:{srv.port} ({srv.arch}); ctrl-c stops it", flush=True)
    try:
        return srv.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        srv.stop()


if __name__ == "__main__":
    raise SystemExit(main())
