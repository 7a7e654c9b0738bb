"""Where and how crt runs: the device a `--device` names, the precision `--precision auto`
picks and its autocast context, and the process-level settings that make CPU training fast
(each measured, not guessed).

bf16 pays only where the hardware multiplies in bf16: a CUDA GPU that supports it, or a CPU with
AVX512-BF16 or AMX. Elsewhere oneDNN emulates bf16 matmuls, and on such a CPU (the 2-core Xeon
of docs/results/bench.md) bf16 trained at 0.36-0.51x fp32's speed. So `auto` is bf16 on native
hardware and fp32 elsewhere.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB by default) with a fresh
mmap() and unmaps them again on free. A training step allocates and frees the same large buffers
every step: the logits [B*T, V] and their gradient (90 MB each at B*T = 2240, V = 10,000) and
the log-softmax output. Each step therefore page-faults hundreds of MB back in. Keeping freed
blocks in the heap made CRT-35's PTB training 1.34x faster on the development machine
(docs/results/bench.md, "CPU traps"); jemalloc or tcmalloc via LD_PRELOAD do the same from outside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import nullcontext

import torch

from crt.errors import CRTError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse (Linux/glibc only; else a no-op).

    The process keeps its peak heap instead of returning it to the OS between steps, which is
    the point during training. Returns whether the setting is in effect.
    """
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _applied


def resolve_device(name: str) -> torch.device:
    """The torch device `--device` names: auto (CUDA when present, else CPU), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CRTError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise CRTError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bf16_units() -> list[str]:
    """The bf16 matmul units of this CPU: AVX512-BF16 and/or AMX (empty: none, bf16 is emulated)."""
    units = []
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        units.append("AVX512-BF16")
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        units.append("AMX")
    return units


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: `precision` itself, or for auto bf16 where `device` multiplies bf16 natively."""
    if precision not in PRECISIONS:
        raise CRTError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_units() else "fp32"


def describe_precision(precision: str, device: torch.device) -> str:
    """One line saying which precision runs, and why when auto chose it."""
    chosen = resolve_precision(precision, device)
    if precision != "auto":
        return f"precision: {chosen}"
    if device.type == "cuda":
        why = f"{torch.cuda.get_device_name(device)} {'supports' if chosen == 'bf16' else 'does not support'} bf16"
    elif chosen == "bf16":
        why = f"this CPU has {' and '.join(cpu_bf16_units())}"
    else:
        why = "this CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated and slower"
    return f"precision: {chosen} (--precision auto: {why})"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA when precision is bf16 (or auto resolves to it), else a no-op context."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
