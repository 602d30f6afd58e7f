"""Pieces the BYOL, SwAV and DINO methods share: the encoder with its projection head, the step counter."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...momentum import MomentumEncoder
from ..config import TrainConfig
from ..models import encoder_factory


def encoder_with_head(cfg: TrainConfig, in_channels: int, head: Callable[[int], nn.Module]) -> nn.Module:
    """The trainer's encoder (``cfg.model``) whose ``fc`` is replaced by ``head(feature_dim)``.

    The kNN monitor reads the representation before ``fc`` (``models.backbone_features``), as for MoCo.
    """
    encoder = encoder_factory(cfg.model, in_channels, cfg.width)(num_classes=cfg.dim)
    encoder.fc = head(encoder.fc.in_features)
    return encoder


def by_resolution(views: list[Tensor]) -> list[list[int]]:
    """Indices of the views grouped by image size, in order of first appearance (one forward per group,
    as multi-crop implementations batch their crops: the BatchNorm statistics span a resolution)."""
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    return list(groups.values())


def forward_views(fn: Callable[[Tensor], Tensor], views: list[Tensor]) -> list[Tensor]:
    """``[fn(v) for v in views]`` with one call per resolution (the views of a size concatenated)."""
    out: list[Tensor | None] = [None] * len(views)
    for group in by_resolution(views):
        y = fn(torch.cat([views[i] for i in group]))
        for i, part in zip(group, y.chunk(len(group))):
            out[i] = part
    return out


class StepCounter(nn.Module):
    """A module that counts its training forwards; the count is in its state_dict (exact resume)."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.step = 0
        self.steps_per_epoch = max(1, steps_per_epoch)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state) -> None:
        self.step = int(state["step"])


def momentum_target(cfg: TrainConfig, online: nn.Module, total_steps: int) -> MomentumEncoder:
    """The momentum copy of ``online`` (BYOL's target, DINO's teacher): --momentum, cosine to --final-momentum."""
    return MomentumEncoder(
        online,
        cfg.momentum,
        schedule="cosine" if cfg.momentum_schedule == "cosine" else None,
        final_momentum=cfg.final_momentum,
        total_steps=total_steps,
        backend=cfg.backend,
    )
