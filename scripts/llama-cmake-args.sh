#!/usr/bin/env bash
# Print the CMAKE_ARGS that llama.cpp needs on this CPU beyond its defaults (nothing, on most),
# with the reason on stderr. scripts/install.sh adds them before pip compiles llama-cpp-python.
#
#   scripts/llama-cmake-args.sh [CPUINFO [MACHINE]]     # defaults: /proc/cpuinfo, uname -m
#
#  * x86-64 CPUs that advertise Intel AMX inside VMs that do not actually run it: a -march=native
#    build then dies in ggml_backend_amx_mul_mat, so AMX is compiled out when it is advertised.
#    Only on x86-64: under an emulator (qemu-user) an arm64 process reads the host's cpuinfo.
#  * aarch64 (a Pi with the 64-bit OS) needs nothing: -mcpu=native picks NEON, and dot product
#    on a Pi 5. 32-bit ARM builds, but without llama.cpp's fast kernels: say so.
set -euo pipefail
cpuinfo=${1:-/proc/cpuinfo}
machine=${2:-$(uname -m)}
case "$machine" in
  x86_64|amd64)
    if grep -qw amx_tile "$cpuinfo" 2>/dev/null; then
      off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      echo "install: this CPU advertises AMX; building llama.cpp without it" >&2
      echo "-DCMAKE_C_FLAGS=\"$off\" -DCMAKE_CXX_FLAGS=\"$off\""
    fi
    ;;
  armv6l|armv7l|armhf|arm)
    echo "install: this is a 32-bit ARM system: llama.cpp's fast kernels need aarch64; on a Raspberry Pi, use the 64-bit OS" >&2
    ;;
esac
