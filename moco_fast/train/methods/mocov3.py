"""MoCo v3 (Chen, Xie & He 2021): no queue; a predictor on the query branch and the symmetric loss
ctr(q1, k2) + ctr(q2, k1), ctr = moco_fast.mocov3_loss (keys of every rank, labels offset by rank, × 2T).

The base encoder's ``fc`` is the projector (BN MLP ending in an affine-free BN, as the paper); the
momentum encoder is a copy of backbone + projector, updated with a cosine momentum schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...functional import mocov3_loss
from ...momentum import MomentumEncoder
from ..config import TrainConfig
from . import Method
from .projection import encoder_with_head, mlp, momentum_target


class MoCoV3Model(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        predictor: nn.Module,
        momentum_encoder: MomentumEncoder,
        temperature: float,
        backend: str = "auto",
    ):
        super().__init__()
        self.encoder_q = encoder
        self.predictor = predictor
        self.momentum_encoder = momentum_encoder
        self.temperature, self.backend = temperature, backend

    def forward(self, views: list[Tensor]):
        x1, x2 = views[0], views[1]
        batch = x1.shape[0]
        q1, q2 = self.predictor(self.encoder_q(torch.cat([x1, x2]))).split(batch)
        if self.training:
            self.momentum_encoder.update()
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(torch.cat([x1, x2])).split(batch)
        loss12, s12 = mocov3_loss(q1, k2, self.temperature, backend=self.backend, return_stats=True)
        loss21, s21 = mocov3_loss(q2, k1, self.temperature, backend=self.backend, return_stats=True)
        stats = {"acc1": 0.5 * (s12.acc1 + s21.acc1), "acc5": 0.5 * (s12.acc5 + s21.acc5)}
        return loss12 + loss21, stats


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> MoCoV3Model:
    hidden = cfg.hidden_dim or 512
    encoder = encoder_with_head(cfg, in_channels, lambda features: mlp([features, hidden, cfg.dim], last_bn=True))
    predictor = mlp([cfg.dim, hidden, cfg.dim], bn=True, last_bn=False)
    momentum_encoder = momentum_target(cfg, encoder, total_steps)
    return MoCoV3Model(encoder, predictor, momentum_encoder, cfg.temperature, cfg.backend)


METHOD = Method(
    name="mocov3",
    description="MoCo v3: predictor + symmetric loss against the momentum keys of the batch (moco_fast.mocov3_loss)",
    build=build,
)
