"""Pieces the BYOL, SwAV and DINO methods share: the step counter, multi-crop forwards by resolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


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
