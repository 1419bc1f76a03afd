"""The machine an engine runs on: CPU model and ISA features, read once per process."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (Linux); (None, {}) elsewhere."""
    name, flags = None, frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
            if name and flags:
                break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> set[str]:
    return set(_cpuinfo()[1])


def isa_features() -> dict[str, bool]:
    """The CPU features that decide which precision is fast."""
    flags = cpu_flags()
    return {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
            "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
            "BF16": bool({"avx512_bf16", "amx_bf16"} & flags),
            "AVX512-FP16": "avx512_fp16" in flags,
            "AMX": bool({"amx_tile", "amx_bf16", "amx_int8"} & flags)}


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform says."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share,
    not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_key() -> str:
    """What a saved runtime choice is valid for: CPU model and core count."""
    return f"{cpu_name()} x{os.cpu_count()}"
