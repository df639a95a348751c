"""``calibrate --rpc HOST:PORT``: the break-even sweep timed on a board through TVM RPC.

Why: a cross target's kernels cannot run here, and timings under qemu mean nothing; the analytic
model (``cost.model.AnalyticCost``) is a guess until a board confirms it. With a board running a
TVM RPC server (ours: ``blockprune bundle``'s ``bp_rpc_server``, or ``python -m
tvm.exec.rpc_server``), each kernel the sweep needs is compiled *here* for the target (and
cross-linked for aarch64), uploaded, loaded and timed *there* with TVM's ``time_evaluator``; its
output is fetched once and checked against numpy first, so a table never holds the time of a
wrong kernel. One RPC session serves the whole sweep (a bounded server counts sessions).
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from blockprune.errors import BlockpruneError


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with one clear error for anything else."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BlockpruneError(f"--rpc {text!r} is not HOST:PORT",
                              "give the board's RPC server address, e.g. --rpc 192.168.1.20:9090")
    return host, int(port)


class RemoteTimer:
    """Times kernels compiled for ``preset`` on the device behind one RPC session."""

    def __init__(self, address: str, preset: Any, number: int = 10, repeat: int = 5) -> None:
        from blockprune.backends.tvm.runtime.rpc import connect

        self.address = address
        self.host, self.port = parse_address(address)
        self.preset = preset
        self.number, self.repeat = number, repeat
        self.remote = connect(self.host, self.port)
        self.dev = self.remote.cpu()
        self._tmp = tempfile.TemporaryDirectory(prefix="bp-calibrate-rpc-")
        self._count = 0

    def _upload(self, executable: Any) -> Any:
        from blockprune.backends.tvm.targets.presets import export_fcompile

        self._count += 1
        name = f"bp_calibrate_{os.getpid()}_{self._count}.so"
        path = Path(self._tmp.name) / name
        fcompile = export_fcompile(self.preset)
        if fcompile is None:
            executable.export_library(str(path))
        else:
            executable.export_library(str(path), fcompile=fcompile)
        self.remote.upload(str(path), target=name)
        path.unlink()
        return self.remote.load_module(name)

    def _median(self, timer_results) -> float:
        return float(np.median(list(timer_results)))

    def dense_seconds(self, wt: np.ndarray, x: np.ndarray) -> float:
        """The dense Linear ``x @ wt`` as the project compiles it (Relax VM), timed on the board."""
        import tvm
        from tvm import relax

        from blockprune.backends.tvm.cost.calibrate import dense_matmul_executable

        rlib = self._upload(dense_matmul_executable(wt, x.shape, self.preset))
        vm = relax.VirtualMachine(rlib, self.dev)
        vm.set_input("main", tvm.runtime.tensor(x, self.dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        _check(out.numpy(), x @ wt, "dense matmul")
        timer = vm.time_evaluator("invoke_stateful", self.dev, number=self.number, repeat=self.repeat)
        seconds = self._median(timer("main").results)
        del out, vm, rlib
        gc.collect()  # get_outputs leaves a cycle that holds the remote module
        return seconds

    def bsr_seconds(self, w: np.ndarray, x: np.ndarray, block: str) -> float:
        """Our BSR kernel for ``W[n, k]`` (``block``), timed on the board."""
        import tvm

        from blockprune.backends.tvm.kernels.bsr_kernel import build_bsr_kernel, kernel_arrays
        from blockprune.bsr import dense_to_bsr

        bsr = dense_to_bsr(w, block)
        kernel = build_bsr_kernel(x.shape, w.shape[0], block, target=self.preset)
        mod = self._upload(kernel.executable)
        args = [tvm.runtime.tensor(a, self.dev) for a in [np.ascontiguousarray(x)] + kernel_arrays(bsr, kernel.schedule)]
        y = tvm.runtime.tensor(np.zeros(kernel.spec.y_shape, dtype=np.float32), self.dev)
        mod[kernel.name](*args, y)
        _check(y.numpy(), x @ w.T, f"BSR {block} kernel")
        timer = mod.time_evaluator(kernel.name, self.dev, number=self.number, repeat=self.repeat)
        return self._median(timer(*args, y).results)

    def machine(self) -> str:
        return f"rpc://{self.address} ({self.preset.name}, {self.preset.arch})"

    def close(self) -> None:
        self.remote = None
        gc.collect()
        self._tmp.cleanup()


def _check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = float(np.abs(got.reshape(want.shape) - want).max())
    if not err <= 1e-2 * max(1.0, float(np.abs(want).max())):
        raise BlockpruneError(f"the {what} run over RPC differs from numpy by {err:.3g}",
                              "check that the board's TVM runtime matches this host's (apache-tvm version), "
                              "then report it: the table would hold a wrong kernel's time")


__all__ = ["RemoteTimer", "parse_address"]
