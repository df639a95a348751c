"""``blockprune verify`` and the GPU side of ``compile``/``run``/``bench`` (mobile GPUs over OpenCL).

Wired into ``blockprune/cli.py`` by one line *after* ``add_backend_parsers(sub)``::

    from blockprune.backends.tvm.gpu_cli import add_gpu_parsers; add_gpu_parsers(sub)

Why wrap rather than add commands: ``compile --target mali`` should be the same command as for
a CPU, so this adds the GPU options to the existing ``compile`` parser and routes GPU targets
(``mali``, ``adreno``, an OpenCL JSON dict) to :mod:`.gpu_compile`; ``bench --rpc`` on a GPU
artifact times it on the board's ``cl`` device; ``run`` of a GPU artifact says why it cannot
run here (no OpenCL TVM runtime) instead of failing inside the aarch64 runner.
"""

from __future__ import annotations

import argparse
from typing import Callable

from blockprune.errors import BlockpruneError


def cmd_verify(args: argparse.Namespace) -> int:
    """Print the per-kernel PoCL-vs-CPU table, then the whole-model run vs onnxruntime; exit 1 when either is off."""
    from blockprune.console import console

    from blockprune.backends.tvm.verify.gpu_verify import verify_artifact_kernels

    with console.status(f"verifying the OpenCL kernels of {args.source} on PoCL"
                        + ("" if args.no_end_to_end else ", then the whole model against onnxruntime")):
        report = verify_artifact_kernels(args.source, args.target, batch=args.batch, seq=args.seq,
                                         rtol=args.rtol, atol=args.atol, end_to_end=not args.no_end_to_end,
                                         e2e_rtol=args.e2e_rtol)
    print(report.table())
    bad = report.failed
    console.print(f"{len(report.rows) - len(bad)}/{len(report.rows)} kernels for {report.target} match the CPU "
                  f"reference (tolerance {args.atol:g} + {args.rtol:g} * max|reference|)")
    if report.missing:
        console.print(f"kernels in kernels.cl that were not verified: {', '.join(report.missing)}")
    run = report.model_run
    if run is not None:
        print(run.table())
        console.print(run.summary())
        first = run.first_departure()
        if not run.ok and first is not None:
            console.print(f"first call departing from its CPU reference: #{first.index} {first.func} "
                          f"(max |diff| {first.max_abs_diff:.3g})")
    return 0 if report.ok else 1


def cmd_gpu_compile(args: argparse.Namespace) -> int:
    from blockprune.console import console

    from blockprune.backends.tvm.pipeline.gpu_compile import compile_gpu_model

    with console.status(f"compiling {args.model} for {args.target} (OpenCL, batch {args.batch}, seq {args.seq})"):
        res = compile_gpu_model(args.model, args.output, target=args.target, batch=args.batch, seq=args.seq,
                                gpu_break_even=args.gpu_break_even, dense_block=args.bsr_block)
    m = res.manifest
    bsr = [layer for layer in m.layers if layer["form"] == "bsr"]
    sizes = ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in res.sizes.items())
    console.print(f"wrote {res.directory} for {m.target_name} (OpenCL, aarch64 host): {len(bsr)} block-sparse "
                  f"layers in {m.kernels} BSR kernels, {len(m.layers) - len(bsr)} dense layers, "
                  f"{res.kernel_count} OpenCL kernels ({sizes})")
    return 0


def _gpu_artifact(path: str) -> bool:
    from pathlib import Path

    from blockprune.backends.tvm.runtime.artifact import MANIFEST, Manifest
    from blockprune.backends.tvm.pipeline.gpu_compile import is_gpu_artifact

    if not (Path(path) / MANIFEST).is_file():
        return False
    try:
        return is_gpu_artifact(Manifest.read(path))
    except BlockpruneError:
        return False


def _compile_dispatch(cpu: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        from blockprune.backends.tvm.pipeline.gpu_compile import is_gpu_target

        return cmd_gpu_compile(args) if is_gpu_target(args.target) else cpu(args)

    return run


def _run_dispatch(cpu: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        if _gpu_artifact(args.artifact):
            raise BlockpruneError(
                f"{args.artifact} is an OpenCL artifact: no TVM runtime with OpenCL is available on this host",
                f"check its kernels with: blockprune verify {args.artifact}; time it on a board with "
                f"blockprune bench {args.artifact} --rpc HOST:PORT (docs/opencl-rpc.md)")
        return cpu(args)

    return run


def _bench_dispatch(cpu: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        if not _gpu_artifact(args.artifact):
            return cpu(args)
        if not args.rpc:
            raise BlockpruneError(f"{args.artifact} is an OpenCL artifact for a phone GPU; timing it here says nothing",
                                  f"bench it on the board: blockprune bench {args.artifact} --rpc HOST:PORT")
        import json

        from blockprune.console import console

        from blockprune.backends.tvm.cli import _parse_rpc
        from blockprune.backends.tvm.pipeline.gpu_compile import bench_rpc_gpu

        host, port = _parse_rpc(args.rpc)
        times = bench_rpc_gpu(args.artifact, host, port, number=args.number, repeat=args.repeat)
        ms = sorted(t * 1e3 for t in times)
        console.print(f"{args.artifact} over RPC at {args.rpc} (OpenCL): median {ms[len(ms) // 2]:.3f} ms, "
                      f"min {ms[0]:.3f} ms ({args.repeat} x {args.number} calls)")
        if args.json:
            print(json.dumps({"artifact": args.artifact, "where": f"rpc {args.rpc} cl", "seconds": times}))
        return 0

    return run


def add_gpu_parsers(sub) -> None:
    """Add ``verify``; extend ``compile``/``run``/``bench`` (if already added) for GPU targets."""
    from blockprune.backends.tvm.pipeline.gpu_compile import DEFAULT_GPU_BREAK_EVEN

    v = sub.add_parser("verify", help="run every OpenCL kernel of a GPU build on PoCL against the CPU, then the whole "
                                           "model call by call against onnxruntime")
    v.add_argument("source", help="artifact directory from compile --target mali|adreno, or an ONNX model")
    v.add_argument("--target", default=None, help="mali or adreno (required for a model; checked for an artifact)")
    v.add_argument("--batch", type=int, default=None, help="static batch size for a model (default 1)")
    v.add_argument("--seq", type=int, default=None, help="static sequence length for a model (default 128)")
    v.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max|reference| (default 1e-4)")
    v.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    v.add_argument("--e2e-rtol", type=float, default=None,
                   help="whole-model run: tolerance per output relative to max|onnxruntime output| (default 1e-4)")
    v.add_argument("--no-end-to-end", action="store_true",
                   help="kernels only: skip running the whole build on PoCL against onnxruntime")
    v.set_defaults(func=cmd_verify)

    choices = getattr(sub, "choices", {})
    if "compile" in choices:
        c = choices["compile"]
        c.add_argument("--gpu-break-even", type=float, default=DEFAULT_GPU_BREAK_EVEN, metavar="DENSITY",
                       help="GPU targets (mali, adreno): block-sparse layers denser than this run dense "
                            f"(default {DEFAULT_GPU_BREAK_EVEN})")
        c.set_defaults(func=_compile_dispatch(c.get_default("func")))
    if "run" in choices:
        choices["run"].set_defaults(func=_run_dispatch(choices["run"].get_default("func")))
    if "bench" in choices:
        choices["bench"].set_defaults(func=_bench_dispatch(choices["bench"].get_default("func")))
