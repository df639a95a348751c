#!/usr/bin/env bash
# Install the Debian packages later stages need (ARM cross-compiler, qemu-user, OpenCL on the CPU).
# Runs as root (apt-get); as another user it only reports what is missing, since the Python side
# of blockprune works without them and the tests that need them skip with the reason.
set -euo pipefail
PACKAGES=(g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user pocl-opencl-icd ocl-icd-opencl-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present (${PACKAGES[*]})"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system packages missing: ${missing[*]}" >&2
  echo "  run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system packages: installed ${missing[*]}"
