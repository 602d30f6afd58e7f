"""KeyQueue: the ring buffer of MoCo's negative keys.

The keys live in a (K, d) row-major buffer; the write pointer and the fill count are (1,) int64
device tensors, so advancing the pointer never syncs with the host, and all three are persistent
buffers (state_dict / checkpoints). ``enqueue`` writes row (ptr + i) mod K for any batch
1 ≤ B ≤ K in one launch (no "K % B == 0" assert), all-or-nothing on NaN/Inf keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .distributed import concat_all_gather
from .ops import _KERNEL_DTYPES, check_matrix

_ON_NONFINITE = ("raise", "skip")


class NonFiniteKeysError(ValueError):
    """Raised by KeyQueue.enqueue when the keys contain NaN or Inf; the queue was left untouched."""


class KeyQueue(nn.Module):
    """Ring buffer of ``size`` keys of dimension ``dim``.

    Args:
        size: K, the number of keys kept (e.g. 65536).
        dim: d, the key dimension.
        dtype: storage dtype of the keys (fp32, bf16 or fp16); enqueue casts to it.
        gather_distributed: under torch.distributed, all-gather the keys of every rank first (rank
            order) so every rank holds the same queue.
        normalize: L2-normalize keys as they are written (off by default: MoCoHead normalizes).
        init: "empty" (negatives() returns only the filled part until the queue is full) or
            "random" (the official code's random unit keys; the queue starts full).
        on_nonfinite: "raise" (default): a batch with NaN/Inf raises NonFiniteKeysError and nothing
            is written; on CUDA this reads one flag back (a host sync per enqueue). "skip": the
            batch is dropped on the device and counted in ``num_skipped``; no host sync once full.
        backend: implementation of the write ("auto" | "cuda" | "triton" | "torch").

    Buffers: ``keys`` (K, d), ``ptr`` (1,) int64, ``count`` (1,) int64, ``num_skipped`` (1,) int64.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        gather_distributed: bool = True,
        *,
        normalize: bool = False,
        init: str = "empty",
        on_nonfinite: str = "raise",
        device: torch.device | str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random', got {init!r}")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        backends.check_name(backend)
        self.size, self.dim = size, dim
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        if init == "random":
            keys = F.normalize(torch.randn(size, dim, device=device), dim=1).to(dtype)
            filled = size
        else:
            keys = torch.zeros(size, dim, dtype=dtype, device=device)
            filled = 0
        self.register_buffer("keys", keys)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_buffer("count", torch.full((1,), filled, dtype=torch.int64, device=device))
        self.register_buffer("num_skipped", torch.zeros(1, dtype=torch.int64, device=device))
        # Host mirror of `count` so negatives() can slice without a sync; None = unknown (read once).
        self._filled: int | None = filled

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        self._filled = None  # a dtype/device move keeps count, but re-read it to be safe
        return out

    @property
    def filled(self) -> int:
        """Number of valid keys (host int; reads the device count only when it is not known)."""
        if self._filled is None:
            self._filled = int(self.count.item())
        return self._filled

    @property
    def is_full(self) -> bool:
        return self.filled >= self.size

    def negatives(self) -> Tensor:
        """The keys to contrast against: (filled, d), the whole buffer (K, d) once full. Not a copy."""
        filled = self.filled
        return self.keys if filled >= self.size else self.keys[:filled]

    def _check_keys(self, keys: object) -> Tensor:
        check_matrix(keys, "keys", self.dim)
        if keys.shape[0] < 1:
            raise ValueError("keys is an empty batch (0 rows)")
        if keys.device != self.keys.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.keys.device}; move one of them")
        return keys

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (B, d) at the pointer, wrapping around; under DDP, every rank's keys.

        Raises ValueError (B > size, wrong dim/device), TypeError (non-float dtype) and
        NonFiniteKeysError (NaN/Inf keys with on_nonfinite="raise"); the queue is then unchanged.
        """
        keys = self._check_keys(keys).detach()
        if self.gather_distributed:
            keys = concat_all_gather(keys)
        if keys.shape[0] > self.size:
            raise ValueError(
                f"cannot enqueue {keys.shape[0]} keys (global batch) into a queue of size {self.size}; "
                "use a queue at least as large as the global batch"
            )
        impl = backends.resolve(self.backend, keys.device)
        if impl in ("reference",) or keys.dtype not in _KERNEL_DTYPES:
            impl = "torch"
        ok = backends.implementation(impl).enqueue_(self.keys, self.ptr, self.count, keys.contiguous(), self.normalize)
        if self.on_nonfinite == "raise":
            if not bool(ok.item()):
                raise NonFiniteKeysError(
                    f"keys contain NaN or Inf ({keys.shape[0]} rows); nothing was enqueued and the queue is unchanged"
                )
            if self._filled is not None:
                self._filled = min(self._filled + keys.shape[0], self.size)
        else:
            self.num_skipped.add_((~ok).to(torch.int64))
            if self._filled is not None and self._filled < self.size:
                self._filled = None  # unknown until read: the batch may have been skipped

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, on_nonfinite={self.on_nonfinite!r}"
