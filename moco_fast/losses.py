"""Loss modules with the signatures users know from lightly.

* :class:`NTXentLoss` — ``lightly.loss.NTXentLoss`` (same arguments, same values and gradients):
  SimCLR's NT-Xent over the batch, or with ``memory_bank_size=(K, d)`` InfoNCE against a bank of past
  ``out1`` features (lightly's MoCo mode), on :func:`moco_fast.nt_xent` / :func:`moco_fast.info_nce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .functional import info_nce, nt_xent
from .queue import KeyQueue
from .validation import check_matrix, check_same_device, check_temperature


def _bank_size(memory_bank_size: object) -> tuple[int, int] | None:
    """lightly's rules: 0 disables the bank, (K, d) sizes it, a bare positive int is an error."""
    if isinstance(memory_bank_size, bool):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got {memory_bank_size!r}")
    if isinstance(memory_bank_size, int):
        if memory_bank_size == 0:
            return None
        raise ValueError(
            f"Memory bank size 'memory_bank_size={memory_bank_size}' does not specify the feature dimension. "
            f"Set it with 'memory_bank_size=({memory_bank_size}, dim)', or pass 0 to disable the memory bank."
        )
    if not isinstance(memory_bank_size, Sequence) or len(memory_bank_size) != 2:
        raise ValueError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got {memory_bank_size!r}")
    size = tuple(int(x) for x in memory_bank_size)
    if any(x < 0 for x in size):
        raise ValueError(f"memory_bank_size entries must be non-negative, got {memory_bank_size!r}")
    return None if size[0] == 0 else size


class NTXentLoss(nn.Module):
    """Contrastive cross-entropy (NT-Xent, SimCLR), a drop-in for ``lightly.loss.NTXentLoss``.

    Args:
        temperature: T (> 0).
        memory_bank_size: 0 — negatives are the other 2N − 2 rows of the batch (SimCLR; lightly's
            default). (K, d) — row i's logits are [out0_i·out1_i, out0_i·bank]/T with label 0, and
            ``out1`` is enqueued after the loss when ``out0`` requires grad (lightly's MoCo mode). The
            bank is a :class:`moco_fast.KeyQueue` (``self.memory_bank``) of random unit rows at start:
            it is saved in checkpoints and takes any batch ≤ K (lightly's bank is not persistent, and
            when a batch does not divide K it drops the rows that overflow; this one wraps around).
        gather_distributed: under torch.distributed, contrast against every rank's rows (no memory
            bank; gradients return to each row's rank, so DDP matches one process on the global batch),
            or, with a bank, enqueue every rank's ``out1``.
        backend: moco_fast backend ("auto" | "triton" | "torch" | "reference" …).

    ``forward(out0, out1)`` with out0, out1 (B, d) the two views' projections (normalized here)
    returns the fp32 scalar loss, the mean over rows.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)
        self.backend = backends.check_name(backend)
        size = _bank_size(memory_bank_size)
        self.memory_bank = (
            None if size is None else KeyQueue(size[0], size[1], gather_distributed=gather_distributed, init="random")
        )

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check_matrix(out0, "out0")
        check_matrix(out1, "out1")
        if out1.shape != out0.shape:
            raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
        check_same_device(("out0", out0), ("out1", out1))
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        if self.memory_bank is None:
            return nt_xent(
                out0, out1, self.temperature, gather_distributed=self.gather_distributed, backend=self.backend
            )
        negatives = self.memory_bank.negatives()  # the bank before this batch: the backward never reads it
        loss = info_nce(out0, out1, negatives, self.temperature, backend=self.backend)
        if out0.requires_grad:  # lightly updates only when a backward pass will follow
            self.memory_bank.enqueue(out1.detach())
        return loss

    def extra_repr(self) -> str:
        bank = "none" if self.memory_bank is None else tuple(self.memory_bank.keys.shape)
        return f"temperature={self.temperature}, memory_bank={bank}, gather_distributed={self.gather_distributed}"
