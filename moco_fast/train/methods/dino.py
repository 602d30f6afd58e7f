"""DINO: a student matching a momentum teacher's centered, sharpened softmax over P prototypes, multi-crop.

Student: backbone → moco_fast.DINOHead (MLP → L2-normalized bottleneck h → weight-normalized prototypes W)
on every crop (one forward per resolution); teacher: a moco_fast.MomentumEncoder of the student (cosine
schedule --momentum → 1) on the two global crops. With --dino-fused true (default) the loss is
moco_fast.DINOLoss.forward_fused(h_t, h_s, W_s, W_t): never the (B, P) logits; with false, lightly's way
(logits h·Wᵀ then DINOLoss). The last layer is frozen (zero gradient) for --freeze-last-layer epochs; the
teacher temperature warms up over --warmup-teacher-temp-epochs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...dino import DINOHead, DINOLoss
from ..config import TrainConfig
from ..models import backbone_features
from . import Method
from ._family import StepCounter, forward_views
from .projection import encoder_with_head, momentum_target


class DINOModel(StepCounter):
    """``model([g1, g2, *locals]) -> (loss, {"teacher_temp": T_t})``."""

    def __init__(self, cfg: TrainConfig, in_channels: int, total_steps: int):
        super().__init__(total_steps // max(1, cfg.epochs))
        self.encoder_q = encoder_with_head(
            cfg,
            in_channels,
            lambda features: DINOHead(
                features,
                cfg.hidden_dim or 512,
                cfg.bottleneck_dim,
                cfg.prototypes,
                batch_norm=True,  # a CNN backbone (DINO's ResNet setting)
                freeze_last_layer=cfg.freeze_last_layer,
            ),
        )
        self.momentum_encoder = momentum_target(cfg, self.encoder_q, total_steps)
        self.criterion = DINOLoss(
            cfg.prototypes,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            student_temp=cfg.temperature,
            center_momentum=cfg.center_momentum,
            backend=cfg.backend,
        )
        self.fused = cfg.dino_fused

    def _features(self, encoder, x: Tensor) -> Tensor:
        return encoder.fc.bottleneck(backbone_features(encoder, x))

    def forward(self, views: list[Tensor]):
        if self.training:
            self.momentum_encoder.update()
        epoch = self.epoch
        student_head = self.encoder_q.fc
        teacher = self.momentum_encoder.module
        h_s = forward_views(lambda x: self._features(self.encoder_q, x), views)
        with torch.no_grad():
            h_t = forward_views(lambda x: self._features(teacher, x), views[:2])
        w_s = student_head.effective_weight(frozen=student_head.last_layer_frozen(epoch))
        w_t = teacher.fc.prototypes.detach()
        if self.fused:
            loss = self.criterion.forward_fused(h_t, h_s, w_s, w_t, epoch=epoch)
        else:
            loss = self.criterion([h @ w_t.T for h in h_t], [h @ w_s.T for h in h_s], epoch=epoch)
        if self.training:
            self.step += 1
        t_temp = torch.tensor(self.criterion.teacher_temperature(epoch=epoch), device=loss.device)
        return loss, {"teacher_temp": t_temp}


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> DINOModel:
    return DINOModel(cfg, in_channels, total_steps)


METHOD = Method(
    name="dino",
    description="DINO: centered, sharpened teacher softmax over prototypes, multi-crop, fused loss (DINOLoss)",
    build=build,
)
