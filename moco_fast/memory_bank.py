"""The memory bank of InstDisc / NPID (Wu et al. 2018): one feature per training sample.

* :class:`MemoryBank` — a persistent (N, d) buffer of unit rows (random at start) and a fused update
  ``bank[i] ← normalize(m·bank[i] + (1 − m)·f)`` for the rows of a batch.
* :class:`MemoryBankHead` — ``loss = head(features, indices)``: normalize, the non-parametric softmax
  of each feature against the bank (target: its own row), then (training) the update. With
  ``num_negatives=None`` the softmax is EXACT over all N rows — what NPID approximated with NCE because
  the N = 1.28 M logits per image were too costly; the fused single pass needs O(B·d) memory. With
  ``num_negatives=K``, K rows sampled uniformly per batch (shared by its rows) as in NPID's NCE setting.

Update rules. Duplicate indices in one batch: the LAST occurrence wins — the row becomes
normalize(m·old + (1 − m)·f_last), computed from the row before the batch (NPID's ``index_copy_``
on the CPU; deterministic on every device here). Non-finite features never enter: a batch with any
NaN/Inf value writes nothing; on the CPU ``update`` raises :class:`NonFiniteFeaturesError` at once, on
a GPU the refusal is counted on the device and raised by the next update (or :meth:`MemoryBank.check`),
with no host sync — the :class:`moco_fast.KeyQueue` policy. Under torch.distributed the indices and
features of every rank are all-gathered (rank order) first, so every rank holds the same bank.

Index checks read the indices on the host (one small sync per call on a GPU): an out-of-range index
would otherwise read or write outside the bank.

Gradient accumulation, exactly. Inside ``with bank.accumulate():`` (or ``head.accumulate()``) every
``update`` is checked and kept, not written: every micro-batch's loss sees the bank as it was when the
block began, and when it ends the indices and features of all micro-batches are written by ONE update,
in batch order — the duplicate-index rule (the last occurrence of the step wins), the non-finite policy
(one NaN refuses the whole step) and the all-gather under torch.distributed (once per step) are those of
one large batch. An exception inside the block writes nothing. Blocks do not nest.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from . import queue as _queue
from .distributed import concat_all_gather
from .functional import InfoNCEStats, contrast, info_nce, stats_from_rank
from .validation import (
    KERNEL_DTYPES,
    check_indices,
    check_matrix,
    check_momentum,
    check_nonempty,
    check_positive_int,
    check_temperature,
)

_ON_NONFINITE = ("raise", "skip")


class NonFiniteFeaturesError(ValueError):
    """Features given to MemoryBank.update contained NaN or Inf; that batch was not written."""


class MemoryBank(nn.Module):
    """One unit-norm feature per training sample, updated with momentum (InstDisc / NPID).

    Args:
        num_samples: N, the number of training samples (rows).
        dim: d, the feature dimension.
        momentum: m in bank[i] ← normalize(m·bank[i] + (1 − m)·f) (NPID: 0.5).
        dtype: storage dtype (fp32, bf16 or fp16).
        gather_distributed: under torch.distributed, update with every rank's indices and features.
        on_nonfinite: "raise" (default) or "skip" (refuse silently, counted in ``num_skipped``).
        device, backend: where the bank lives; the update's implementation ("auto" | "triton" | "torch" | "reference").

    Buffers (persistent, so checkpoints hold them): ``bank`` (N, d), ``num_skipped`` (1,) int64.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        *,
        gather_distributed: bool = True,
        on_nonfinite: str = "raise",
        device: torch.device | str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        check_positive_int(num_samples, "num_samples")
        check_positive_int(dim, "dim")
        self.momentum = check_momentum(momentum)
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        self.backend = backends.check_name(backend)
        self.num_samples, self.dim = num_samples, dim
        self.gather_distributed = gather_distributed
        self.on_nonfinite = on_nonfinite
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim, device=device), dim=1).to(dtype))
        self.register_buffer("num_skipped", torch.zeros(1, dtype=torch.int64, device=device))
        self._writers: dict[tuple, object] = {}
        self._calls = 0
        self._watcher: _queue._RefusalWatcher | None = None
        self._refusals_seen = 0
        # Inside accumulate(): the (indices, features) of the step's micro-batches, written at its end.
        self._pending: list[tuple[Tensor, Tensor]] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._writers.clear()
        self._watcher = None
        self._refusals_seen = int(self.num_skipped.item())

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        self._writers.clear()
        self._watcher = None
        return out

    def check_batch(self, indices: object, features: object) -> Tensor:
        """Validate (indices (B,), features (B, d)) for this bank; returns the indices as int64."""
        check_matrix(features, "features", self.dim)
        check_nonempty(features, "features")
        if features.device != self.bank.device:
            raise ValueError(
                f"features are on {features.device} but the bank is on {self.bank.device}; move one of them"
            )
        return check_indices(indices, "indices", self.num_samples, features, "features")

    def _writer(self, features: Tensor):
        key = (features.device, features.dtype)
        writer = self._writers.get(key)
        if writer is None:
            impl = backends.select(
                "memory_bank_update", self.backend, features.device, (features.dtype, self.bank.dtype), self.dim
            )
            writer = self._writers[key] = backends.module(impl).memory_bank_update_
        return writer

    def _refusal(self, call: str) -> NonFiniteFeaturesError:
        return NonFiniteFeaturesError(
            f"features given to MemoryBank.update call {call} contained NaN or Inf; that batch was not written"
        )

    def check(self) -> None:
        """Raise NonFiniteFeaturesError if an update was refused since the last check (a sync on a GPU)."""
        refused = int(self.num_skipped.item())
        seen, self._refusals_seen = self._refusals_seen, refused
        if self.on_nonfinite == "raise" and refused > seen:
            raise self._refusal("(one of the calls since the last check)")

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """bank[indices[b]] ← normalize(m·bank[indices[b]] + (1 − m)·features[b]), in one fused call.

        indices: (B,) int64 (or int32) sample indices in [0, N), on the bank's device; features: (B, d),
        usually unit rows. Raises TypeError/ValueError (nothing written) for bad arguments and
        NonFiniteFeaturesError as described in the module docstring. Inside :meth:`accumulate` the batch
        is checked and kept (a copy), and written with the rest of the step when the block ends.
        """
        if self._pending is not None:
            self._pending.append((self.check_batch(indices, features), features.detach().clone()))
            return
        landed = self._watcher.landed() if self._watcher is not None else None
        if landed is not None and landed > self._refusals_seen:
            self._refusals_seen = landed
            raise self._refusal(f"#{self._watcher.copied_at_call} or earlier")
        indices = self.check_batch(indices, features)
        features = features.detach()
        if self.gather_distributed:
            indices, features = concat_all_gather(indices), concat_all_gather(features)
        ok = self._writer(features)(self.bank, indices.contiguous(), features.contiguous(), self.momentum)
        self._calls += 1
        if _queue._reads_are_free(ok):  # (tests patch it to run the GPU path on the CPU)
            if not bool(ok):
                if self.on_nonfinite == "raise":
                    raise self._refusal(f"#{self._calls}")
                self.num_skipped += 1
            return
        self.num_skipped.add_(ok.logical_not())  # counted on the device; read back without a sync
        if self.on_nonfinite == "raise":
            if self._watcher is None:
                self._watcher = _queue._RefusalWatcher(self.num_skipped)
            self._watcher.after_call(self.num_skipped, self._calls)

    @contextlib.contextmanager
    def accumulate(self):
        """One optimizer step of micro-batches: the bank does not change inside the block, and the updates of
        every micro-batch are applied by one :meth:`update` of their concatenation (batch order) when it ends,
        exactly as one large batch would be. Nothing is written if the block raises; blocks do not nest. A
        refusal of that update (NaN/Inf, see the module docstring) raises from the ``with`` statement."""
        if self._pending is not None:
            raise RuntimeError("MemoryBank.accumulate() blocks do not nest")
        self._pending = []
        try:
            yield self
            pending = self._pending
        finally:
            self._pending = None
        if pending:
            self.update(torch.cat([i for i, _ in pending]), torch.cat([f for _, f in pending]))

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, dim={self.dim}, momentum={self.momentum}, dtype={self.bank.dtype}, "
            f"on_nonfinite={self.on_nonfinite!r}"
        )


class MemoryBankHead(nn.Module):
    """InstDisc / NPID's non-parametric softmax against a :class:`MemoryBank`, then its update.

    ``loss = head(features, indices)``: features (B, d) from the encoder (normalized here), indices
    (B,) the samples' rows. Training mode updates the bank rows after the loss (NPID's order); the
    loss's backward never reads the bank, so that is safe before ``loss.backward()``.

    Args:
        num_samples, dim: the bank's N and d.
        temperature: T (NPID: 0.07).
        momentum: the bank's m (NPID: 0.5).
        num_negatives: None — the exact softmax over all N rows (logits f·bankᵀ/T, target the own row;
            one fused pass, O(B·d) extra memory); K — K rows drawn uniformly with replacement per
            batch, shared by the batch (one (K, d) gather), InfoNCE of f against [own row; those K],
            as NPID's NCE setting (a drawn row may be the sample's own, with probability K/N). K ≤ N − 1.
        bank_dtype, gather_distributed, on_nonfinite, backend: see :class:`MemoryBank`.

    Forward returns the fp32 scalar loss, or (loss, InfoNCEStats) with ``return_stats=True``;
    ``head.last_stats`` holds the last acc@1 / acc@5 (the own row's rank among the other logits).

    ``with head.accumulate():`` — one optimizer step as micro-batches (see :meth:`MemoryBank.accumulate`):
    the loss is the mean over rows, so micro-batches of sizes B_i, each loss weighted by B_i / ΣB_j (1/N for
    N equal ones), give the loss, gradients and bank of one batch of ΣB_j rows. Exact for
    ``num_negatives=None``; with sampled negatives each micro-batch draws its own K rows.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        temperature: float = 0.07,
        momentum: float = 0.5,
        num_negatives: int | None = None,
        *,
        bank_dtype: torch.dtype = torch.float32,
        gather_distributed: bool = True,
        on_nonfinite: str = "raise",
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if num_negatives is not None:
            check_positive_int(num_negatives, "num_negatives")
            if num_negatives > num_samples - 1:
                raise ValueError(
                    f"num_negatives must be at most num_samples - 1 = {num_samples - 1}, got {num_negatives}"
                )
        self.num_negatives = num_negatives
        self.backend = backends.check_name(backend)
        self.bank = MemoryBank(
            num_samples,
            dim,
            momentum,
            bank_dtype,
            gather_distributed=gather_distributed,
            on_nonfinite=on_nonfinite,
            backend=backend,
        )
        self.last_stats: InfoNCEStats | None = None

    def forward(self, features: Tensor, indices: Tensor, return_stats: bool = False):
        indices = self.bank.check_batch(indices, features)
        f = F.normalize(features, dim=1)
        rows = self.bank.bank
        if self.num_negatives is None:
            loss, lse, rank = contrast(f, rows, indices, None, self.temperature, self.backend, True)
            loss, stats = loss.mean(), stats_from_rank(rank, lse)
        else:
            sampled = torch.randint(self.bank.num_samples, (self.num_negatives,), device=rows.device)
            # rows[indices] is a copy: the backward keeps the positives as they were before the update.
            loss, stats = info_nce(
                f, rows[indices], rows[sampled], self.temperature, backend=self.backend, return_stats=True
            )
        if self.training:
            self.bank.update(indices, f.detach())
        self.last_stats = stats
        return (loss, stats) if return_stats else loss

    def accumulate(self):
        """:meth:`MemoryBank.accumulate` of this head's bank (a context manager)."""
        return self.bank.accumulate()

    def extra_repr(self) -> str:
        k = "exact" if self.num_negatives is None else self.num_negatives
        return f"temperature={self.temperature}, num_negatives={k}, backend={self.backend!r}"
