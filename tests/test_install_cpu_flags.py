"""scripts/llama-cmake-args.sh, the install script's CPU check, on faked /proc/cpuinfo files.

The same check runs on every machine the README names: an x86-64 laptop or VM, a Pi 4 or 5
with the 64-bit OS, and an arm64 process under qemu-user, which reads the *host's* cpuinfo.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama-cmake-args.sh"
AMX_OFF = '-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ' \
          '-DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"'

PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
X86_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f amx_bf16 avx512_fp16 amx_tile amx_int8
"""
X86 = X86_AMX.replace(" amx_bf16", "").replace(" amx_tile amx_int8", "")


def flags(tmp_path: Path, cpuinfo: str, machine: str) -> subprocess.CompletedProcess:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    return subprocess.run(["bash", str(SCRIPT), str(path), machine], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("cpuinfo", [PI4, PI5], ids=["pi4", "pi5"])
def test_a_pi_with_the_64_bit_os_needs_no_extra_flags(tmp_path, cpuinfo):
    r = flags(tmp_path, cpuinfo, "aarch64")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_an_x86_cpu_that_advertises_amx_builds_without_it(tmp_path):
    r = flags(tmp_path, X86_AMX, "x86_64")
    assert r.returncode == 0 and r.stdout.strip() == AMX_OFF
    assert "advertises AMX" in r.stderr


def test_an_x86_cpu_without_amx_needs_nothing(tmp_path):
    r = flags(tmp_path, X86, "x86_64")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_arm64_under_qemu_ignores_the_hosts_amx(tmp_path):
    """qemu-user shows an arm64 process the host's /proc/cpuinfo: x86 flags must not reach gcc."""
    r = flags(tmp_path, X86_AMX, "aarch64")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_32_bit_arm_is_told_to_use_the_64_bit_os(tmp_path):
    r = flags(tmp_path, PI4.replace("fp asimd", "half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva"), "armv7l")
    assert r.returncode == 0 and r.stdout == ""
    assert "64-bit OS" in r.stderr


def test_a_missing_cpuinfo_is_not_an_error(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "absent"), "x86_64"], capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout) == (0, "")


@pytest.mark.parametrize("cpuinfo, machine, want, emulated", [
    (PI4, "aarch64", "Raspberry Pi 4 Model B Rev 1.4 (Cortex-A72)", False),
    (PI5, "aarch64", "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)", False),
    (PI5.replace("Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n", ""), "aarch64", "Cortex-A76", False),
    (X86, "x86_64", "Intel(R) Xeon(R) Platinum 8480+", False),
    (X86, "aarch64", "emulated aarch64 (qemu-user) on Intel(R) Xeon(R) Platinum 8480+", True),
])
def test_benchmark_records_name_the_cpu_that_ran_them(cpuinfo, machine, want, emulated):
    """machine_info's cpu field: under qemu-user the host's model name must not pass as the CPU."""
    from edge_fslm.rss import cpu_name

    assert cpu_name(cpuinfo, machine) == (want, emulated)
