"""Time an artifact on a remote board through TVM RPC (``tvm.rpc``): upload, load, time ``main``.

Why RPC: timings of an ARM artifact under qemu say nothing; the board runs TVM's small RPC
server and the host drives it (tvm-notes: upload, load_module, time_evaluator and a Relax VM
over RPC all work).
"""

from __future__ import annotations

import os
from pathlib import Path

from blockprune.errors import BlockpruneError

from .runner import check_artifact, check_inputs, default_feeds


def connect(host: str, port: int):
    from tvm import rpc

    try:
        return rpc.connect(host, port, session_timeout=0)
    except Exception as err:  # tvm raises TVMError / RPCError with a long message
        raise BlockpruneError(f"cannot connect to a TVM RPC server at {host}:{port} ({str(err).splitlines()[0]})",
                              "start one on the board: python -m tvm.exec.rpc_server --host 0.0.0.0 "
                              f"--port {port}") from None


def bench_rpc(directory: str | os.PathLike, host: str, port: int, number: int = 10,
              repeat: int = 5) -> list[float]:
    """Seconds per call of ``main`` on the remote device."""
    import tvm
    from tvm import relax

    manifest = check_artifact(directory)
    arrays = check_inputs(manifest, default_feeds(manifest))
    remote = connect(host, port)
    lib_path = Path(directory) / manifest.library
    remote_name = f"blockprune_{manifest.target_name}_{os.getpid()}.so"
    remote.upload(str(lib_path), target=remote_name)
    rlib = remote.load_module(remote_name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    vm.set_input("main", *[tvm.runtime.tensor(a, dev) for a in arrays])
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
    return list(timer("main").results)
