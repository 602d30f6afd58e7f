"""Projection and prediction MLPs for the methods on top of the trainer's encoders (SimCLR, MoCo v3, InstDisc).

Every trainer encoder ends in a Linear named ``fc`` (``moco_fast.train.models``): a method swaps ``fc``
for its head, so the kNN monitor (:func:`moco_fast.train.models.backbone_features`) still reads the
representation before it.
"""

from __future__ import annotations

from torch import nn

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


def encoder_with_head(cfg, in_channels: int, head_dims: list[int] | None, **mlp_kw) -> nn.Module:
    """The configured encoder with ``fc`` replaced by ``mlp([features] + head_dims)`` (None: a linear fc to cfg.dim)."""
    encoder = encoder_factory(cfg.model, in_channels, cfg.width)(num_classes=cfg.dim)
    if head_dims is not None:
        encoder.fc = mlp([encoder.fc.in_features, *head_dims], **mlp_kw)
    return encoder
