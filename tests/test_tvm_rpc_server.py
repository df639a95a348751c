"""Our minimal C++ TVM RPC server (cpp/rpc_server.cc): built for x86 and for aarch64 (qemu).

The host drives it like a board: tvm.rpc.connect -> upload -> load_module -> Relax VM
(rpc.run_rpc, outputs checked against onnxruntime within 1e-4) and time_evaluator
(rpc.bench_rpc). Each server listens on loopback only, is bounded (sessions, timeout) and is
stopped at the end of its test whatever happens.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.runtime import rpc_server  # noqa: E402
from blockprune.backends.tvm.pipeline.compile import compile_model  # noqa: E402
from blockprune.backends.tvm.runtime.rpc import bench_rpc, connect, run_rpc  # noqa: E402
from blockprune.backends.tvm.runtime.runner import QEMU_LD_PREFIX, compare_with_onnx  # noqa: E402
from blockprune.backends.tvm.targets.presets import AARCH64_CROSS_CXX, QEMU_AARCH64  # noqa: E402

BATCH, SEQ, ATOL = 2, 16, 1e-4
RPC_MAGIC = 0xFF271


@pytest.fixture(scope="module")
def tiny(exports):
    return exports("bert-tiny", "legacy", "encoder")[1].model


@pytest.fixture(scope="module")
def x86_art(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rpc-x86") / "art"
    compile_model(tiny, out, target="x86-64", batch=BATCH, seq=SEQ)
    return out


def _aarch64_missing() -> str | None:
    for tool, pkg in ((AARCH64_CROSS_CXX, "g++-aarch64-linux-gnu"), (QEMU_AARCH64, "qemu-user")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {pkg})"
    if not Path(QEMU_LD_PREFIX).is_dir():
        return f"{QEMU_LD_PREFIX} is missing (apt-get install libc6-dev-arm64-cross)"
    try:
        rpc_server.ensure_aarch64_runtime()
    except BlockpruneError as err:
        return f"aarch64 TVM runtime unavailable: {err}"
    return None


@pytest.fixture(scope="module")
def a72_art(tiny, tmp_path_factory):
    why = _aarch64_missing()
    if why:
        print(f"SKIP aarch64 RPC server: {why}")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("rpc-a72") / "art"
    compile_model(tiny, out, target="cortex-a72", batch=BATCH, seq=SEQ)
    return out


def _serve_and_check(arch, artifact, model, sessions_timeout=240):
    # two sessions: one runs main and fetches outputs, one times it
    with rpc_server.start_server(arch, max_sessions=2, timeout=sessions_timeout) as srv:
        assert srv.proc.poll() is None and srv.port > 0
        result = run_rpc(artifact, srv.host, srv.port, model=model)
        diffs = compare_with_onnx(result, model)
        assert max(diffs.values()) <= ATOL, diffs
        out = result.outputs["last_hidden_state"]
        assert out.shape == (BATCH, SEQ, 64)
        times = bench_rpc(artifact, srv.host, srv.port, number=2, repeat=2)
        assert len(times) == 2 and all(t > 0 for t in times)
        # both sessions used: the server exits on its own, with status 0
        assert srv.wait(timeout=60) == 0, srv.log()
        log = srv.log()
    assert srv.proc.returncode == 0
    assert log.count("load_module") == 2 and "session 2 finished" in log, log
    assert "error" not in log.lower(), log


def test_x86_server_runs_vm_and_time_evaluator(x86_art, tiny):
    _serve_and_check("x86_64", x86_art, tiny)


def test_aarch64_server_under_qemu(a72_art, tiny):
    _serve_and_check("aarch64", a72_art, tiny)


def test_server_bounds_and_handshake(x86_art):
    """Loopback only; not-TVM peers and wrong keys are turned away (and do not use up a
    session); the global timeout ends a server that nobody uses."""
    with rpc_server.start_server("x86_64", key="bp", max_sessions=1, timeout=60) as srv:
        # a peer that is not a TVM client: dropped
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.sendall(struct.pack("<i", 1234))
            assert s.recv(4) == b""
        # a TVM client with the wrong key: told "mismatch"
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            key = b"client:other"
            s.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            assert struct.unpack("<i", s.recv(4))[0] == RPC_MAGIC + 2
        with pytest.raises(BlockpruneError, match="cannot connect"):
            connect(srv.host, srv.port)  # empty key != "bp"
        # the right key still gets the one session
        from tvm import rpc

        remote = rpc.connect(srv.host, srv.port, key="bp", session_timeout=0)
        assert remote.cpu().exist
        del remote
        assert srv.wait(timeout=30) == 0, srv.log()
    # loopback only (the listening socket is bound to 127.0.0.1); an idle server times out (status 3)
    with rpc_server.start_server("x86_64", max_sessions=1, timeout=2) as idle:
        out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
        if out:
            listening = [line for line in out.splitlines() if f":{idle.port} " in line]
            assert listening and all("127.0.0.1:" in line for line in listening), listening
        assert idle.wait(timeout=30) == 3  # timed out
        assert "timeout" in idle.log()


def test_start_failure_is_reported_and_cleaned_up():
    """A port that is taken: a clear error, and no process left behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(BlockpruneError, match="exited with status 1"):
            rpc_server.start_server("x86_64", port=port, timeout=30)


@pytest.mark.parametrize("arch,target", [("x86_64", "x86-64"), ("aarch64", "cortex-a72")])
def test_calibrate_and_plan_over_rpc(arch, target, exports, tmp_path):
    """`calibrate --rpc` / `plan --rpc`: kernels compiled here for the target, checked and timed on
    the server (aarch64 under qemu: the mechanics, not the speed), one session for the sweep; the
    plan then says its Linear times are measured on the board, and re-planning reads the cache."""
    from blockprune.backends.tvm.cost.calibrate import calibrate
    from blockprune.plan.plan_api import PlanRequest, make_plan

    if arch == "aarch64":
        why = _aarch64_missing()
        if why:
            pytest.skip(why)
    with rpc_server.start_server(arch, max_sessions=2, timeout=300) as srv:
        address = f"{srv.host}:{srv.port}"
        table = calibrate([(64, 128)], blocks=["16x1"], densities=[1.0, 0.5], target=target, m=16, runs=2,
                          progress=False, rpc=address)
        assert table.target == target and table.machine.startswith(f"rpc://{address}")
        assert table.isa == ("neon" if arch == "aarch64" else table.isa)
        (e,) = table.entries
        assert e.dense_ms > 0 and set(e.sweep_ms) == {"1", "0.5"} and all(t > 0 for t in e.sweep_ms.values())
        model = exports.path("bert-tiny")
        req = PlanRequest(str(model), str(tmp_path / "plan.yaml"), target=target, rpc=address,
                          latency_ms=100.0, blocks=("16x1",), examples=8, sensitivity_ratios=(0.5, 0.9),
                          ratios=(0.0, 0.5, 0.9), seq=16)
        res = make_plan(req, log=None)
        assert srv.wait(timeout=60) == 0, srv.log()  # both sessions used, the server ended cleanly
    info = res.info
    assert info["measured"] is True and f"RPC at {address}" in info["cost_model"]
    assert (tmp_path / "plan.board.json").is_file()
    again = make_plan(req, log=None)  # the server is gone: the board table comes from the cache
    assert again.info["cost_model"] == info["cost_model"] and again.layers == res.layers
    if arch == "aarch64":
        assert any("analytic" in a for a in info["assumptions"])
