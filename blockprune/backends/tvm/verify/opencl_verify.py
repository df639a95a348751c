"""Run TVM-generated OpenCL kernels on PoCL and compare them with the CPU build of the same op.

Why this exists: the TVM wheels have no OpenCL runtime (built with ``USE_OPENCL=OFF``), so an
OpenCL module cannot be loaded here, and there is no phone on the build machines. What can be
checked is the generated OpenCL C itself: we lower each PrimFunc for the GPU target exactly
as ``tvm.compile`` does, take the source and, per kernel,

* the launch configuration from the TIR thread bindings (``blockIdx.*`` / ``threadIdx.*``
  extents of the device function; OpenCL global size = grid x block), cross-checked with the
  extents the host function passes to ``call_ffi_kernel``;
* the argument order from the ``__kernel`` signature in the source (TVM orders kernel
  parameters by buffer name, not as the PrimFunc declares them); arguments are matched by name
  through the host function's call;

run the kernels on PoCL (the CPU OpenCL implementation) through ``pyopencl``, and compare every
buffer with the same computation compiled for ``llvm`` (the unscheduled PrimFunc). PoCL runs
on the host CPU: its timings say nothing about a phone and are not reported as speed.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.targets.gpu_presets import GPUPreset, LaunchConfig, check_launch, resolve_gpu_target

OPENCL_INSTALL_FIX = ("install an OpenCL platform and the Python binding: "
                      "apt-get install pocl-opencl-icd ocl-icd-opencl-dev && pip install pyopencl")
_AXES = {"x": 0, "y": 1, "z": 2}
_KERNEL_RE = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{")
_LOCAL_RE = re.compile(r"__local\s+\w+\s+\w+\[(\d+)\]")
_C_SCALARS = {"int": np.int32, "uint": np.uint32, "long": np.int64, "ulong": np.uint64,
              "float": np.float32, "double": np.float64, "short": np.int16, "char": np.int8}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelCheck:
    """One row of the verification table."""

    func: str  # PrimFunc name
    kernel: str  # OpenCL kernel name
    launch: LaunchConfig
    max_abs_diff: float  # over every buffer of the PrimFunc, GPU (PoCL) vs CPU (llvm)
    tolerance: float
    pocl_ms: float  # wall time on PoCL: a smoke value, not a phone's speed

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)


def format_table(rows: list[KernelCheck]) -> str:
    """Markdown table of the checks (no timing column: PoCL time is not GPU time)."""
    lines = ["| function | kernel | grid (x,y,z) | work-group (x,y,z) | local mem | max abs diff | tolerance | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.func} | {r.kernel} | {r.launch.grid} | {r.launch.block} | {r.launch.local_bytes} B "
                     f"| {r.max_abs_diff:.2e} | {r.tolerance:.1e} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# OpenCL platform
# --------------------------------------------------------------------------------------------
def opencl_unavailable_reason() -> str | None:
    """Why no OpenCL device can be used here, or None when one can (for test skips)."""
    try:
        _opencl_context()
    except BlockpruneError as err:
        return str(err)
    return None


@functools.lru_cache(maxsize=1)
def _opencl_context():
    try:
        import pyopencl as cl
    except ImportError:
        raise BlockpruneError("pyopencl is not installed", OPENCL_INSTALL_FIX) from None
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader reports "no platforms" as an error
        platforms = []
    devices = [d for p in platforms for d in p.get_devices()]
    if not devices:
        raise BlockpruneError("no OpenCL platform found (no ICD, or no device on it)", OPENCL_INSTALL_FIX)
    ctx = cl.Context([devices[0]])
    return cl, ctx, cl.CommandQueue(ctx)


# --------------------------------------------------------------------------------------------
# Lowering: source, kernels, launches
# --------------------------------------------------------------------------------------------
@dataclass
class _Launch:
    """A kernel call in a host function: kernel name, arguments (TIR exprs) and extents."""

    kernel: str
    args: list[Any]
    extents: dict[str, Any]  # "blockIdx.x" -> host-side expression


@dataclass
class LoweredGPUModule:
    """A module lowered for an OpenCL target: source, device kernels, host launch sequences."""

    source: str
    signatures: dict[str, list[tuple[str, str]]]  # kernel -> [(c type, param name)] in order
    device_params: dict[str, list[str]]  # kernel -> device PrimFunc param names
    thread_extents: dict[str, dict[str, Any]]  # kernel -> {"threadIdx.x": expr, ...}
    launches: dict[str, list[_Launch]]  # host function -> its kernel calls, in order
    host_allocs: dict[str, dict[str, Any]] = field(default_factory=dict)  # func -> {name: buffer}
    host_bodies: dict[str, Any] = field(default_factory=dict)  # func -> host TIR body (walked at run time)


def _fields(obj) -> list[str]:
    info, names = type(obj).__tvm_ffi_type_info__, []
    while info is not None:
        names += [f.name for f in info.fields]
        info = info.parent_type_info
    return names


def _walk(stmt, visit: Callable[[Any], None]) -> None:
    """Pre-order walk over TIR statements (the Python API has no stmt visitor in 0.27)."""
    from tvm import tirx

    visit(stmt)
    for name in _fields(stmt):
        if name == "span":
            continue
        value = getattr(stmt, name)
        if isinstance(value, tirx.Stmt):
            _walk(value, visit)
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
            for item in value:
                if isinstance(item, tirx.Stmt):
                    _walk(item, visit)


def _with_symbols(mod):
    """Give every PrimFunc a global symbol (Relax-legalized ones are private otherwise)."""
    import tvm

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            if func.attrs is None or "global_symbol" not in func.attrs:
                func = func.with_attr("global_symbol", gv.name_hint)
            funcs[gv.name_hint] = func
    return tvm.IRModule(funcs)


def distinct_names(names: list[str]) -> list[str]:
    """``["lv", "T", "T", "T"]`` -> ``["lv", "T", "T_1", "T_2"]``: TVMScript's renaming of repeated names.

    Why: TIR lets several parameters share a name (``topi.split`` names every output ``T_split``),
    while this harness matches arrays, OpenCL buffers and kernel arguments by name; left alone,
    every output of such a function would alias one buffer on both sides of the comparison.
    """
    seen: set[str] = set()
    out = []
    for name in names:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}_{k}"
        seen.add(new)
        out.append(new)
    return out


def _renamed_params(func, gv_name: str):
    """``func`` with repeated parameter names made distinct (:func:`distinct_names`), unchanged otherwise.

    Renaming goes through TVMScript (its printer gives each variable a distinct name), and the
    result must be structurally equal to ``func`` (names do not count) with the expected names;
    anything else is refused rather than verified with aliased buffers.
    """
    import tvm

    names = [p.name for p in func.params]
    if len(set(names)) == len(names):
        return func
    want = distinct_names(names)
    try:
        renamed = tvm.script.from_source(func.script())
        tvm.ir.assert_structural_equal(func, renamed)
    except Exception as err:  # noqa: BLE001 - any failure means the buffers cannot be told apart
        raise BlockpruneError(f"{gv_name} has repeated parameter names {names} and could not be renamed for "
                              f"the PoCL check ({type(err).__name__})", "report the model; this is a harness "
                              "limit, the compiled artifact is not affected") from None
    if [p.name for p in renamed.params] != want:
        raise BlockpruneError(f"{gv_name}: renaming its repeated parameters gave {[p.name for p in renamed.params]}, "
                              f"expected {want}", "report the model; this is a harness limit")
    return renamed


def with_distinct_param_names(mod):
    """``mod`` with every PrimFunc's parameters distinctly named (see :func:`distinct_names`).

    Verified functions, their lowering and the arrays fed to them must all come from this form,
    so that each parameter is its own buffer on PoCL and in the CPU reference.
    """
    import tvm

    funcs = {}
    for gv, func in mod.functions.items():
        funcs[gv] = _renamed_params(func, gv.name_hint) if isinstance(func, tvm.tirx.PrimFunc) else func
    changed = any(funcs[gv] is not func for gv, func in mod.functions.items())
    return tvm.IRModule(funcs, attrs=mod.attrs) if changed else mod


def _binds_threads(func) -> bool:
    """True when a PrimFunc has a blockIdx/threadIdx binding (loop or launch attribute)."""
    import tvm

    found = []

    def visit(node):
        if isinstance(node, tvm.tirx.AttrStmt) and node.attr_key == "thread_extent":
            found.append(node)
        elif isinstance(node, tvm.tirx.For) and node.thread_binding is not None:
            found.append(node)

    _walk(func.body, visit)
    return bool(found)


def lower_for_opencl(mod, target: "GPUPreset | str | Any" = "mali") -> LoweredGPUModule:
    """Lower ``mod`` (GPU-scheduled PrimFuncs) the way ``tvm.compile`` does; keep the pieces."""
    import tvm
    from tvm.tirx.build import codegen_build, split_host_device_mods

    unbound = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and not _binds_threads(f)]
    if unbound:
        raise BlockpruneError(
            f"cannot derive the launch configuration of {', '.join(repr(n) for n in unbound)}: "
            "no blockIdx/threadIdx binding",
            "schedule it for the GPU (dlight rules or thread bindings) before verifying it",
        )

    tgt = resolve_gpu_target(target).target()
    mod = tvm.tirx.transform.BindTarget(tgt)(_with_symbols(with_distinct_param_names(mod)))
    # tvm.compile's choice ("default", the s_tir pipeline) for every OpenCL device
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("default")
    host, devices = split_host_device_mods(pipeline(mod))
    sources, params, extents = [], {}, {}
    for dev_target, dev_mod in devices.items():
        dev_mod = finalize_device()(dev_mod)
        sources.append(codegen_build(dev_mod, dev_target).inspect_source("cl"))
        for gv, func in dev_mod.functions.items():
            params[gv.name_hint] = [p.name for p in func.params]
            ext: dict[str, Any] = {}

            def visit(node, ext=ext):
                if isinstance(node, tvm.tirx.AttrStmt) and node.attr_key == "thread_extent":
                    ext[node.node.var.name] = node.value

            _walk(func.body, visit)
            extents[gv.name_hint] = ext
    launches: dict[str, list[_Launch]] = {}
    allocs: dict[str, dict[str, Any]] = {}
    bodies: dict[str, Any] = {}
    for gv, func in host.functions.items():
        calls: list[_Launch] = []
        buffers: dict[str, Any] = {}

        def visit(node, calls=calls, buffers=buffers):
            if isinstance(node, tvm.tirx.Evaluate) and isinstance(node.value, tvm.ir.Call):
                call = node.value
                if getattr(call.op, "name", "") == "tirx.call_ffi_kernel":
                    names = list(call.attrs.launch_params)
                    args = list(call.args)
                    n_ext = len(names)
                    calls.append(_Launch(str(args[0].value), args[1:len(args) - n_ext],
                                         dict(zip(names, args[len(args) - n_ext:]))))
            if type(node).__name__ == "AllocBuffer":
                buffers[node.buffer.name] = node.buffer

        _walk(func.body, visit)
        if calls:
            launches[gv.name_hint] = calls
            allocs[gv.name_hint] = buffers
            bodies[gv.name_hint] = func.body
    source = "\n".join(sources)
    signatures = {name: _parse_params(text) for name, text in _KERNEL_RE.findall(source)}
    return LoweredGPUModule(source, signatures, params, extents, launches, allocs, bodies)


def _parse_params(text: str) -> list[tuple[str, str]]:
    """``__global float* restrict X_ptr, int n`` -> [("float*", "X_ptr"), ("int", "n")]."""
    out = []
    for part in text.split(","):
        tokens = part.replace("*", " * ").split()
        if not tokens:
            continue
        name = tokens[-1]
        ctype = [t for t in tokens[:-1] if t not in ("__global", "global", "restrict", "const", "__constant")]
        out.append(("".join(ctype), name))
    return out


def _kernel_source(source: str, kernel: str) -> str:
    """The body of one kernel (for its __local arrays)."""
    start = source.find(f"__kernel void {kernel}(")
    body = source.find("{", start)
    nxt = source.find("__kernel void", body)
    return source[body:nxt if nxt >= 0 else len(source)]


# --------------------------------------------------------------------------------------------
# Expression evaluation (launch extents, scalar arguments)
# --------------------------------------------------------------------------------------------
def _eval(expr, env: Mapping[str, int]) -> int:
    """Integer value of a TIR expression given symbolic sizes by name; KeyError if unbound."""
    from tvm import tirx

    if isinstance(expr, (int, np.integer)):
        return int(expr)
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return int(env[expr.name])
    if isinstance(expr, tirx.Cast):
        return _eval(expr.value, env)
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b,
           tirx.Div: lambda a, b: int(a / b), tirx.Mod: lambda a, b: int(np.fmod(a, b)),
           tirx.Min: min, tirx.Max: max}
    ops.update({tirx.LT: lambda a, b: a < b, tirx.LE: lambda a, b: a <= b, tirx.GT: lambda a, b: a > b,
                tirx.GE: lambda a, b: a >= b, tirx.EQ: lambda a, b: a == b, tirx.NE: lambda a, b: a != b,
                tirx.And: lambda a, b: bool(a and b), tirx.Or: lambda a, b: bool(a or b)})
    for cls, fn in ops.items():
        if isinstance(expr, cls):
            return int(fn(_eval(expr.a, env), _eval(expr.b, env)))
    if isinstance(expr, tirx.Not):
        return int(not _eval(expr.a, env))
    if isinstance(expr, tirx.Select):
        return _eval(expr.true_value if _eval(expr.condition, env) else expr.false_value, env)
    op = getattr(getattr(expr, "op", None), "name", "")
    if op in ("tirx.shift_right", "tirx.shift_left"):
        a, b = (_eval(x, env) for x in expr.args)
        return a >> b if op == "tirx.shift_right" else a << b
    raise KeyError(f"cannot evaluate {expr}")


def kernel_launch(lowered: LoweredGPUModule, kernel: str, env: Mapping[str, int] | None = None,
                  host_extents: Mapping[str, Any] | None = None) -> LaunchConfig:
    """Grid and work-group of ``kernel`` from its thread bindings; a clear error if unknown."""
    env = env or {}
    ext = lowered.thread_extents.get(kernel)
    if not ext:
        raise BlockpruneError(
            f"cannot derive the launch configuration of kernel {kernel!r}: it binds no "
            "blockIdx/threadIdx extents",
            "schedule the PrimFunc for a GPU (dlight rules or explicit thread bindings) before verifying it",
        )
    grid, block = [1, 1, 1], [1, 1, 1]
    for tag, value in ext.items():
        kind, _, axis = tag.partition(".")
        if kind not in ("blockIdx", "threadIdx") or axis not in _AXES:
            raise BlockpruneError(f"kernel {kernel!r} binds {tag!r}, which has no OpenCL launch dimension",
                                  "use blockIdx.x/y/z and threadIdx.x/y/z bindings only")
        try:
            n = _eval(value, env)
        except KeyError as err:
            raise BlockpruneError(
                f"cannot derive the launch configuration of kernel {kernel!r}: extent of {tag} is {value} "
                f"({err.args[0]})", "give the symbolic sizes it depends on through concrete input arrays",
            ) from None
        if host_extents is not None and tag in host_extents:
            try:
                host_n = _eval(host_extents[tag], env)
            except KeyError:
                host_n = n
            if host_n != n:
                raise BlockpruneError(f"kernel {kernel!r}: {tag} is {n} in the kernel but {host_n} at launch",
                                      "this is a lowering inconsistency; report it with the PrimFunc")
        (grid if kind == "blockIdx" else block)[_AXES[axis]] = n
    local = sum(4 * int(n) for n in _LOCAL_RE.findall(_kernel_source(lowered.source, kernel)))
    return LaunchConfig(tuple(grid), tuple(block), local)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def _param_buffers(func) -> list[tuple[str, tuple, str]]:
    """[(name, shape exprs, dtype)] of a PrimFunc's buffer parameters, in declaration order.

    Names are made distinct as :func:`lower_for_opencl` renames them, so that every parameter
    is its own array even where TIR repeats a name.
    """
    out = []
    for p, name in zip(func.params, distinct_names([p.name for p in func.params])):
        ty = p.ty
        if type(ty).__name__ != "BufferType":
            raise BlockpruneError(f"parameter {p.name} of a PrimFunc is not a buffer",
                                  "verify functions whose parameters are all buffers (static or symbolic shapes)")
        out.append((name, tuple(ty.shape), str(ty.dtype)))
    return out


def _bind_inputs(func_name: str, func, given: Mapping[str, np.ndarray], rng: np.random.Generator):
    """Arrays for every parameter (given ones, random floats otherwise) and symbolic sizes."""
    from tvm import tirx

    params = _param_buffers(func)
    env: dict[str, int] = {}
    for name, shape, _ in params:  # symbolic sizes from the arrays the caller gave
        if name in given:
            arr = np.asarray(given[name])
            if arr.ndim != len(shape):
                raise BlockpruneError(f"{func_name}: input {name!r} has {arr.ndim} dims, expected {len(shape)}",
                                      "pass arrays shaped like the PrimFunc's buffers")
            for dim, size in zip(shape, arr.shape):
                if isinstance(dim, tirx.Var):
                    env.setdefault(dim.name, int(size))
    unknown = set(given) - {p[0] for p in params}
    if unknown:
        raise BlockpruneError(f"{func_name} has no parameter(s) {sorted(unknown)}",
                              f"its parameters are {[p[0] for p in params]}")
    arrays: dict[str, np.ndarray] = {}
    for name, shape, dtype in params:
        try:
            dims = tuple(_eval(d, env) for d in shape)
        except KeyError:
            raise BlockpruneError(f"{func_name}: the shape of {name!r} depends on an unbound size",
                                  f"pass {name!r} (or an input that fixes its symbolic sizes)") from None
        if name in given:
            arr = np.ascontiguousarray(given[name], dtype=dtype)
            if arr.shape != dims:
                raise BlockpruneError(f"{func_name}: input {name!r} has shape {arr.shape}, expected {dims}",
                                      "pass arrays shaped like the PrimFunc's buffers")
        elif np.dtype(dtype).kind == "f":
            arr = rng.uniform(-1.0, 1.0, size=dims).astype(dtype)
        else:
            raise BlockpruneError(f"{func_name}: integer parameter {name!r} needs real values",
                                  "random indices would read out of bounds; pass it in inputs")
        arrays[name] = arr
    return arrays, env


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _build_program(source: str):
    """The built program for ``source`` in the current context.

    Keyed by context as well as source: a program belongs to the context it was built in, and the
    context is re-created whenever its cache is dropped (a test that hides pyopencl does so);
    launching an old program on the new queue fails with INVALID_CONTEXT."""
    cl, ctx, _ = _opencl_context()
    return _build_program_in(cl, ctx, source)


@functools.lru_cache(maxsize=32)
def _build_program_in(cl, ctx, source: str):
    try:
        return cl.Program(ctx, source).build()
    except cl.Error as err:
        raise BlockpruneError(f"PoCL could not compile the generated OpenCL C: {err}",
                              "inspect the source with lower_for_opencl(mod).source") from None


def run_on_opencl(lowered: LoweredGPUModule, func_name: str, arrays: Mapping[str, np.ndarray],
                  env: Mapping[str, int], preset: GPUPreset):
    """Run the kernels of one function on PoCL; returns (arrays after, [(kernel, launch, ms)])."""
    cl, ctx, queue = _opencl_context()
    program = _build_program(lowered.source)
    mf = cl.mem_flags
    host = {name: np.array(a, copy=True) for name, a in arrays.items()}
    bufs = {name: cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a if a.size else np.zeros(1, a.dtype))
            for name, a in host.items()}
    done = []
    for step, item, step_env in _host_steps(lowered, func_name, env):
        if step == "alloc":  # a temporary between kernels, sized with the host's values at that point
            nbytes = int(np.prod([_eval(d, step_env) for d in item.shape])) * np.dtype(str(item.dtype)).itemsize
            bufs.setdefault(getattr(item.data, "name", item.name), cl.Buffer(ctx, mf.READ_WRITE, size=max(nbytes, 4)))
            continue
        launch, kernel = item, item.kernel
        if kernel not in lowered.signatures:
            raise BlockpruneError(f"kernel {kernel!r} is launched but not in the OpenCL source",
                                  "this is a lowering inconsistency; report it with the PrimFunc")
        config = kernel_launch(lowered, kernel, step_env, launch.extents)
        check_launch(preset, config, kernel)
        by_param = dict(zip(lowered.device_params[kernel], launch.args))
        cl_args = []
        for ctype, pname in lowered.signatures[kernel]:
            expr = by_param.get(pname)
            if expr is None:
                raise BlockpruneError(f"kernel {kernel!r}: parameter {pname!r} has no argument at launch",
                                      "this is a lowering inconsistency; report it with the PrimFunc")
            if ctype.endswith("*"):
                buf_name = _data_buffer_name(expr)
                if buf_name not in bufs:
                    raise BlockpruneError(f"kernel {kernel!r}: buffer {buf_name!r} is not a parameter or temporary",
                                          "this is a lowering inconsistency; report it with the PrimFunc")
                cl_args.append(bufs[buf_name])
            else:
                cl_args.append(_C_SCALARS.get(ctype, np.int32)(_eval(expr, step_env)))
        knl = _cl_kernel(program, kernel)
        t0 = time.perf_counter()
        knl(queue, config.global_size, config.block, *cl_args)
        queue.finish()
        done.append((kernel, config, (time.perf_counter() - t0) * 1e3))
    for name, a in host.items():
        if a.size:
            cl.enqueue_copy(queue, a, bufs[name])
    queue.finish()
    return host, done


def _host_steps(lowered: LoweredGPUModule, func_name: str, env: Mapping[str, int]):
    """``("alloc", buffer, env)`` and ``("launch", _Launch, env)`` in the order the host function runs them.

    Why walk rather than list: generic kernels (the GPU scan behind ``cumsum``) size temporaries
    with let-bound values and launch kernels in host loops whose trip count depends on the
    shapes, so each launch needs the host's values at that point, and some run 0 or n times.
    Lets that cannot be evaluated (handles, struct reads) stay unbound; a branch on such a
    value must not hold launches.
    """
    import tvm

    body = lowered.host_bodies.get(func_name)
    if body is None:  # no body kept: the flat list (temporaries first)
        for buf in lowered.host_allocs.get(func_name, {}).values():
            yield "alloc", buf, env
        for launch in lowered.launches.get(func_name, []):
            yield "launch", launch, env
        return
    yield from _walk_host(body, dict(env), tvm.tirx)


def _walk_host(stmt, env: dict[str, int], tirx):
    kind = type(stmt).__name__
    if kind == "SeqStmt":
        for s in stmt.seq:
            yield from _walk_host(s, env, tirx)
    elif kind in ("Bind", "LetStmt"):
        try:
            env[stmt.var.name] = _eval(stmt.value, env)
        except (KeyError, TypeError, ValueError):
            pass  # a handle or a struct read: not a size
        if kind == "LetStmt":
            yield from _walk_host(stmt.body, env, tirx)
    elif kind == "For":
        start, extent = _eval(stmt.min, env), _eval(stmt.extent, env)
        for i in range(start, start + extent):
            env[stmt.loop_var.name] = i
            yield from _walk_host(stmt.body, env, tirx)
    elif kind == "IfThenElse":
        try:
            branch = stmt.then_case if _eval(stmt.condition, env) else stmt.else_case
        except KeyError:  # a null-pointer or type check: must not guard a launch
            if _has_launch(stmt):
                raise BlockpruneError(f"a kernel launch depends on a host condition that cannot be evaluated here: "
                                      f"{stmt.condition}", "verify this function on a device with a TVM runtime") from None
            return
        if branch is not None:
            yield from _walk_host(branch, env, tirx)
    elif kind == "AllocBuffer":
        yield "alloc", stmt.buffer, dict(env)
    elif kind == "Evaluate":
        call = stmt.value
        if getattr(getattr(call, "op", None), "name", "") == "tirx.call_ffi_kernel":
            names, args = list(call.attrs.launch_params), list(call.args)
            n_ext = len(names)
            yield "launch", _Launch(str(args[0].value), args[1:len(args) - n_ext],
                                    dict(zip(names, args[len(args) - n_ext:]))), dict(env)
    elif kind == "AttrStmt":
        yield from _walk_host(stmt.body, env, tirx)
    elif kind == "Return":
        return
    else:  # other statements (asserts, buffer declarations): nothing runs on the device
        for name in _fields(stmt):
            value = getattr(stmt, name)
            if name != "span" and isinstance(value, tirx.Stmt):
                yield from _walk_host(value, env, tirx)


def _has_launch(stmt) -> bool:
    import tvm

    found = []

    def visit(node):
        if isinstance(node, tvm.tirx.Evaluate) and getattr(getattr(node.value, "op", None), "name", "") == \
                "tirx.call_ffi_kernel":
            found.append(node)

    _walk(stmt, visit)
    return bool(found)


def _data_buffer_name(expr) -> str:
    """``X.data`` (``tirx.buffer_data(X)``) or a plain pointer Var -> the buffer's name.

    A buffer declared over another's data (``A_1 = decl_buffer(..., data=A.data)``) resolves to
    the name of its data pointer, which is the name of the buffer that owns it.
    """
    import tvm

    if isinstance(expr, tvm.ir.Call) and getattr(expr.op, "name", "") == "tirx.buffer_data":
        buf = expr.args[0]
        data = getattr(buf, "data", None)
        return data.name if data is not None and getattr(data, "name", None) else buf.name
    name = getattr(expr, "name", str(expr))
    return name[:-len("_ptr")] if name.endswith("_ptr") else name


def run_on_cpu(cpu_module, func_name: str, arrays: Mapping[str, np.ndarray], order: list[str]):
    """Run the reference function (``compile_reference`` output) on copies of ``arrays``."""
    import tvm

    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(np.array(arrays[n], copy=True), dev) for n in order]
    cpu_module[func_name](*tensors)
    return {n: t.numpy() for n, t in zip(order, tensors)}


def compile_reference(ref_mod):
    """The reference module compiled for the host CPU (llvm) and loaded."""
    import tvm

    return tvm.compile(_with_symbols(ref_mod), target="llvm").jit()


def verify_module(gpu_mod, ref_mod, target: "GPUPreset | str | Any" = "mali",
                  inputs: Mapping[str, Mapping[str, np.ndarray]] | None = None, *,
                  seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5) -> list[KernelCheck]:
    """Verify every PrimFunc of ``gpu_mod`` on PoCL against ``ref_mod`` (same names) on llvm.

    ``inputs[func][param]`` fixes arrays (index arrays must be given); other float buffers get
    uniform(-1, 1) values, the same on both sides. Every buffer is compared after the run, so
    outputs need not be marked. Tolerance per function: ``atol + rtol * max|reference|``;
    float32 sums taken in a different order differ by a few ulps times the reduction length,
    so callers with long reductions pass a larger ``rtol``.
    """
    import tvm

    preset = resolve_gpu_target(target)
    _opencl_context()  # fail early with the install hint
    inputs = inputs or {}
    lowered = lower_for_opencl(gpu_mod, preset)
    ref_funcs = {gv.name_hint: f for gv, f in ref_mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    cpu_module = compile_reference(ref_mod)
    rng = np.random.default_rng(seed)
    rows: list[KernelCheck] = []
    for gv, func in gpu_mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        if name not in ref_funcs:
            raise BlockpruneError(f"reference module has no function {name!r}",
                                  "pass the unscheduled module the GPU module was scheduled from")
        if name not in lowered.launches:
            raise BlockpruneError(
                f"cannot derive the launch configuration of {name!r}: it launches no GPU kernel",
                "schedule it for the GPU (dlight rules or thread bindings); unscheduled loops stay on the host",
            )
        arrays, env = _bind_inputs(name, func, inputs.get(name, {}), rng)
        gpu_out, launched = run_on_opencl(lowered, name, arrays, env, preset)
        cpu_out = run_on_cpu(cpu_module, name, arrays, [p[0] for p in _param_buffers(func)])
        diff, scale = 0.0, 0.0
        for pname, ref in cpu_out.items():
            got = gpu_out[pname]
            if ref.size:
                diff = max(diff, float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))))
                if ref.dtype.kind == "f":  # index arrays must match exactly: no scale from them
                    scale = max(scale, float(np.max(np.abs(ref))))
        tol = atol + rtol * scale
        for kernel, config, ms in launched:
            rows.append(KernelCheck(name, kernel, config, diff, tol, ms))
    return rows


def dlight_gpu_modules(relax_mod, target: "GPUPreset | str | Any" = "mali"):
    """``(gpu module, reference module)`` of the PrimFuncs of a Relax module.

    The Relax module is legalized and fused as the GPU pipeline does, then scheduled with the
    dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback); the reference is
    the same PrimFuncs before scheduling, which ``llvm`` compiles as plain loops.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    tgt = resolve_gpu_target(target).target()
    mod = tvm.ir.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(),
    ])(relax_mod)
    ref = _with_symbols(mod)
    with tgt:  # on a copy: ApplyDefaultSchedule updates the module it is given in place
        gpu = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(_with_symbols(ref))
    return gpu, ref


def _cl_kernel(program, name: str):
    """A kernel object of ``program`` (``cl.Kernel``: attribute access re-creates it each time)."""
    cl, _, _ = _opencl_context()
    return cl.Kernel(program, name)


def bsr_table(m: int = 128, k: int = 768, n: int = 3072, sparsity: float = 0.8,
              blocks: tuple[str, ...] = ("1x32", "32x1", "16x16", "4x4"),
              targets: tuple[str, ...] = ("mali", "adreno"), seed: int = 0) -> list[KernelCheck]:
    """Verify the BSR GPU kernel at one shape for each block and preset (for the results page)."""
    from blockprune.bsr import dense_to_bsr

    from blockprune.backends.tvm.kernels.bsr_gpu_kernel import build_gpu_bsr_module, gpu_kernel_inputs

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    rows: list[KernelCheck] = []
    for block in blocks:
        r, c = (int(v) for v in block.split("x"))
        keep = rng.random((n // r, k // c)) >= sparsity
        w = rng.standard_normal((n, k)).astype(np.float32) * np.kron(keep, np.ones((r, c), np.float32))
        bsr = dense_to_bsr(w, block)
        for target in targets:
            gpu, ref, _, _ = build_gpu_bsr_module((m, k), n, block, bias=True, target=target,
                                                  name=f"bsr_{block}_{target}")
            rows += verify_module(gpu, ref, target, {f"bsr_{block}_{target}": gpu_kernel_inputs(x, bsr, bias)},
                                  rtol=1e-5 * 4)
    return rows


if __name__ == "__main__":  # python -m blockprune.backends.tvm.verify.opencl_verify
    print(format_table(bsr_table()))
