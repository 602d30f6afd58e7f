"""The "cuda" backend: thin wrappers over the compiled extension ``moco_fast._C`` (sources in csrc/).

``moco_fast._C`` registers its kernels as ``torch.ops.moco_fast_C.*`` (CUDA dispatch key only). This
module exposes the five functions of the backend interface (see ``moco_fast.backends``) on top of them.
``AVAILABLE`` is False when the extension was not built (``MOCO_FAST_BUILD_CUDA=0``, no CUDA toolkit at
install time, a CPU build of torch) or does not load; ``IMPORT_ERROR`` then says why.

Compute types of the InfoNCE forward:

* q and negatives both bf16 (both fp16): bf16 (fp16) tensor cores with fp32 accumulation; the
  probabilities that multiply the keys are rounded to that type too (as in flash attention).
* any other mix (some operand fp32, or bf16 with fp16): both operands are converted to fp32 (exact for
  16-bit inputs); the dots then follow ``torch.get_float32_matmul_precision()``: TF32 tensor cores unless
  it is "highest", IEEE fp32 FFMA otherwise.
* the positive logit q_i·k_i, all sums, lse and out are fp32 in every case.

Inputs the kernels do not take are handed to the portable "torch" backend (``moco_fast.chunked``), on the
same device: a feature dimension above 256 and fp64 tensors (gradcheck).
"""

from __future__ import annotations

import torch

from .backends import Support

MAX_DIM = 256  # largest d of the InfoNCE kernels (csrc/moco_fast.h kMaxD)

try:
    from moco_fast import _C  # noqa: F401  (loading the library registers torch.ops.moco_fast_C)

    _ops = torch.ops.moco_fast_C
    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - not built, or built against another torch
    _ops = None
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_CUDA = frozenset({"cuda"})
SUPPORT = {
    "info_nce": Support(devices=_CUDA, dtypes=frozenset(_KERNEL_DTYPES), max_dim=MAX_DIM),
    "momentum_update": Support(
        devices=_CUDA, dtypes=frozenset(_KERNEL_DTYPES), contiguous=True, modes=frozenset({"lerp"})
    ),
    "enqueue": Support(devices=_CUDA, dtypes=frozenset(_KERNEL_DTYPES + (torch.float64,))),
}


def _unavailable() -> RuntimeError:
    return RuntimeError(f"moco_fast._C (the 'cuda' backend) is not available: {IMPORT_ERROR}")


def _kernels_take(*tensors: torch.Tensor) -> bool:
    return tensors[0].shape[-1] <= MAX_DIM and all(t.dtype in _KERNEL_DTYPES for t in tensors)


def allow_tf32() -> bool:
    """Whether fp32 InfoNCE dots may use TF32 tensor cores (torch's float32 matmul precision)."""
    return torch.get_float32_matmul_precision() != "highest"


def infonce_forward(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, scale: float, need_rank: bool = True):
    """(loss (B,), lse (B,), out (B, d), rank (B,) int64); see moco_fast.backends. ``need_rank`` is ignored."""
    if not AVAILABLE:
        raise _unavailable()
    if not _kernels_take(q, k, negatives):
        from moco_fast import torch_backend as chunked

        return chunked.infonce_forward(q, k, negatives, scale)
    lse, out, rank = _ops.infonce_forward(q, k, negatives, float(scale), allow_tf32())
    # TODO(cuda): write the per-row loss from the kernels instead of these extra torch ops.
    return lse - (q.float() * scale * k.float()).sum(dim=1), lse, out, rank


def infonce_backward(grad, q, k, lse, out, scale):
    """(dq in q.dtype, dk in k.dtype) from the saved lse and out."""
    if not AVAILABLE:
        raise _unavailable()
    if not all(t.dtype in _KERNEL_DTYPES for t in (q, k)):
        from moco_fast import torch_backend as chunked

        return chunked.infonce_backward(grad, q, k, lse, out, scale)
    return _ops.infonce_backward(grad, q, k, lse, out, float(scale))


def infonce_backward_negatives(grad, q, negatives, lse, scale):
    """dn (K, d) in negatives.dtype, recomputing the probabilities column-parallel."""
    if not AVAILABLE:
        raise _unavailable()
    if not _kernels_take(q, negatives):
        from moco_fast import torch_backend as chunked

        return chunked.infonce_backward_negatives(grad, q, negatives, lse, scale)
    return _ops.infonce_backward_negatives(grad, q, negatives, lse, float(scale))


def momentum_update_(targets, sources, momentum, exact=False) -> None:
    """target <- momentum*target + (1 - momentum)*source for whole lists, one launch."""
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
