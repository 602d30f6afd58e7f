"""SwAV: swapped prediction of Sinkhorn codes over prototypes, with multi-crop and an optional feature queue.

Per step: normalize the prototypes; z_v = normalize(projector(backbone(crop_v))) for every crop (one forward
per resolution); scores_v = z_v·Cᵀ; moco_fast.SwaVLoss(scores of the 2 global crops, scores of the local
crops, queue scores). The queue (moco_fast.SwaVQueue, --swav-queue-size) is filled with the global crops'
z from epoch --swav-queue-start-epoch on and joins Sinkhorn once full. Prototypes are frozen (zero gradient)
for the first --freeze-prototypes-steps steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...swav import SwaVLoss, SwaVPrototypes, SwaVQueue
from ..config import ConfigError, TrainConfig
from . import Method
from ._family import StepCounter, forward_views
from .projection import encoder_with_head


def _projector(features: int, hidden: int, dim: int) -> torch.nn.Module:
    """SwAV's projection head: Linear → BN → ReLU → Linear (lightly's SwaVProjectionHead)."""
    from ...byol import BYOLProjectionHead  # the same Linear-BN-ReLU-Linear MLP

    return BYOLProjectionHead(features, hidden, dim)


class SwaVModel(StepCounter):
    """``model([g1, g2, *locals]) -> (loss, {"queue": 1.0 if the queue joined Sinkhorn else 0.0})``."""

    def __init__(self, cfg: TrainConfig, in_channels: int, total_steps: int):
        super().__init__(total_steps // max(1, cfg.epochs))
        self.encoder_q = encoder_with_head(
            cfg, in_channels, lambda features: _projector(features, cfg.hidden_dim or 512, cfg.dim)
        )
        self.prototypes = SwaVPrototypes(cfg.dim, cfg.prototypes, cfg.freeze_prototypes_steps)
        self.criterion = SwaVLoss(
            cfg.temperature, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon, sinkhorn_gather_distributed=True
        )
        self.queue = SwaVQueue(2, cfg.swav_queue_size, cfg.dim, backend=cfg.backend) if cfg.swav_queue_size else None
        self.queue_start_epoch = cfg.swav_queue_start_epoch

    def forward(self, views: list[Tensor]):
        if self.training:
            self.prototypes.normalize()
        z = [F.normalize(e, dim=1) for e in forward_views(self.encoder_q, views)]
        scores = [self.prototypes(zi, self.step) for zi in z]
        use_queue = self.queue is not None and self.epoch >= self.queue_start_epoch
        queue_scores = self.queue.outputs(self.prototypes) if use_queue else None
        loss = self.criterion(scores[:2], scores[2:], queue_scores)
        if self.training:
            if use_queue:
                self.queue.enqueue([z[0], z[1]])
            self.step += 1
        used = torch.tensor(float(queue_scores is not None), device=loss.device)
        return loss, {"queue": used}


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> SwaVModel:
    return SwaVModel(cfg, in_channels, total_steps)


def check(cfg: TrainConfig, global_batch: int) -> None:
    if cfg.swav_queue_size and cfg.swav_queue_size < cfg.batch_size:
        raise ConfigError(f"swav_queue_size {cfg.swav_queue_size} is smaller than the batch ({cfg.batch_size})")


METHOD = Method(
    name="swav",
    description="SwAV: swapped prediction of log-domain Sinkhorn codes, multi-crop (moco_fast.SwaVLoss)",
    build=build,
    check=check,
)
