"""``blockprune compile | run | bench``: the TVM CPU backend on the command line.

Wired into ``blockprune/cli.py`` by ``add_backend_parsers(sub)``. Handlers import TVM lazily so
``blockprune --help`` stays fast; errors are ``BlockpruneError`` (exit 2 in the main CLI).
"""

from __future__ import annotations

import argparse
import json

from blockprune.errors import BlockpruneError


def _target_help() -> str:
    from blockprune.backends.tvm.targets.presets import preset_names

    return f"one of {', '.join(preset_names())}, or a TVM target JSON dict (default x86-64)"


def cmd_compile(args: argparse.Namespace) -> int:
    from blockprune.console import console

    from blockprune.backends.tvm.pipeline.compile import compile_model

    with console.status(f"compiling {args.model} for {args.target} (batch {args.batch}, seq {args.seq})"):
        res = compile_model(args.model, args.output, target=args.target, batch=args.batch, seq=args.seq,
                            lower_dense_below=args.bsr_below, dense_block=args.bsr_block,
                            cross_compiler=args.cross_compiler, verify=not args.no_verify, atol=args.atol)
    m = res.manifest
    bsr = [layer for layer in m.layers if layer["form"] in ("bsr", "bsr-int8")]
    int8 = sum(1 for layer in m.layers if layer["form"].endswith("int8"))
    console.print(f"wrote {res.directory}/{m.library} + manifest.json for {m.target_name} ({m.arch}): "
                  f"{len(bsr)} block-sparse layers in {m.kernels} kernels, "
                  f"{len(m.layers) - len(bsr)} dense layers" + (f"; {int8} layers int8" if int8 else ""))
    if m.verified and m.verified.get("int8"):
        v = m.verified
        console.print(f"verified against the exact-integer int8 reference in onnxruntime ({v['how']}, {v['runs']} "
                      "input sets): " + ", ".join(f"{k} relative L2 {s['rel_l2']:.3f}, min row cosine "
                                                  f"{s['min_cosine']:.4f}" for k, s in v["int8"].items())
                      + f" (bounds {v['int8_bounds']['max_rel_l2']:g} / {v['int8_bounds']['min_row_cosine']:g})")
    elif m.verified:
        v = m.verified
        console.print(f"verified against onnxruntime on the source model ({v['how']}, {v['runs']} input sets): "
                      + ", ".join(f"{k} max |diff| {d:.2e}" for k, d in v["max_abs_diff"].items())
                      + f" (tolerance {v['atol']:g})")
    else:
        console.print("not verified (--no-verify)")
    return 0


def _parse_rpc(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise BlockpruneError(f"--rpc {text!r} is not HOST:PORT", "e.g. --rpc 192.168.1.20:9090")
    return host, int(port)


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from blockprune.console import console

    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact

    res = run_artifact(args.artifact, args.inputs, expect_target=args.target, model=args.compare)
    console.print(f"ran {args.artifact} ({res.how}) in {res.seconds * 1e3:.1f} ms")
    for name, arr in res.outputs.items():
        console.print(f"  {name}: shape {list(arr.shape)} {arr.dtype}, mean {float(np.mean(arr)):.6g}")
    if args.output:
        from blockprune.io import atomic_path

        with atomic_path(args.output, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **res.outputs)
        console.print(f"wrote outputs to {args.output}")
    if args.compare:
        diffs = compare_with_onnx(res, args.compare)
        for name, d in diffs.items():
            console.print(f"  vs onnxruntime {name}: max |diff| {d:.3e}")
        if args.atol is not None and max(diffs.values(), default=0.0) > args.atol:
            raise BlockpruneError(f"TVM and onnxruntime differ by {max(diffs.values()):.3e} > {args.atol:g}",
                                  "check the model and the target; report a bug if it persists")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from blockprune.console import console

    if args.rpc:
        from blockprune.backends.tvm.runtime.rpc import bench_rpc

        host, port = _parse_rpc(args.rpc)
        times = bench_rpc(args.artifact, host, port, number=args.number, repeat=args.repeat)
        where = f"over RPC at {args.rpc}"
    else:
        from blockprune.backends.tvm.runtime.runner import bench_artifact

        times = bench_artifact(args.artifact, number=args.number, repeat=args.repeat)
        where = "on this host"
    ms = sorted(t * 1e3 for t in times)
    console.print(f"{args.artifact} {where}: median {ms[len(ms) // 2]:.3f} ms, min {ms[0]:.3f} ms "
                  f"({args.repeat} x {args.number} calls)")
    if args.json:
        print(json.dumps({"artifact": args.artifact, "where": where, "seconds": times}))
    if getattr(args, "plan", None):
        _planned_vs_measured(args.plan, ms[len(ms) // 2])
    return 0


def _planned_vs_measured(plan_path: str, measured_ms: float) -> None:
    """The plan's predicted time (and speed-up) next to this measurement."""
    from blockprune.console import console, kv_table
    from blockprune.plan.plan_file import read_plan

    info = read_plan(plan_path).plan
    rows = [("planned", f"{info['predicted_ms']:.2f} ms on {info['target']} "
                        f"({'measured' if info['measured'] else 'analytic, unmeasured'} cost model)"),
            ("measured", f"{measured_ms:.2f} ms ({100 * (measured_ms / info['predicted_ms'] - 1):+.0f}% vs planned)")]
    if info.get("baseline_ms"):
        rows.append(("speed-up over the plan's baseline", f"planned {info['predicted_speedup']:.2f}x, measured "
                                                          f"{info['baseline_ms'] / measured_ms:.2f}x ({info['baseline']})"))
    console.print(kv_table(f"plan {plan_path}: planned vs measured", rows))


def _shape_list(text: str) -> list[tuple[int, int]]:
    from blockprune.errors import BlockpruneError

    shapes = []
    for part in text.split(","):
        try:
            out_f, in_f = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise BlockpruneError(f"layer shape {part!r} is not OUTxIN", "e.g. --shapes 3072x768,768x3072,768x768")
        shapes.append((out_f, in_f))
    return shapes


def cmd_calibrate(args: argparse.Namespace) -> int:
    from blockprune.backends.tvm.cost.calibrate import calibrate
    from blockprune.console import console, kv_table

    if args.model:
        from blockprune.onnx_io import load_onnx
        from blockprune.passes.find_weights import find_weights, require_weights

        shapes = sorted({w.shape for w in require_weights(find_weights(load_onnx(args.model)))})
    else:
        shapes = _shape_list(args.shapes)
    table = calibrate(shapes, blocks=args.blocks.split(","), densities=[float(d) for d in args.densities.split(",")],
                      target=args.target, m=args.m, runs=args.runs, rpc=args.rpc)
    table.save(args.output)
    rows = [(f"{e.n}x{e.k} {e.block}", "never faster than dense" if e.density is None else
             f"break-even density {e.density:.2f} (dense {e.dense_ms:.3f} ms)") for e in table.entries]
    console.print(kv_table(f"break-even densities on {table.target} (M={table.m}) -> {args.output}", rows))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from blockprune.backends.tvm.runtime.bundle import bundle
    from blockprune.console import console

    out = bundle(args.artifact, args.output)
    console.print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def _static_dim(what: str):
    """argparse type for --batch/--seq: a positive integer; 'dynamic' etc. get one clear error."""

    def parse(text: str) -> int:
        from blockprune.backends.tvm.onnx_import.compile_checks import static_dim

        return static_dim(text, what)

    return parse


def add_backend_parsers(sub) -> None:
    """Add ``compile``, ``run``, ``bench`` and ``calibrate`` to the main CLI's subparsers."""
    k = sub.add_parser("calibrate", help="measure per-shape break-even densities (BSR vs dense) on this machine")
    k.add_argument("-o", "--output", required=True, help="JSON for `blockprune compress --break-even-file`")
    k.add_argument("--target", default="host", help="a target this machine runs natively (default host), or any preset with --rpc")
    k.add_argument("--model", help="take the layer shapes from this ONNX model")
    k.add_argument("--shapes", default="3072x768,768x3072,768x768", help="OUTxIN list (default BERT-base)")
    k.add_argument("--blocks", default="1x32,16x1,4x4,32x32")
    k.add_argument("--densities", default="1.0,0.8,0.6,0.5,0.4,0.3,0.2,0.1")
    k.add_argument("--m", type=int, default=128, help="rows of the activation (batch x sequence)")
    k.add_argument("--runs", type=int, default=10, help="timed runs per point (median of process CPU time)")
    k.add_argument("--rpc", metavar="HOST:PORT", help="time on a board through its TVM RPC server (kernels compiled "
                                                      "here for --target, e.g. cortex-a72)")
    k.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bundle", help="artifact + C++ runner + RPC server + runtime libs, ready to copy to a board")
    b.add_argument("artifact", help="directory written by blockprune compile")
    b.add_argument("-o", "--output", required=True)
    b.set_defaults(func=cmd_bundle)

    c = sub.add_parser("compile", help="compile an ONNX model with TVM for a CPU target (x86-64, aarch64, ...)")
    c.add_argument("model", help="ONNX model: dense, compacted or block-sparse")
    c.add_argument("-o", "--output", required=True, help="artifact directory (model.so + manifest.json)")
    c.add_argument("--target", default="x86-64", help=_target_help())
    c.add_argument("--batch", type=_static_dim("batch"), default=1, help="static batch size (default 1)")
    c.add_argument("--seq", type=_static_dim("seq"), default=128, help="static sequence length (default 128)")
    c.add_argument("--no-verify", action="store_true",
                   help="publish without running the artifact against onnxruntime on the source model")
    c.add_argument("--atol", type=float, default=1e-4, help="verification tolerance, max |diff| (default 1e-4)")
    c.add_argument("--bsr-below", type=float, default=None, metavar="DENSITY",
                   help="also lower dense MatMul weights with at most this fraction of non-zero blocks to BSR")
    c.add_argument("--bsr-block", default=None, help="block shape for --bsr-below, e.g. 16x1")
    c.add_argument("--cross-compiler", default=None,
                   help="C++ compiler that links the library for a cross target (overrides the preset's)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled artifact once (aarch64 ones under qemu)")
    r.add_argument("artifact", help="directory written by blockprune compile")
    r.add_argument("--inputs", default=None, help=".npz with one array per input (default: random valid inputs)")
    r.add_argument("--compare", default=None, metavar="MODEL.onnx", help="also run onnxruntime and print max |diff|")
    r.add_argument("--atol", type=float, default=None, help="with --compare: fail when the diff exceeds this")
    r.add_argument("--target", default=None, help="refuse the artifact unless it was built for this target")
    r.add_argument("-o", "--output", default=None, help="write the outputs to this .npz")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="time a compiled artifact here, or on a board over TVM RPC")
    b.add_argument("artifact")
    b.add_argument("--rpc", default=None, metavar="HOST:PORT", help="a TVM RPC server on the target board")
    b.add_argument("--number", type=int, default=10)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--json", action="store_true", help="also print the timings as JSON")
    b.add_argument("--plan", default=None, help="plan.yaml the artifact was built from: show planned vs measured")
    b.set_defaults(func=cmd_bench)
