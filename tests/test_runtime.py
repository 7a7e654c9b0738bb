"""Process-level CPU settings."""

import ctypes.util
import sys

import pytest
import torch

from crt.errors import CRTError
from crt.runtime import autocast, describe_precision, keep_freed_memory, resolve_precision


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_applies_once_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def _cpu_units(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16,amx,chosen", [(True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, avx512_bf16, amx, chosen):
    _cpu_units(monkeypatch, avx512_bf16, amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == chosen
    line = describe_precision("auto", cpu)
    assert line.startswith(f"precision: {chosen} (--precision auto: ")
    if chosen == "bf16":
        assert ("AVX512-BF16" in line) == avx512_bf16 and ("AMX" in line) == amx
    else:
        assert "neither AVX512-BF16 nor AMX" in line
    # an explicit choice is kept whatever the CPU has, and autocast follows the resolved precision
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with autocast(cpu, "auto"):
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if chosen == "bf16" else torch.float32)


@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_on_cuda_asks_the_gpu(monkeypatch, supported):
    _cpu_units(monkeypatch, False, False)  # the CPU's units do not matter for a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Mock GPU")
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == ("bf16" if supported else "fp32")
    assert "Mock GPU" in describe_precision("auto", cuda)


def test_unknown_precision_is_refused():
    with pytest.raises(CRTError, match="unknown precision 'fp16': use one of auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))
