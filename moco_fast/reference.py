"""The naive PyTorch oracle: what the official MoCo code computes, written the same way.

It materializes the B×(K+1) logits (einsum for l_pos and l_neg, torch.cat, divide by T,
cross_entropy against label 0), so it needs several fp32 copies of a B×K matrix. It is the baseline
of every benchmark and the oracle of every test; nothing here is meant to be fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official logits: (B, 1+K) = [q·k, q·negatives] / T, computed in fp32 (or q's wider dtype)."""
    dtype = torch.promote_types(
        torch.promote_types(q.dtype, k.dtype), torch.promote_types(negatives.dtype, torch.float32)
    )
    q, k, negatives = q.to(dtype), k.to(dtype), negatives.to(dtype)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, negatives)
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def reference_info_nce(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE the official way. Returns (loss, lse, rank).

    loss: reduced as asked ("mean" | "sum" | "none" → (B,)); lse: (B,) logsumexp of the logits
    (detached); rank: (B,) int64 number of negatives whose logit is strictly above the positive's.
    Gradients flow to every input that requires them through ordinary autograd.
    """
    logits = info_nce_logits(q, k, negatives, temperature)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1).float()
        rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    return loss.float() if loss.dtype != torch.float64 else loss, lse, rank


def topk_accuracy(logits: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Fraction of rows whose label 0 is in the top-k logits (the official ``accuracy`` / 100)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(0)
    return [correct[:, : min(kk, maxk)].any(dim=1).float().mean() for kk in ks]


@torch.no_grad()
def reference_momentum_update(target: torch.nn.Module, source: torch.nn.Module, momentum: float) -> None:
    """The official per-parameter loop: param_k = param_k * m + param_q * (1 - m)."""
    for param_q, param_k in zip(source.parameters(), target.parameters()):
        param_k.data = param_k.data * momentum + param_q.data * (1.0 - momentum)


@torch.no_grad()
def reference_enqueue(queue_t: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """The official enqueue: queue is (dim, K), needs K % batch == 0 and syncs on int(ptr)."""
    batch_size = keys.shape[0]
    p = int(ptr)
    assert queue_t.shape[1] % batch_size == 0  # for simplicity, as in the official code
    queue_t[:, p : p + batch_size] = keys.T
    ptr[0] = (p + batch_size) % queue_t.shape[1]
