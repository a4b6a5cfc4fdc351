"""Measuring what a run costs: RSS sampled by psutil, and the kernel's own high-water mark.

The memory budget bounds the *peak RSS of the process*. A sampling thread can miss
a short spike between two samples, so on Linux we also reset and read the kernel's
``VmHWM`` (peak resident set), which misses nothing; the reported peak is the larger
of the two.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def reset_kernel_peak() -> bool:
    """Reset Linux's VmHWM for this process (writing "5" to clear_refs). False where unsupported."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kernel_peak(pid: int | None = None) -> int | None:
    """The VmHWM in bytes of this process (or of ``pid``, such as a server it started); None off Linux."""
    try:
        with open(_STATUS if pid is None else f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class RssSampler:
    """Samples RSS every ``interval`` seconds on a daemon thread while active.

    Use as a context manager. ``timeline`` holds (seconds since start, rss bytes) when
    ``keep_timeline`` is set; ``marks`` holds (seconds, label) events such as stage starts.
    """

    interval: float = 0.005
    keep_timeline: bool = False
    use_kernel_peak: bool = True
    peak_bytes: int = 0
    start_rss: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _t0: float = 0.0
    _hwm_reset: bool = False

    def __enter__(self) -> "RssSampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._proc = psutil.Process(os.getpid())
        self._hwm_reset = self.use_kernel_peak and reset_kernel_peak()
        self._t0 = time.perf_counter()
        self.start_rss = self._proc.memory_info().rss
        self.peak_bytes = self.start_rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edge-fslm-rss", daemon=True)
        self._thread.start()

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter() - self._t0, label))
        self._sample()

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peak_bytes:
            self.peak_bytes = rss
        if self.keep_timeline:
            self.timeline.append((time.perf_counter() - self._t0, rss))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
            if self._hwm_reset:
                hwm = kernel_peak()
                if hwm is not None and hwm > self.peak_bytes:
                    self.peak_bytes = hwm
        return self.peak_bytes


# ARM's "CPU implementer" 0x41 parts that run edge-fslm's users' boards and servers
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72",
              "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
              "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}


def cpu_name(cpuinfo: str, machine: str) -> tuple[str, bool]:
    """The CPU a record was measured on, from /proc/cpuinfo's text, and whether it is emulated.

    x86 kernels name the CPU in ``model name``; ARM kernels give ``CPU implementer``/``CPU part``
    and, on a Pi, the board in ``Model``. An ARM process under qemu-user reads the *host's*
    cpuinfo, so an x86 ``model name`` seen by an aarch64 interpreter means emulation: the record
    must not pass the host's CPU off as the one that ran it.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    arm = machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm")
    if arm and "CPU implementer" not in fields and "model name" in fields:
        return f"emulated {machine} (qemu-user) on {fields['model name']}", True
    if "CPU implementer" in fields:
        implementer, part = fields["CPU implementer"].lower(), fields.get("CPU part", "?").lower()
        if implementer == "0x41":  # Arm Ltd.
            core = _ARM_PARTS.get(part, f"ARM part {part}")
        else:
            core = f"implementer {implementer} part {part}"
        return (f"{fields['Model']} ({core})" if "Model" in fields else core), False
    return fields.get("model name") or platform.processor() or machine, False


def machine_info() -> dict:
    """The machine a measurement was taken on: CPU, cores, RAM, versions, llama.cpp's build."""
    try:
        from .llama import system_info as _system_info

        system_info = _system_info()
    except Exception as exc:  # a record should be written even without llama.cpp
        system_info = f"unavailable ({exc})"
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    cpu, emulated = cpu_name(cpuinfo, platform.machine())
    versions = {}
    for dist in ("edge-fslm", "llama-cpp-python", "gguf", "numpy", "psutil"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "emulated": emulated,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "llama_cpp_system_info": system_info,
        "versions": versions,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
