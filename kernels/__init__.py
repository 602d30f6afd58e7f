"""Triton kernels of moco_fast (the "triton" backend), shipped as ``moco_fast.kernels``.

One file per kernel stage, each holding its @triton.jit kernel(s) and the launcher that plans
(heuristics.py: tiles, splits, dot dtypes; pure Python), allocates and launches them:
infonce_fwd.py (split sweep + ``infonce_forward``), infonce_combine.py (merge of the splits),
infonce_bwd.py (``infonce_backward``, ``infonce_backward_negatives``), momentum.py
(``momentum_update_``), enqueue.py (``enqueue_``); runtime.py holds the shared launcher plumbing.

``AVAILABLE`` is False only when the ``triton`` package is missing (``IMPORT_ERROR`` says so); the
five interface functions (see moco_fast/backends.py) then raise. Any other error while importing
these modules -- a broken kernel module, a broken triton -- propagates. ``INTERPRETED`` is True
when the kernels run in the Triton interpreter (TRITON_INTERPRET=1 set before triton's import).
"""

from __future__ import annotations

import torch

from moco_fast.backends import Support

try:
    import triton  # noqa: F401
except ModuleNotFoundError as _err:
    if _err.name != "triton":
        raise  # triton is there but broken: not the same as "not installed"
    AVAILABLE = False
    INTERPRETED = False
    IMPORT_ERROR: BaseException | None = _err

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"moco_fast triton backend is not available: {IMPORT_ERROR!r}")

    infonce_forward = infonce_backward = infonce_backward_negatives = _unavailable
    momentum_update_ = enqueue_ = _unavailable
else:
    from .enqueue import enqueue_
    from .infonce_bwd import infonce_backward, infonce_backward_negatives
    from .infonce_fwd import infonce_forward
    from .momentum import momentum_update_
    from .runtime import INTERPRETED

    AVAILABLE = True
    IMPORT_ERROR = None

# What the kernels serve (see moco_fast/backends.py). Under TRITON_INTERPRET=1 they run on CPU tensors
# (tests); compiled, on CUDA tensors.
_DEVICES = frozenset({"cpu"} if INTERPRETED else {"cuda"})
_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
SUPPORT = {
    "info_nce": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, max_dim=256),
    "momentum_update": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, contiguous=True, modes=frozenset({"lerp"})),
    "enqueue": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES | {torch.float64}),
}

__all__ = [
    "SUPPORT",
    "AVAILABLE",
    "IMPORT_ERROR",
    "INTERPRETED",
    "infonce_forward",
    "infonce_backward",
    "infonce_backward_negatives",
    "momentum_update_",
    "enqueue_",
]

# --- NT-Xent / MoCo v3 / CMC / memory bank: the contrastive cross-entropy core and the memory-bank update
# (kernels + launchers: contrast_fwd.py (splits merged by infonce_combine.py), contrast_bwd.py, memory_bank.py)
if AVAILABLE:
    from .contrast_bwd import contrast_backward_keys
    from .contrast_fwd import contrast_forward
    from .memory_bank import memory_bank_update_
else:
    contrast_forward = contrast_backward_keys = memory_bank_update_ = _unavailable

SUPPORT["contrast"] = Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, max_dim=256)
SUPPORT["memory_bank_update"] = Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, contiguous=True)
__all__ += ["contrast_forward", "contrast_backward_keys", "memory_bank_update_"]
# --- BYOL / SwAV / DINO: the DINO loss's two kernel stages (dino_fwd.py, dino_bwd.py), kernel + launcher each.
if AVAILABLE:
    from .dino_bwd import dino_prototype_grad
    from .dino_fwd import dino_softmax_pass
else:
    dino_softmax_pass = dino_prototype_grad = _unavailable

SUPPORT["dino_loss"] = Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, max_dim=256)
__all__ += ["dino_prototype_grad", "dino_softmax_pass"]
