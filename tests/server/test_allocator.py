"""While a model loads, its weights are mapped outside glibc's heap; the rest of the time, not."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from flashstep.server import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_configured_loads_switch_the_threshold_and_overlapping_loads_keep_it_low():
    """In a child process, with mallopt recorded: configure pins the serving threshold, a load
    lowers it, a load inside a load leaves it low, and the last one out restores it."""
    code = """
from flashstep.server import allocator
calls = []
real = allocator._mallopt
allocator._mallopt = lambda libc, n: calls.append(n) or real(libc, n)
assert allocator.configure(65536)
with allocator.mapped_while_loading():
    with allocator.mapped_while_loading():
        pass
    assert calls[-1] == 65536, calls
print(calls)
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    serving = allocator.SERVING_THRESHOLD
    assert run.stdout.strip() == str([serving, 65536, serving])


def test_zero_or_an_operators_own_setting_leaves_glibc_alone(monkeypatch):
    """Both return before calling mallopt, so this test changes nothing in its own process."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.configure(0) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator.configure(64 * 1024) is False


def test_an_unconfigured_load_scope_does_nothing():
    with allocator.mapped_while_loading():
        assert allocator._state["loads"] == 0
