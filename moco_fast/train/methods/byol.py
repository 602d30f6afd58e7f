"""BYOL: an online encoder + projector + predictor regressing a momentum target's projections.

loss = byol_loss(p1, z2) + byol_loss(p2, z1) with byol_loss = 2 − 2·cos (moco_fast.BYOLLoss); the target is
a moco_fast.MomentumEncoder of encoder + projector with the cosine schedule (``--momentum`` → 1).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...byol import BYOLLoss, BYOLPredictionHead, BYOLProjectionHead
from ..config import TrainConfig
from . import Method
from .projection import encoder_with_head, momentum_target


class BYOLModel(nn.Module):
    """``model([x1, x2, ...]) -> (loss, {"cos": mean cos(p, z)})``; views after the first two are ignored."""

    def __init__(self, cfg: TrainConfig, in_channels: int, total_steps: int):
        super().__init__()
        self.encoder_q = encoder_with_head(
            cfg, in_channels, lambda features: BYOLProjectionHead(features, cfg.hidden_dim or 512, cfg.dim)
        )
        self.predictor = BYOLPredictionHead(cfg.dim, cfg.hidden_dim or 512, cfg.dim)
        self.momentum_encoder = momentum_target(cfg, self.encoder_q, total_steps)
        self.criterion = BYOLLoss()

    def forward(self, views: list[Tensor]):
        x1, x2 = views[0], views[1]
        if self.training:
            self.momentum_encoder.update()  # the target follows the online network of the previous step
        # One forward per view (BatchNorm statistics per view, as in BYOL).
        p1, p2 = self.predictor(self.encoder_q(x1)), self.predictor(self.encoder_q(x2))
        z1, z2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = self.criterion(p1, p2, z1, z2)
        return loss, {"cos": 1.0 - loss.detach() / 4.0}  # each direction is 2 − 2·cos


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> BYOLModel:
    return BYOLModel(cfg, in_channels, total_steps)


METHOD = Method(
    name="byol",
    description="BYOL: predictor + 2 − 2·cos against a momentum target (moco_fast.BYOLLoss, MomentumEncoder)",
    build=build,
)
