#!/usr/bin/env bash
# Build and run edge-fslm on aarch64 without a Pi: an arm64 Debian root under qemu-user, with
# llama.cpp cross-compiled for the Pi's CPU. Writes benchmarks/results/aarch64.json (aarch64_pi5.json with PI=5), which
# compares the answers and the memory with this x86 machine.
#
#   sudo scripts/aarch64-check.sh              # Pi 4 / Pi 3 / Zero 2 W build (armv8-a, NEON)
#   sudo PI=5 scripts/aarch64-check.sh         # Pi 5 build (armv8.2-a + dot product + fp16)
#
# Needs root on a Debian/Ubuntu x86-64 host (apt, a chroot, binfmt_misc) and the Debian and
# PyPI registries. The arm64 root and the wheel are kept in $WORK, so a second run skips them.
#
# Where this differs from the README's Pi commands (`apt install ...; make run`):
#  * llama-cpp-python's C/C++ sources are compiled by Debian's aarch64 cross compiler at this
#    machine's native speed, from the same sdist with the same flags a Pi would use, instead of
#    by a compiler that qemu emulates (hours on 2 cores). pip then installs that wheel inside
#    the arm64 root (PIP_FIND_LINKS), so no compiler is needed there.
#  * -march is set by PI (armv8-a, or armv8.2-a+dotprod+fp16) instead of -mcpu=native, because
#    the build machine is not the Pi.
# Everything else, `make run` and scripts/install.sh included, runs unchanged as arm64 code.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PI=${PI:-4}
WORK=${WORK:-/var/tmp/edge-fslm-aarch64}
ROOT="$WORK/root"
LLAMA_SPEC="llama-cpp-python==0.3.36"
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
case "$PI" in
  4) ARCH_FLAGS="armv8-a" ;;                 # Cortex-A72 (Pi 4), A53 (Pi 3, Zero 2 W)
  5) ARCH_FLAGS="armv8.2-a+dotprod+fp16" ;;  # Cortex-A76 (Pi 5)
  *) echo "aarch64-check: PI must be 4 or 5 (got $PI)" >&2; exit 2 ;;
esac
WHEELS="$WORK/wheels/pi$PI"

say() { echo "aarch64-check: $*"; }
die() { echo "aarch64-check: error: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (a chroot and binfmt_misc need it)"
[ "$(uname -m)" = x86_64 ] || die "this script emulates aarch64 on an x86-64 host; on a Pi, follow the README"
command -v apt-get >/dev/null || die "needs a Debian or Ubuntu host (apt-get)"

# 1. The host's tools: qemu-user, debootstrap and the cross compiler.
need=()
for pkg in qemu-user-static binfmt-support debootstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
fi

# 2. Let the kernel run arm64 binaries through qemu.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt_misc has no qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 failed)"

# 3. An arm64 Debian root with what the README's Pi section installs, less the compiler.
if [ ! -e "$ROOT/.edge-fslm-ready" ]; then
  say "debootstrap arm64 $SUITE into $ROOT (a few minutes; emulated dpkg)"
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,libgomp1,ca-certificates,make \
    "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $WORK/debootstrap.log"
  touch "$ROOT/.edge-fslm-ready"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's CA bundle, so that a TLS proxy the host trusts is trusted inside too.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"

# 4. llama-cpp-python, cross-compiled for the Pi's CPU, as an aarch64 wheel.
BUILD_JSON="$WORK/build-pi$PI.json"
if ! ls "$WHEELS"/llama_cpp_python-*aarch64.whl >/dev/null 2>&1; then
  say "cross-compiling $LLAMA_SPEC for -march=$ARCH_FLAGS (about as long as a native build here)"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  export CMAKE_ARGS="-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER \
    -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY \
    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$ARCH_FLAGS -DLLAMA_CURL=OFF -DGGML_LLAMAFILE=OFF"  # as scripts/install.sh
  t0=$(date +%s)
  python3 -m venv "$WORK/host-venv"
  "$WORK/host-venv/bin/pip" install -q wheel
  "$WORK/host-venv/bin/pip" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python "$LLAMA_SPEC" \
    -w "$WHEELS/x" >"$WORK/build-pi$PI.log" 2>&1 || die "cross build failed; see $WORK/build-pi$PI.log"
  seconds=$(( $(date +%s) - t0 ))
  # The wheel holds Python code and aarch64 shared libraries, but pip named it after the host.
  for so in $(unzip -Z1 "$WHEELS"/x/*.whl | grep '\.so$'); do
    unzip -p "$WHEELS"/x/*.whl "$so" | file - | grep -q 'ARM aarch64' || die "$so in the wheel is not aarch64 code"
  done
  "$WORK/host-venv/bin/wheel" tags --platform-tag linux_aarch64 --remove "$WHEELS"/x/*.whl >/dev/null
  mv "$WHEELS"/x/*aarch64.whl "$WHEELS/" && rm -rf "$WHEELS/x"
  printf '{"pi": %s, "march": "%s", "cmake_args": "%s", "seconds": %s, "compiler": "%s", "host_cores": %s, "qemu": "%s"}\n' \
    "$PI" "$ARCH_FLAGS" "$(echo $CMAKE_ARGS | tr -s ' ')" "$seconds" \
    "$(aarch64-linux-gnu-gcc --version | head -1)" "$(nproc)" "$(qemu-aarch64-static --version | head -1)" >"$BUILD_JSON"
  say "built $(basename "$WHEELS"/*.whl) in ${seconds} s"
fi

# 5. This checkout, as committed, inside the root; the README's Pi commands, run as arm64 code.
rm -rf "$ROOT/opt/edge-fslm" && mkdir -p "$ROOT/opt/edge-fslm" "$ROOT/wheels"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT/opt/edge-fslm"
[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] || say "note: uncommitted changes are not part of the check"
cp "$WHEELS"/*.whl "$ROOT/wheels/"
for fs in proc sys dev; do mountpoint -q "$ROOT/$fs" || mount --bind "/$fs" "$ROOT/$fs"; done
trap 'for fs in dev sys proc; do umount -l "$ROOT/$fs" 2>/dev/null || true; done' EXIT

in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PIP_FIND_LINKS=/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt bash -c "cd /opt/edge-fslm && $1"; }
say "inside arm64: uname -m = $(in_root 'uname -m')"
say "inside arm64: make run (scripts/install.sh, then edge-fslm run)"
t0=$(date +%s)
in_root 'make run PROMPT="Why is the sky blue?"' | tee "$WORK/make-run-pi$PI.log"
say "make run took $(( $(date +%s) - t0 )) s under emulation"
say "inside arm64: the probe (selftest, five prompts, plan and peak RSS per stack and ctx)"
in_root '.venv/bin/python benchmarks/aarch64.py probe --out /tmp/aarch64-probe.json'
cp "$ROOT/tmp/aarch64-probe.json" "$WORK/probe-pi$PI.json"

# 6. The same probe on this machine, and the comparison.
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || die "no x86 install at $REPO/.venv: run scripts/install.sh first"
"$PY" benchmarks/aarch64.py probe --out "$WORK/probe-x86.json"
"$PY" benchmarks/aarch64.py compare --aarch64 "$WORK/probe-pi$PI.json" --x86 "$WORK/probe-x86.json" --build "$BUILD_JSON"
