"""The "torch" backend: every op in portable PyTorch, for any device (the CPU default).

One module per op family; ``SUPPORT`` declares what they serve (see the contract in
``moco_fast.backends``). All arithmetic is fp32 whatever the input dtypes, or fp64 when an input is
fp64 (so gradcheck can run on this backend).
"""

from __future__ import annotations

from ..backends import Support
from ..validation import FLOAT_DTYPES
from .enqueue import enqueue_
from .infonce import infonce_backward, infonce_backward_negatives, infonce_forward
from .momentum import momentum_update_

AVAILABLE = True

_ANY_FLOAT = frozenset(FLOAT_DTYPES)
SUPPORT = {
    "info_nce": Support(devices=None, dtypes=_ANY_FLOAT),
    "momentum_update": Support(devices=None, dtypes=_ANY_FLOAT, modes=frozenset({"lerp", "exact"})),
    "enqueue": Support(devices=None, dtypes=_ANY_FLOAT),
}

__all__ = [
    "AVAILABLE",
    "SUPPORT",
    "enqueue_",
    "infonce_backward",
    "infonce_backward_negatives",
    "infonce_forward",
    "momentum_update_",
]

# --- NT-Xent / MoCo v3 / CMC / memory bank
from .contrast import contrast_backward_keys, contrast_forward  # noqa: E402
from .memory_bank import memory_bank_update_  # noqa: E402

SUPPORT["contrast"] = Support(devices=None, dtypes=_ANY_FLOAT)
SUPPORT["memory_bank_update"] = Support(devices=None, dtypes=_ANY_FLOAT)
__all__ += ["contrast_backward_keys", "contrast_forward", "memory_bank_update_"]
# --- BYOL / SwAV / DINO
from .dino import dino_prototype_grad, dino_softmax_pass  # noqa: E402

SUPPORT["dino_loss"] = Support(devices=None, dtypes=_ANY_FLOAT)
__all__ += ["dino_prototype_grad", "dino_softmax_pass"]
