"""Weighted k-nearest-neighbour monitor, as in the MoCo CIFAR-10 demo (k=200, t=0.1).

Features are L2-normalized; the memory bank is the training part. For a held-out sample, the k most
similar bank entries vote for their labels with weight exp(similarity / t); the class with the
largest total wins. The same function scores raw pixels (the baseline the issue asks about).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Predicted labels (N,) of ``features`` (N, D) against ``bank`` (M, D); all rows L2-normalized."""
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, features.shape[0], chunk):
        sim = features[start : start + chunk] @ bank.T  # (n, M)
        weight, idx = sim.topk(k, dim=1)
        labels = bank_labels[idx]  # (n, k)
        weight = (weight / t).exp()
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
        scores.scatter_add_(1, labels, weight)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier (features are normalized here)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_features.float(), dim=1)
    feats = F.normalize(test_features.float(), dim=1)
    pred = knn_predict(feats, bank, train_labels.to(bank.device), num_classes, k, t)
    return (pred.cpu() == test_labels.cpu()).float().mean().item()


@torch.no_grad()
def extract(
    fn: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` over (images, labels) batches; returns (features (N, D) float on device, labels (N,))."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(fn(images.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)
