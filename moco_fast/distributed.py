"""torch.distributed helpers for MoCo: all-gather of keys and shuffle-BN.

Every function degrades to the identity in a single process (torch.distributed not initialized or
world size 1), so the same training code runs with and without torchrun. Ranks must pass batches
of equal size, as in the official MoCo code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when torch.distributed is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank along dim 0, in rank order; no gradient.

    Returns (world_size·B, ...). In a single process the input itself is returned.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle the global batch across ranks before the key encoder (shuffle-BN, MoCo §3.3).

    Returns (this rank's part of the shuffled global batch, idx_unshuffle). Single process: (x, arange).
    """
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device)
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_ranks = x_gather.shape[0] // batch_size_this
    idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(num_ranks, -1)[dist.get_rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle_ddp` on the key encoder's output. Single process: x[idx_unshuffle]."""
    if not is_distributed():
        return x[idx_unshuffle]
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_ranks = x_gather.shape[0] // batch_size_this
    idx_this = idx_unshuffle.view(num_ranks, -1)[dist.get_rank()]
    return x_gather[idx_this]


# --- NT-Xent / MoCo v3 / CMC / memory bank: a gather that carries gradients back to each row's owner


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: sum every rank's gradient of the gathered tensor (all_reduce) and
    return this rank's slice, so each row's gradient reaches the rank that owns it, summed over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; the sum of the whole (W·B, d) is small
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank along dim 0, in rank order, WITH gradient.

    The backward sums the gradients every rank computed for the gathered rows and hands each rank the
    rows it contributed: with DDP (which averages parameter gradients over ranks) a loss of the
    per-rank mean over the gathered set trains exactly like one process on the global batch. Ranks
    must pass equal shapes. In a single process the input itself is returned.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
