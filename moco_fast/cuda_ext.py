"""The "cuda" backend: thin wrappers over the compiled extension ``moco_fast._C`` (sources in csrc/).

``moco_fast._C`` registers its kernels as ``torch.ops.moco_fast_C.*`` (CUDA dispatch key only). This
module exposes the five functions of the backend interface (see ``moco_fast.backends``) on top of them.
``AVAILABLE`` is False when the extension was not built (``MOCO_FAST_BUILD_CUDA=0``, no CUDA toolkit at
install time, a CPU build of torch) or does not load; ``IMPORT_ERROR`` then says why.

What the backend takes (the selection layer reads these; nothing is handed to another backend):

* ``DTYPES``: float32, bfloat16, float16 for every InfoNCE tensor (fp64 raises TypeError);
  ``momentum_update_`` and ``enqueue_`` also take float64 natively (``STATE_DTYPES``).
* ``MAX_DIM``: the largest feature dimension d of the InfoNCE kernels (a larger d raises ValueError).
* CUDA tensors only (the ops have no CPU kernel).

Compute types of the InfoNCE forward (``kernels.heuristics.cuda_fwd_compute``):

* q and negatives both bf16 (both fp16): bf16 (fp16) tensor cores with fp32 accumulation; the
  probabilities that multiply the keys are rounded to that type too (as in flash attention).
* any other mix (some operand fp32, or bf16 with fp16): both operands are converted to fp32 (exact for
  16-bit inputs); the dots then follow ``moco_fast.numerics.fp32_matmul_precision()``: TF32 tensor cores
  for "tf32", IEEE fp32 FFMA for "ieee".
* the positive logit q_i·k_i, all sums, loss, lse and delta are fp32 in every case; the combine kernel
  merges the positive apart from the negatives' sums (loss and delta = O − k exact when it dominates).

The launch plan (compute type, key splits) is made here, in Python, by ``kernels.heuristics.cuda_fwd_plan``
from the kernel's tile facts (``torch.ops.moco_fast_C.infonce_forward_tile``), cached per problem shape,
and passed to ``torch.ops.moco_fast_C.infonce_forward``, which checks it and launches it as given.
"""

from __future__ import annotations

import functools

import torch

from moco_fast import numerics

from .backends import Support

MAX_DIM = 256  # largest d of the InfoNCE kernels (csrc/moco_fast.h kMaxD; a test checks they agree)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # every InfoNCE tensor
STATE_DTYPES = DTYPES + (torch.float64,)  # momentum_update_ and enqueue_ (fp64 math for fp64)

try:
    from moco_fast import _C  # noqa: F401  (loading the library registers torch.ops.moco_fast_C)

    _ops = torch.ops.moco_fast_C
    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - not built, or built against another torch
    _ops = None
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DTYPE_NAMES = {dt: str(dt).removeprefix("torch.") for dt in DTYPES}


def _heuristics():
    # Imported on the first plan, not with this module: moco_fast.kernels' package imports triton.
    from moco_fast.kernels import heuristics

    return heuristics


_CUDA = frozenset({"cuda"})
SUPPORT = {
    "info_nce": Support(devices=_CUDA, dtypes=frozenset(DTYPES), max_dim=MAX_DIM),
    "momentum_update": Support(
        devices=_CUDA, dtypes=frozenset(STATE_DTYPES), contiguous=True, modes=frozenset({"lerp"})
    ),
    "enqueue": Support(devices=_CUDA, dtypes=frozenset(STATE_DTYPES)),
}


def _unavailable() -> RuntimeError:
    return RuntimeError(f"moco_fast._C (the 'cuda' backend) is not available: {IMPORT_ERROR}")


def _check(fn: str, d: int | None = None, **tensors: torch.Tensor) -> None:
    """TypeError for a dtype outside DTYPES, ValueError for d outside [1, MAX_DIM], naming the argument."""
    if not AVAILABLE:
        raise _unavailable()
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(
                f"cuda_ext.{fn}: {name} must be float32, bfloat16 or float16 (the 'cuda' backend), got {t.dtype}"
            )
    if d is not None and not 1 <= d <= MAX_DIM:
        raise ValueError(f"cuda_ext.{fn}: the feature dimension d of q must be in [1, {MAX_DIM}], got {d}")


@functools.cache
def _num_sms(device: int) -> int:
    if device < 0:
        raise ValueError("cuda_ext.infonce_forward: q, k and negatives must be CUDA tensors")
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _tile(compute: str, d: int, device: int):
    """heuristics.CudaFwdTile of the forward kernel for (compute, d), resident blocks per SM on ``device``."""
    block_m, block_n, _threads, _smem, ctas, max_splits = _ops.infonce_forward_tile(compute, d, device)
    return _heuristics().CudaFwdTile(block_m, block_n, ctas, max_splits)


@functools.lru_cache(maxsize=1024)
def _plan(B: int, K: int, d: int, q_dtype: str, n_dtype: str, precision: str, device: int):
    return _heuristics().cuda_fwd_plan(
        B, K, d, q_dtype, n_dtype, precision, _num_sms(device), lambda c, dd: _tile(c, dd, device)
    )


def forward_plan(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor):
    """The heuristics.CudaFwdPlan infonce_forward launches for these inputs (checks dtypes and d; cached per shape)."""
    _check("infonce_forward", q.shape[-1], q=q, k=k, negatives=negatives)
    return _plan(
        q.shape[0],
        negatives.shape[0],
        q.shape[1],
        _DTYPE_NAMES[q.dtype],
        _DTYPE_NAMES[negatives.dtype],
        numerics.fp32_matmul_precision(),
        q.get_device(),  # the CUDA device index (-1 for a CPU tensor, which the op then rejects)
    )


def infonce_forward(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, scale: float, need_rank: bool = True):
    """(loss (B,), lse (B,), delta (B, d), rank (B,) int64), all from the kernels; see moco_fast.backends.

    ``need_rank`` is accepted and ignored (the rank count is free in the kernels). K = 0 gives loss 0
    and delta 0 exactly, lse = scale·q_i·k_i (fp32).
    """
    plan = forward_plan(q, k, negatives)
    return _ops.infonce_forward(q, k, negatives, float(scale), plan.compute, plan.num_splits, plan.keys_per_split)


def infonce_backward(grad, q, k, loss, delta, scale):
    """(dq in q.dtype, dk in k.dtype) from the saved loss and delta: dq = g·scale·delta,
    dk = g·scale·expm1(−loss)·q."""
    _check("infonce_backward", None, q=q, k=k)
    return _ops.infonce_backward(grad, q, k, loss, delta, float(scale))


def infonce_backward_negatives(grad, q, negatives, lse, scale):
    """dn (K, d) in negatives.dtype, recomputing the probabilities column-parallel."""
    _check("infonce_backward_negatives", q.shape[-1], q=q, negatives=negatives)
    return _ops.infonce_backward_negatives(grad, q, negatives, lse, float(scale))


def momentum_update_(targets, sources, momentum, exact=False) -> None:
    """target <- target + (1 - momentum)*(source - target) for whole lists, one launch (fp32 math, one
    rounding; fp64 math for fp64). Tensors of one CUDA device and one dtype of STATE_DTYPES. There is no
    ``exact`` (two-rounding) mode: SUPPORT declares it, so the selection never asks for it."""
    if not AVAILABLE:
        raise _unavailable()
    if exact:
        raise ValueError("the cuda backend has no exact (two-rounding) momentum mode; use backend='torch'")
    targets, sources = list(targets), list(sources)
    if not targets:
        return
    _ops.momentum_update_(targets, sources, float(momentum))


def enqueue_(queue, ptr, count, keys, normalize):
    """Ring write of keys at ptr (mod K), device-side ptr/count advance; returns ok (1,) bool."""
    if not AVAILABLE:
        raise _unavailable()
    return _ops.enqueue_(queue, ptr, count, keys, bool(normalize))
