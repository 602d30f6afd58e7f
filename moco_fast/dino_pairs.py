"""The view-pair bookkeeping of DINO's loss, shared by the op and every backend.

Views are stacked view-major: student (S·B, b), teacher (T·B, b); teacher view u is the same image view as
student view u (global crops first), and the loss pairs every teacher view u with every student view v ≠ u.
"""

from __future__ import annotations

import torch
from torch import Tensor


def partners(num_views: int, num_teacher_views: int) -> tuple[list[int], int]:
    """([n_v: the teacher views paired with student view v], the number of (teacher, student) pairs)."""
    counts = [num_teacher_views - (v < num_teacher_views) for v in range(num_views)]
    return counts, num_views * num_teacher_views - min(num_views, num_teacher_views)


def prototype_grad_rows(student: Tensor, num_views: int, num_teacher_views: int, dtype: torch.dtype):
    """(y_s (S·B, b), y_t (T·B, b)) with dW ∝ P_sᵀ·y_s + P_tᵀ·y_t: y_s[v] = n_v·h[v], y_t[u] = [u<S]·h[u] − Σ_v h[v]."""
    h = student.to(dtype).view(num_views, -1, student.shape[1])
    counts, _ = partners(num_views, num_teacher_views)
    n_v = torch.tensor(counts, dtype=dtype, device=student.device)
    y_t = (-h.sum(dim=0)).expand(num_teacher_views, *h.shape[1:]).clone()
    both = min(num_views, num_teacher_views)
    y_t[:both] += h[:both]
    return (n_v[:, None, None] * h).reshape(student.shape), y_t.reshape(-1, student.shape[1])
