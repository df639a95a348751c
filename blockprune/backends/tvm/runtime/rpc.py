"""Time an artifact on a remote board through TVM RPC (``tvm.rpc``): upload, load, time ``main``.

Why RPC: timings of an ARM artifact under qemu say nothing; the board runs TVM's small RPC
server and the host drives it (tvm-notes: upload, load_module, time_evaluator and a Relax VM
over RPC all work).
"""

from __future__ import annotations

import os
from pathlib import Path

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds


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


def run_rpc(directory: str | os.PathLike, host: str, port: int, inputs=None, model=None) -> "RunResult":
    """Run ``main`` once on the remote device and fetch its outputs (to check them on the host).

    ``inputs``: a dict of arrays, or None for random valid inputs (``model`` makes them
    vocabulary-aware). Uses set_input/invoke_stateful/get_outputs, the VM calls that work over RPC
    whatever ``main`` returns (a tensor or a tuple).
    """
    import gc
    import time

    import tvm
    from tvm import relax

    from blockprune.backends.tvm.runtime.runner import RunResult

    manifest = check_artifact(directory)
    feeds = default_feeds(manifest, model) if inputs is None else dict(inputs)
    arrays = check_inputs(manifest, feeds)
    remote = connect(host, port)
    remote_name = f"blockprune_{manifest.target_name}_{os.getpid()}.so"
    remote.upload(str(Path(directory) / manifest.library), target=remote_name)
    rlib = remote.load_module(remote_name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    t = time.perf_counter()
    vm.set_input("main", *[tvm.runtime.tensor(a, dev) for a in arrays])
    vm.invoke_stateful("main")
    ret = vm.get_outputs("main")
    seconds = time.perf_counter() - t
    items = list(ret) if isinstance(ret, tuple) else [ret]
    outs = {spec["name"]: item.numpy() for spec, item in zip(manifest.outputs, items)}
    # get_outputs' recursive closure makes a reference cycle that holds the VM, and through it
    # the session: collect it now so the session closes here (a sequential server waits on it)
    del ret, items, vm, rlib, remote
    gc.collect()
    return RunResult(outs, seconds, f"rpc://{host}:{port}",
                     {spec["name"]: a for spec, a in zip(manifest.inputs, arrays)})
