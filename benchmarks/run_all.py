"""Run every benchmark in sequence on a quiet machine; each writes benchmarks/results/<name>.json.

    python benchmarks/run_all.py [names...]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["adapter_swap", "overhead", "stack_latency", "lookup_decoding", "batch_invariance", "batch_throughput", "roofline", "memory",
         "quant_quality", "quant_speed", "llamacpp_converter_parity"]


def main() -> int:
    names = sys.argv[1:] or ORDER
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"== {name}: no such benchmark", flush=True)
            failed.append(name)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE)
        print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
