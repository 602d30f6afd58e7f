"""Launcher helpers of the NT-Xent / MoCo v3 / CMC / memory-bank kernels (contrast_*.py, memory_bank.py).

TEMPORARY: the same facts kernels/launch.py computes for the InfoNCE launchers; when the shared
``kernels/runtime.py`` lands, these names are re-pointed there and this file is deleted.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from moco_fast.numerics import fp32_matmul_precision

from . import heuristics as H


@triton.jit
def _probe():
    pass


# @triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set before triton's import.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def device_guard(t: torch.Tensor):
    """Enter t's CUDA device (Triton launches on the current device); a no-op elsewhere."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def device_info(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability); the interpreter gets a 1-SM view (no splits by default)."""
    if device.type == "cuda" and not INTERPRETED:
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, (props.major, props.minor)
    return 1, (9, 0)


def dot_setup(a: torch.Tensor, b: torch.Tensor):
    """(dot dtype name, its tl dtype, fp32 precision "ieee" | "tf32") for dots of a and b tiles."""
    name = H.dot_dtype_name(DTYPE_NAME[a.dtype], DTYPE_NAME[b.dtype])
    return name, getattr(tl, name), fp32_matmul_precision()
