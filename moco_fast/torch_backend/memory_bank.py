"""The "torch" backend's memory-bank update (InstDisc / NPID): gather, mix, normalize, scatter.

bank[i] ← normalize(m·bank[i] + (1 − m)·f) for the rows of a batch, all-or-nothing on non-finite
features, with no host sync on a GPU (a refused batch rewrites the old rows). Duplicate indices: the
last occurrence in the batch wins (see :func:`last_occurrence`), so every duplicate writes the same
value and the scatter is deterministic on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import compute_dtype
from .enqueue import _OK, _all_finite


def last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """src (B,) int64: src[b] = the last position b' of the batch with indices[b'] == indices[b].

    A stable sort groups equal indices in batch order, and searchsorted finds each group's end:
    no host sync, no atomics.
    """
    ordered, perm = torch.sort(indices, stable=True)
    group_end = torch.searchsorted(ordered, ordered, right=True) - 1
    src = torch.empty_like(perm)
    src[perm] = perm[group_end]
    return src


@torch.no_grad()
def memory_bank_update_(
    bank: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float
) -> torch.Tensor:
    """In place: bank[indices[b]] ← normalize(m·bank[indices[b]] + (1 − m)·features[b]); returns ok (1,) bool."""
    if bank.device.type == "cpu":
        return _update_host_(bank, indices, features, momentum)
    return _update_device_(bank, indices, features, momentum)


def _mixed_rows(bank, indices, features, momentum):
    """(old rows, new rows) of the batch, both in bank.dtype; duplicates all get the last occurrence's row."""
    ct = compute_dtype(bank, features)
    old = bank.index_select(0, indices)
    mixed = old.to(ct) * momentum + features.index_select(0, last_occurrence(indices)).to(ct) * (1.0 - momentum)
    return old, F.normalize(mixed, dim=1).to(bank.dtype)


def _update_device_(bank, indices, features, momentum):
    """No host read: a refused batch writes its old rows back (a no-op)."""
    ok = torch.isfinite(features).all().reshape(1)
    old, new = _mixed_rows(bank, indices, features, momentum)
    bank.index_copy_(0, indices, torch.where(ok, new, old))
    return ok


def _update_host_(bank, indices, features, momentum):
    """CPU: the finiteness verdict is read at once (free here) and a refused batch touches nothing."""
    if not _all_finite(features):
        return _OK[False]
    bank.index_copy_(0, indices, _mixed_rows(bank, indices, features, momentum)[1])
    return _OK[True]
