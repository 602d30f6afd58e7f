"""BYOL and SimSiam: the predictor head and the cosine losses.

* :class:`NegativeCosineSimilarity` — lightly's loss of the same name (``-cos(x0, x1).mean()``, same
  ``dim``/``eps``), computed in fp32 whatever the input dtypes (lightly's runs in the input dtype, so a
  bf16 batch loses its last digits before the mean).
* :func:`byol_loss` — BYOL's regression loss ``2 − 2·cos(p, z)`` per row, written as ``‖p̂ − ẑ‖²``
  (the same number for unit vectors, but without the cancellation of ``2 − 2·cos`` when cos → 1, which
  is exactly where a converged BYOL lives).
* :class:`BYOLLoss` — the symmetrized loss ``L(p1, z2) + L(p2, z1)`` of the paper (summed, as BYOL and
  solo-learn do), targets detached.
* :class:`BYOLProjectionHead` / :class:`BYOLPredictionHead` — Linear → BN → ReLU → Linear MLPs with
  lightly's constructor arguments (``input_dim, hidden_dim, output_dim``).

The target network is a :class:`moco_fast.MomentumEncoder` with ``schedule="cosine"``, momentum
0.996 → 1 (BYOL's schedule); see ``moco_fast/train/methods/byol.py`` for a whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_matrix, check_same_device, check_same_shape

__all__ = ["BYOLLoss", "BYOLPredictionHead", "BYOLProjectionHead", "NegativeCosineSimilarity", "byol_loss"]


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _as_float(x: Tensor) -> Tensor:
    """fp32 for 16-bit inputs (fp32/fp64 as they are): the accumulation dtype of these losses."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class NegativeCosineSimilarity(nn.Module):
    """``-cosine_similarity(x0, x1, dim, eps).mean()`` — lightly's NegativeCosineSimilarity (SimSiam).

    Args:
        dim: the dimension along which the cosine is taken (default 1).
        eps: the smallest norm (torch.nn.functional.cosine_similarity's ``eps``).

    ``forward(x0, x1)``: two tensors of one shape (any floating dtypes); returns the fp32 scalar (fp64 for
    fp64 inputs). Gradients flow to both arguments, so detach the target yourself (SimSiam's stop-grad).
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.dim = dim
        self.eps = _check_eps(eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        for name, x in (("x0", x0), ("x1", x1)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {type(x).__name__}")
        check_same_shape(x1, "x1", x0, "x0")
        check_same_device(("x0", x0), ("x1", x1))
        return -F.cosine_similarity(_as_float(x0), _as_float(x1), self.dim, self.eps).mean()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


def byol_loss(p: Tensor, z: Tensor, eps: float = 1e-8, reduction: str = "mean") -> Tensor:
    """BYOL's ``2 − 2·cos(p, z)`` per row, as ``‖p/‖p‖ − z/‖z‖‖²`` (no cancellation near cos = 1).

    Args:
        p: (B, d) online predictions (any floating dtype).
        z: (B, d) target projections; detached here (the target gets no gradient).
        eps: smallest norm in the normalization (``F.normalize``'s eps).
        reduction: "mean" (default), "sum" or "none" ((B,) per-row losses).

    Returns the fp32 loss (fp64 for fp64 inputs), in [0, 4].
    """
    check_matrix(p, "p")
    check_matrix(z, "z")
    check_same_shape(z, "z", p, "p")
    check_same_device(("p", p), ("z", z))
    eps = _check_eps(eps)
    pn = F.normalize(_as_float(p), dim=1, eps=eps)
    zn = F.normalize(_as_float(z.detach()), dim=1, eps=eps)
    loss = (pn - zn).square().sum(dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of mean, sum, none; got {reduction!r}")


class BYOLLoss(nn.Module):
    """Symmetrized BYOL loss: ``byol_loss(p1, z2) + byol_loss(p2, z1)`` (each a batch mean).

    ``forward(p1, p2, z1, z2)``: p_v the online predictions of view v, z_v the target projections of view v
    (detached inside). The sum (not the mean) of the two directions is BYOL's L + L̃.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = _check_eps(eps)

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return byol_loss(p1, z2, self.eps) + byol_loss(p2, z1, self.eps)


class _MLP2(nn.Sequential):
    """Linear(input, hidden) → BatchNorm1d → ReLU → Linear(hidden, output)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        for name, v in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        super().__init__(
            nn.Linear(input_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim),
        )


class BYOLProjectionHead(_MLP2):
    """BYOL's projector: Linear(2048, 4096) → BN → ReLU → Linear(4096, 256) by default (lightly's arguments)."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 4096, output_dim: int = 256):
        super().__init__(input_dim, hidden_dim, output_dim)


class BYOLPredictionHead(_MLP2):
    """BYOL's predictor q: Linear(256, 4096) → BN → ReLU → Linear(4096, 256) by default (lightly's arguments)."""

    def __init__(self, input_dim: int = 256, hidden_dim: int = 4096, output_dim: int = 256):
        super().__init__(input_dim, hidden_dim, output_dim)
