"""InstDisc / NPID (Wu et al. 2018): a memory bank of one feature per training image (moco_fast.MemoryBankHead).

One augmented view per step (the first); the encoder's linear ``fc`` embeds it (128-d); the loss is the
non-parametric softmax of the feature against the bank — EXACT over all N rows by default
(``--num-negatives 0``), or against K uniformly sampled rows (NPID's NCE setting, approximated by
InfoNCE) — and the bank rows of the batch are then updated with momentum (``--bank-momentum``, 0.5).
The method asks the data source for each image's index (``needs_indices``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...memory_bank import MemoryBankHead
from ..config import ConfigError, TrainConfig
from . import Method
from .projection import encoder_with_head, mlp


class InstDiscModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: MemoryBankHead):
        super().__init__()
        self.encoder_q = encoder
        self.head = head

    def forward(self, views: list[Tensor], indices: Tensor):
        loss, stats = self.head(self.encoder_q(views[0]), indices, return_stats=True)
        return loss, {"acc1": stats.acc1, "acc5": stats.acc5}


def build(cfg: TrainConfig, in_channels: int, total_steps: int, *, num_samples: int) -> InstDiscModel:
    head = (lambda features: mlp([features, cfg.hidden_dim or 512, cfg.dim], bn=cfg.mlp_bn)) if cfg.mlp else None
    encoder = encoder_with_head(cfg, in_channels, head)
    head = MemoryBankHead(
        num_samples,
        cfg.dim,
        temperature=cfg.temperature,
        momentum=cfg.bank_momentum,
        num_negatives=cfg.num_negatives or None,
        backend=cfg.backend,
    )
    return InstDiscModel(encoder, head)


def check(cfg: TrainConfig, global_batch: int) -> None:
    if not 0.0 <= cfg.bank_momentum < 1.0:
        raise ConfigError(f"bank_momentum must be in [0, 1), got {cfg.bank_momentum}")


METHOD = Method(
    name="instdisc",
    description="InstDisc/NPID: exact non-parametric softmax against a memory bank of every image (MemoryBankHead)",
    build=build,
    check=check,
    needs_indices=True,
)
