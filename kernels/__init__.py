"""Triton kernels of moco_fast (the "triton" backend), shipped as ``moco_fast.kernels``.

Stages, one file each: infonce_fwd.py (split sweep over the negatives), infonce_combine.py (merge
of the splits), infonce_bwd.py (dq/dk, and dn when the negatives need a gradient), momentum.py,
enqueue.py; heuristics.py picks the launch configs, launch.py holds the launchers.

``AVAILABLE`` is True iff triton imports (and the kernels compile to Python objects); the five
interface functions (see moco_fast/backends.py) are then the launchers of launch.py. Without
triton this package still imports, with AVAILABLE = False and functions that raise.
"""

from __future__ import annotations

import torch

from moco_fast.backends import Support

try:
    from .launch import (
        INTERPRETED,
        enqueue_,
        infonce_backward,
        infonce_backward_negatives,
        infonce_forward,
        momentum_update_,
    )

    AVAILABLE = True
    IMPORT_ERROR = None
except Exception as _err:  # noqa: BLE001 - no triton (or a broken one) just disables the backend
    AVAILABLE = False
    INTERPRETED = False
    IMPORT_ERROR = _err

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"moco_fast triton backend is not available: {IMPORT_ERROR!r}")

    infonce_forward = infonce_backward = infonce_backward_negatives = _unavailable
    momentum_update_ = enqueue_ = _unavailable

_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests); compiled, on CUDA tensors.
_DEVICES = frozenset({"cpu"} if INTERPRETED else {"cuda"})
SUPPORT = {
    "info_nce": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, max_dim=256),
    "momentum_update": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, contiguous=True, modes=frozenset({"lerp"})),
    "enqueue": Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES | {torch.float64}),
}

__all__ = [
    "SUPPORT",
    "AVAILABLE",
    "INTERPRETED",
    "infonce_forward",
    "infonce_backward",
    "infonce_backward_negatives",
    "momentum_update_",
    "enqueue_",
]

# --- BYOL / SwAV / DINO: the DINO loss's two kernel stages (dino_fwd.py, dino_bwd.py), kernel + launcher each.
if AVAILABLE:
    from .dino_bwd import dino_prototype_grad
    from .dino_fwd import dino_softmax_pass
else:
    dino_softmax_pass = dino_prototype_grad = _unavailable

SUPPORT["dino_loss"] = Support(devices=_DEVICES, dtypes=_KERNEL_DTYPES, max_dim=256)
__all__ += ["dino_prototype_grad", "dino_softmax_pass"]
