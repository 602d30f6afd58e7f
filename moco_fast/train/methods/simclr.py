"""SimCLR (Chen et al. 2020): end-to-end in-batch negatives, NT-Xent over both views (moco_fast.nt_xent).

One encoder with SimCLR's projection MLP; both views go through it as one batch (BatchNorm sees 2B
images, as SimCLR's global BN does), and NT-Xent contrasts each of the 2B rows against the other 2B − 2
(every rank's rows under DDP, gradients returned to their owners). K = 2B − 2 negatives per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...functional import nt_xent
from ..config import TrainConfig
from . import Method
from .projection import encoder_with_head, mlp


class SimCLRModel(nn.Module):
    def __init__(self, encoder: nn.Module, temperature: float, backend: str = "auto"):
        super().__init__()
        self.encoder_q = encoder
        self.temperature, self.backend = temperature, backend

    def forward(self, views: list[Tensor]):
        z = self.encoder_q(torch.cat(views[:2]))
        z0, z1 = F.normalize(z, dim=1).chunk(2)
        loss, stats = nt_xent(
            z0, z1, self.temperature, gather_distributed=True, backend=self.backend, return_stats=True
        )
        return loss, {"acc1": stats.acc1, "acc5": stats.acc5}


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> SimCLRModel:
    probe = encoder_with_head(cfg, in_channels)  # its width; built first, as the seeds' results were measured
    hidden = cfg.hidden_dim or probe.fc.in_features
    head = (lambda features: mlp([features, hidden, cfg.dim], bn=cfg.mlp_bn)) if cfg.mlp else None
    return SimCLRModel(encoder_with_head(cfg, in_channels, head), cfg.temperature, cfg.backend)


METHOD = Method(
    name="simclr",
    description="SimCLR: NT-Xent over the two views of the batch, end to end (moco_fast.nt_xent)",
    build=build,
)
