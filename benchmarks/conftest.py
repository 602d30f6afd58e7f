"""pytest-benchmark setup for benchmarks/ (run: ``pytest benchmarks/ --benchmark-only``).

Not collected by the main test command (pyproject: testpaths = ["tests"]). The benchmarks run on
CUDA when a GPU is present, else on the CPU; GPU timings synchronize inside the timed call.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) that waits for the GPU inside the timed call, so the time is the kernels' time."""

    def run(fn, *args, **kwargs):
        if device.type != "cuda":
            return benchmark(fn, *args, **kwargs)

        def synced(*a, **kw):
            out = fn(*a, **kw)
            torch.cuda.synchronize(device)
            return out

        return benchmark(synced, *args, **kwargs)

    return run
