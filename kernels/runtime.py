"""Launcher plumbing shared by every kernel stage (one place for each of these):

- INTERPRETED: whether @triton.jit kernels run in the interpreter (TRITON_INTERPRET=1 was set before
  triton's import); re-exported as ``moco_fast.kernels.INTERPRETED``.
- TL_DTYPE / DTYPE_NAME: torch dtype -> triton dtype / the name heuristics.py speaks.
- device_info(device) -> (SM count, compute capability), cached per device.
- device_guard(device): Triton launches on the *current* CUDA device and its current stream, so
  every launcher enters the tensors' device first (a no-op for CPU tensors under the interpreter).
- fp32_precision(): the user's float32 matmul precision ("ieee" | "tf32"), read without raising.
- dot_kernel_meta(...): the constexprs / launch options every kernel with dots takes.
- LOG2E / LN2 as tl.constexpr globals for the kernels, derived from moco_fast.numerics.
- log1p / expm1: the two functions that keep a tiny loss exact, from tl.log / tl.exp (libdevice has
  them, but the interpreter runs no libdevice call).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from moco_fast import numerics

from . import heuristics as H

LOG2E = tl.constexpr(numerics.LOG2E)  # exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(numerics.LN2)  # log(x) == log2(x) * LN2


@triton.jit
def _probe():
    pass


@triton.jit
def log1p(x):
    """log(1 + x) to a few ulps for x > -1 (Kahan: the rounding of u = 1 + x cancels in
    log(u)·x/(u − 1)); tl.log is libdevice's accurate logf on NVIDIA under triton 3.6 and 3.8."""
    u = 1.0 + x
    exact = u == 1.0  # x below half an ulp of 1: log1p(x) = x (the safe divisor keeps 0/0 out)
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) − 1 to a few ulps (Kahan: (u − 1)·x/log(u) with u = exp(x), whose own rounding cancels);
    -1 once exp(x) rounds to 0."""
    u = tl.exp(x)
    um1 = u - 1.0
    edge = (u == 1.0) | (um1 == -1.0)  # x below half an ulp (expm1 = x), or exp(x) underflowed (-1)
    ratio = x / tl.where(edge, 1.0, tl.log(u))  # the safe divisor keeps x/0 and x/-inf out
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * ratio))


# @triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set before triton's import
# (checked by name: importing triton.runtime.interpreter would pull in numpy for nothing).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor, allowed=FLOATS) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"moco_fast triton backend: {name} must be one of {allowed}, got {t.dtype}")


@functools.cache
def device_info(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability); the interpreter gets a 1-SM sm_90 view (no splits by default)."""
    if device.type == "cuda" and not INTERPRETED:
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, (props.major, props.minor)
    return 1, (9, 0)


def device_guard(device: torch.device):
    """Context manager making ``device`` current (and so its current stream Triton's stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def fp32_precision() -> str:
    return numerics.fp32_matmul_precision()


def dot_setup(a: torch.Tensor, b: torch.Tensor):
    """(dot dtype name, its tl dtype, fp32 precision "ieee" | "tf32") for dots of a and b tiles."""
    name = H.dot_dtype_name(DTYPE_NAME[a.dtype], DTYPE_NAME[b.dtype])
    return name, getattr(tl, name), fp32_precision()


def dot_kernel_meta(config, d_pad: int, even_d: bool, dot_dtype: str, precision: str) -> dict:
    """Constexprs and launch options shared by the kernels with dots (forward split, dn): the tile of
    a heuristics.TileConfig, D_PAD / EVEN_D, the dot dtype (a heuristics dtype name) and precision."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        D_PAD=d_pad,
        EVEN_D=even_d,
        DOT_DTYPE=getattr(tl, dot_dtype),
        PRECISION=precision,
        EMULATE=INTERPRETED,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
