"""Heads for the methods on top of the trainer's encoders: MLPs, the encoder with its head, the momentum copy.

Every trainer encoder ends in a Linear named ``fc`` (``moco_fast.train.models``): a method swaps ``fc``
for its head, so the kNN monitor (:func:`moco_fast.train.models.backbone_features`) still reads the
representation before it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...momentum import MomentumEncoder
from ..models import encoder_factory


def mlp(dims: list[int], *, bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear layers through ``dims`` with BN + ReLU between them (MoCo v3's ``_build_mlp``); ``last_bn``
    ends in an affine-free BatchNorm (MoCo v3's projector). ``bn=False``: Linear-ReLU-Linear (SimCLR v1)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not bn or (last and not last_bn)))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def encoder_with_head(cfg, in_channels: int, head: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """The configured encoder (``cfg.model``) with ``fc`` replaced by ``head(feature width)`` (None: its linear
    fc to cfg.dim). The kNN monitor reads the representation before ``fc`` (``models.backbone_features``)."""
    encoder = encoder_factory(cfg.model, in_channels, cfg.width)(num_classes=cfg.dim)
    if head is not None:
        encoder.fc = head(encoder.fc.in_features)
    return encoder


def momentum_target(cfg, online: nn.Module, total_steps: int) -> MomentumEncoder:
    """The momentum copy of ``online`` (MoCo v3's key encoder, BYOL's target, DINO's teacher): --momentum,
    cosine to --final-momentum with --momentum-schedule cosine."""
    return MomentumEncoder(
        online,
        cfg.momentum,
        schedule="cosine" if cfg.momentum_schedule == "cosine" else None,
        final_momentum=cfg.final_momentum,
        total_steps=total_steps,
        backend=cfg.backend,
    )
