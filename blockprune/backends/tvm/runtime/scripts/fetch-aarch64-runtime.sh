#!/usr/bin/env bash
# Fetch the aarch64 TVM runtime (libtvm_runtime.so, libtvm_ffi.so) from the PyPI aarch64 wheels.
#
# Why: artifacts cross-compiled for ARM run on this x86 host under qemu-aarch64, through a small
# C++ runner that links against these two libraries. Called by blockprune (runner.py) when needed;
# idempotent: does nothing when DEST already holds both libraries.
#
# usage: fetch-aarch64-runtime.sh DEST [PYTHON]
set -euo pipefail
DEST=${1:?usage: fetch-aarch64-runtime.sh DEST [PYTHON]}
PY=${2:-python3}
TVM_VERSION=${BLOCKPRUNE_TVM_VERSION:-0.27.0.post1}
FFI_VERSION=${BLOCKPRUNE_TVM_FFI_VERSION:-0.1.14.post1}
if [[ -f "$DEST/lib/libtvm_runtime.so" && -f "$DEST/lib/libtvm_ffi.so" && -d "$DEST/include/tvm/ffi" ]]; then
  exit 0
fi
mkdir -p "$DEST"
WORK=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --platform manylinux_2_28_aarch64 --only-binary=:all: --no-deps \
  --python-version 3.11 -d "$WORK/wheels" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
mkdir -p "$WORK/out/lib" "$WORK/out/include"
"$PY" - "$WORK/wheels" "$WORK/out" <<'PYEOF'
import pathlib, shutil, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
found = set()
for whl in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if base in ("libtvm_runtime.so", "libtvm_ffi.so") and base not in found:
                (out / "lib" / base).write_bytes(z.read(name))
                found.add(base)
            elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                dst = out / "include" / name[len("tvm_ffi/include/"):]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(name))
missing = {"libtvm_runtime.so", "libtvm_ffi.so"} - found
if missing:
    sys.exit(f"wheels lack {sorted(missing)}")
PYEOF
rm -rf "$DEST/lib" "$DEST/include"
mv "$WORK/out/lib" "$DEST/lib"
mv "$WORK/out/include" "$DEST/include"
