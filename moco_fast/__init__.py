"""moco_fast: fused, memory-light kernels for MoCo-style contrastive learning.

The public API, nothing else:

* :func:`info_nce` — single-pass InfoNCE over a key queue, never materializing the logits.
* :func:`momentum_update` and :class:`MomentumEncoder` — the EMA key encoder, one fused update.
* :class:`KeyQueue` — the ring buffer of keys (device-side pointer, wrap-around, NaN-safe).
* :class:`MoCoHead` — normalize, InfoNCE against [k; queue], enqueue: a drop-in for the official code.
* :func:`concat_all_gather`, :func:`batch_shuffle_ddp`, :func:`batch_unshuffle_ddp` — DDP helpers.
* :class:`MoCo` — the official MoCo builder's constructor on top of the above (forward returns
  ``(loss, stats)``, not logits and labels).
* :func:`contrastive_cross_entropy` — the fused core of the in-batch / memory-bank losses: queries
  against a key set with integer targets and an optional excluded column, no logits materialized.
* :func:`nt_xent`, :class:`NTXentLoss` (SimCLR, lightly-compatible), :func:`mocov3_loss`,
  :func:`cmc_loss` (multi-view CMC), :func:`all_gather_with_grad` — end-to-end dictionaries.
* :class:`MemoryBank`, :class:`MemoryBankHead` — InstDisc / NPID, with the exact softmax over the bank.
* BYOL / SimSiam: :class:`NegativeCosineSimilarity`, :func:`byol_loss`, :class:`BYOLLoss`,
  :class:`BYOLProjectionHead`, :class:`BYOLPredictionHead` (the target: :class:`MomentumEncoder`, cosine).
* SwAV: :func:`sinkhorn` (log domain), :class:`SwaVLoss`, :class:`SwaVPrototypes`, :class:`SwaVQueue`.
* DINO: :func:`dino_loss` (fused, no (B, P) logits), :class:`DINOLoss`, :class:`DINOHead`,
  :class:`NonFiniteTeacherError`; multi-crop: :class:`MultiCropTransform`.
"""

from .backends import available_backends
from .builder import MoCo
from .distributed import batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather
from .functional import InfoNCEStats, info_nce, momentum_update
from .head import MoCoHead
from .momentum import MomentumEncoder, cosine_momentum
from .queue import KeyQueue, NonFiniteKeysError

# isort: split
# --- NT-Xent / MoCo v3 / CMC / memory bank
from .distributed import all_gather_with_grad
from .functional import cmc_loss, cmc_pairs, contrastive_cross_entropy, mocov3_loss, nt_xent
from .losses import NTXentLoss
from .memory_bank import MemoryBank, MemoryBankHead, NonFiniteFeaturesError

__version__ = "0.1.0"

__all__ = [
    "InfoNCEStats",
    "KeyQueue",
    "MoCo",
    "MoCoHead",
    "MomentumEncoder",
    "NonFiniteKeysError",
    "available_backends",
    "batch_shuffle_ddp",
    "batch_unshuffle_ddp",
    "concat_all_gather",
    "cosine_momentum",
    "info_nce",
    "momentum_update",
    # --- NT-Xent / MoCo v3 / CMC / memory bank
    "MemoryBank",
    "MemoryBankHead",
    "NTXentLoss",
    "NonFiniteFeaturesError",
    "all_gather_with_grad",
    "cmc_loss",
    "cmc_pairs",
    "contrastive_cross_entropy",
    "mocov3_loss",
    "nt_xent",
]

# --- BYOL / SwAV / DINO
from .byol import BYOLLoss, BYOLPredictionHead, BYOLProjectionHead, NegativeCosineSimilarity, byol_loss  # noqa: E402
from .dino import DINOHead, DINOLoss, NonFiniteTeacherError  # noqa: E402
from .functional import dino_loss  # noqa: E402
from .multicrop import MultiCropTransform  # noqa: E402
from .swav import SwaVLoss, SwaVPrototypes, SwaVQueue, sinkhorn  # noqa: E402

__all__ += [
    "BYOLLoss",
    "BYOLPredictionHead",
    "BYOLProjectionHead",
    "DINOHead",
    "DINOLoss",
    "MultiCropTransform",
    "NegativeCosineSimilarity",
    "NonFiniteTeacherError",
    "SwaVLoss",
    "SwaVPrototypes",
    "SwaVQueue",
    "byol_loss",
    "dino_loss",
    "sinkhorn",
]
