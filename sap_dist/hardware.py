"""Which compute dtype this machine runs fast: bf16 on a GPU and on CPUs with bf16 instructions,
fp32 on other CPUs; and how many CPU cores this process may use.

A CPU without AVX512-BF16 or AMX has no bf16 matrix instructions: torch then converts every
element, and a bf16 matrix product of the embedded model's shapes (256x576 by 576x1536, one
thread) took 517 ms against fp32's 5.4 ms on a 2-core AMD EPYC with AVX2 only, which turned the
quickstart's alignment steps from 4 s into 5 minutes each.
"""

from __future__ import annotations

import os
import time

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 matrix instructions."""
DTYPE_CHOICES = ("auto", "bf16", "fp32")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or Slurm narrows),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 matrix instructions, from its flags; None where the flags cannot
    be read (not Linux)."""
    if not os.path.exists(cpuinfo):
        return None
    with open(cpuinfo) as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return any(f in flags for f in CPU_BF16_FLAGS)
    return None


def _bf16_measured_fast() -> bool:
    """Where the flags are unknown: a bf16 matrix product of the embedded model's shape within 3x
    of fp32's time (the slow path is 36x to 570x slower, so the line is far from both)."""
    import torch

    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(64, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] < 3 * times[torch.float32]


def check_dtype(name: str) -> None:
    """Refuse a dtype setting that is not one of DTYPE_CHOICES (ValueError naming them)."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")


def resolve_dtype(name: str) -> tuple[str, str]:
    """(`bf16` or `fp32`, why) for a dtype setting: `auto` picks bf16 on a CUDA GPU or a CPU with
    bf16 instructions, fp32 on any other CPU; `bf16` and `fp32` stay as they are."""
    check_dtype(name)
    if name != "auto":
        return name, "as set"
    import torch

    if torch.cuda.is_available():
        return "bf16", "auto: a CUDA GPU"
    fast = cpu_has_fast_bf16()
    if fast is None:
        fast = _bf16_measured_fast()
    if fast:
        return "bf16", "auto: this CPU has bf16 instructions (AVX512-BF16 or AMX)"
    return "fp32", ("auto: this CPU has no bf16 instructions (AVX512-BF16 or AMX), where bf16 runs about "
                    "100x slower than fp32")
