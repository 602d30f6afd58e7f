"""MoCo (v1/v2, and the symmetric CIFAR-demo variant): the queue of momentum keys, on moco_fast.MoCo."""

from __future__ import annotations

import torch
from torch import Tensor

from ...builder import MoCo
from ..config import ConfigError, TrainConfig
from ..models import encoder_factory
from . import Method

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MoCoModel(MoCo):
    """moco_fast.MoCo with the trainer's calling convention: ``model([x1, x2]) -> (loss, stats dict)``."""

    def forward(self, views: list[Tensor]):  # type: ignore[override]
        loss, stats = super().forward(*views)
        return loss, {"acc1": stats.acc1, "acc5": stats.acc5}


def build(cfg: TrainConfig, in_channels: int, total_steps: int) -> MoCoModel:
    return MoCoModel(
        encoder_factory(cfg.model, in_channels, cfg.width),
        dim=cfg.dim,
        K=cfg.queue_size,
        m=cfg.momentum,
        T=cfg.temperature,
        mlp=cfg.mlp,
        symmetric=cfg.symmetric,
        bn_splits=cfg.bn_splits,
        momentum_schedule="cosine" if cfg.momentum_schedule == "cosine" else None,
        final_momentum=cfg.final_momentum,
        total_steps=total_steps,
        queue_dtype=_DTYPES[cfg.queue_dtype],
        backend=cfg.backend,
    )


def check(cfg: TrainConfig, global_batch: int) -> None:
    keys_per_step = global_batch * (2 if cfg.symmetric else 1)
    if cfg.queue_size < keys_per_step:
        raise ConfigError(
            f"queue_size {cfg.queue_size} is smaller than the keys enqueued per step ({keys_per_step}: "
            f"global batch {global_batch}{' x 2 views' if cfg.symmetric else ''}); "
            "use --queue-size >= the global batch"
        )


METHOD = Method(
    name="moco",
    description="MoCo: InfoNCE against a queue of momentum-encoder keys (moco_fast.MoCoHead)",
    build=build,
    check=check,
)
