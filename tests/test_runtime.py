"""Process-level CPU settings."""

import ctypes.util
import sys

import pytest

from crt.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_applies_once_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
