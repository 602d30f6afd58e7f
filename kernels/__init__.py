"""Triton kernels of moco_fast (the "triton" backend), shipped as ``moco_fast.kernels``.

Stages, one file each: infonce_fwd.py (split sweep over the negatives), infonce_combine.py (merge
of the splits), infonce_bwd.py (dq/dk, and dn when the negatives need a gradient), momentum.py,
enqueue.py; heuristics.py picks the launch configs, launch.py holds the launchers.

``AVAILABLE`` is True iff triton imports (and the kernels compile to Python objects); the five
interface functions (see moco_fast/backends.py) are then the launchers of launch.py. Without
triton this package still imports, with AVAILABLE = False and functions that raise.
"""

from __future__ import annotations

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

__all__ = [
    "AVAILABLE",
    "INTERPRETED",
    "infonce_forward",
    "infonce_backward",
    "infonce_backward_negatives",
    "momentum_update_",
    "enqueue_",
]
