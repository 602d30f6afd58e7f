"""KeyQueue: the ring buffer of MoCo's negative keys.

The keys live in a (K, d) row-major buffer; the write pointer and the fill count are (1,) int64
device tensors, so advancing the pointer never syncs with the host, and all three are persistent
buffers (state_dict / checkpoints). ``enqueue`` writes row (ptr + i) mod K for any batch
1 ≤ B ≤ K in one launch (no "K % B == 0" assert), all-or-nothing on NaN/Inf keys.

Non-finite keys without a host sync. The backend's write refuses a batch with any NaN/Inf value on
the device (nothing is written; ptr and count stay) and returns a device flag. On the CPU the flag
is read at once (free there): "raise" raises :class:`NonFiniteKeysError` from that call. On a GPU,
reading it would stall the step, so the refusal is counted on the device (``num_skipped``) and
copied back asynchronously into pinned memory; the error is raised by the next ``enqueue`` whose
copy has landed (normally the next step), naming the call that was refused, or at once by
:meth:`KeyQueue.check`. Either way the refused batch never enters the queue. While a CUDA graph is
being captured the copy-back is skipped (call ``check()`` after replays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .distributed import concat_all_gather
from .validation import KERNEL_DTYPES, check_matrix, check_nonempty, check_positive_int

_ON_NONFINITE = ("raise", "skip")


class NonFiniteKeysError(ValueError):
    """Raised when keys given to KeyQueue.enqueue contain NaN or Inf; that batch was not enqueued."""


class _RefusalWatcher:
    """Reads a device counter back without a sync: an async copy into pinned memory plus an event.

    ``after_call`` starts the copy of the counter's current value; ``landed`` returns the value of the
    last copy once its event has completed (None before), so a caller never waits for the device.
    """

    def __init__(self, counter: Tensor):
        self.mirror = torch.zeros(1, dtype=torch.int64, pin_memory=counter.is_cuda)
        self.event = torch.cuda.Event() if counter.is_cuda else None
        self.pending = False
        self.copied_at_call = 0

    def after_call(self, counter: Tensor, call: int) -> None:
        if counter.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no event bookkeeping inside a graph
        self.mirror.copy_(counter, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending, self.copied_at_call = True, call

    def landed(self) -> int | None:
        if not self.pending or (self.event is not None and not self.event.query()):
            return None
        self.pending = False
        return int(self.mirror[0])  # a pinned host tensor: no device access


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
        on_nonfinite: "raise" (default): a batch with NaN/Inf is refused and NonFiniteKeysError is
            raised — by that call on the CPU, by the next enqueue (or :meth:`check`) on a GPU, with no
            host sync (see the module docstring). "skip": the batch is refused silently and counted
            in ``num_skipped``; until the queue is full this reads the fill count back (one sync per
            enqueue), after that none.
        backend: implementation of the write ("auto" | "cuda" | "triton" | "torch" | "reference").

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
        check_positive_int(size, "size")
        check_positive_int(dim, "dim")
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random', got {init!r}")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        self.backend = backends.check_name(backend)
        self.size, self.dim = size, dim
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.on_nonfinite = on_nonfinite
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
        self._writers: dict[tuple, object] = {}  # (device, keys dtype) -> the backend's enqueue_
        self._calls = 0  # enqueue calls so far (names the refused one in errors)
        self._watcher: _RefusalWatcher | None = None
        self._refusals_seen = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._forget_device_state()

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        self._forget_device_state()  # a dtype/device move keeps count, but re-read it to be safe
        return out

    def _forget_device_state(self) -> None:
        self._filled = None
        self._writers.clear()
        self._watcher = None

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
        check_nonempty(keys, "keys")
        if keys.device != self.keys.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.keys.device}; move one of them")
        return keys

    def _writer(self, keys: Tensor):
        key = (keys.device, keys.dtype)
        writer = self._writers.get(key)
        if writer is None:
            impl = backends.select("enqueue", self.backend, keys.device, (keys.dtype, self.keys.dtype), self.dim)
            writer = self._writers[key] = backends.module(impl).enqueue_
        return writer

    def _refusal_error(self, call: int | str) -> NonFiniteKeysError:
        return NonFiniteKeysError(
            f"keys given to enqueue call {call} contained NaN or Inf; that batch was not enqueued "
            "(the queue holds every other batch)"
        )

    def check(self) -> None:
        """Raise NonFiniteKeysError if a batch was refused since the last check (reads the device: a sync)."""
        refused = int(self.num_skipped.item())
        if self.on_nonfinite == "raise" and refused > self._refusals_seen:
            self._refusals_seen = refused
            self._filled = None
            raise self._refusal_error("(one of the calls since the last check)")
        self._refusals_seen = refused

    def _raise_landed_refusal(self) -> None:
        landed = self._watcher.landed() if self._watcher is not None else None
        if landed is not None and landed > self._refusals_seen:
            self._refusals_seen = landed
            self._filled = None  # the mirror assumed the refused batch entered
            raise self._refusal_error(f"#{self._watcher.copied_at_call} or earlier")

    @torch.no_grad()
    def enqueue(self, keys: Tensor, *, blocks: int = 1) -> None:
        """Write ``keys`` (B, d) at the pointer, wrapping around; under DDP, every rank's keys.

        ``blocks``: ``keys`` is that many equal blocks of rows (MoCoHead's symmetric k1, then k2); under
        DDP they are gathered block by block — block 1 of every rank (rank order), then block 2 — the order
        one process on the global batch enqueues (a plain gather would interleave the ranks' blocks).

        Raises ValueError (B > size, wrong dim/device), TypeError (non-float dtype) and
        NonFiniteKeysError (NaN/Inf keys with on_nonfinite="raise", see the class docstring); a
        refused batch leaves the queue unchanged.
        """
        self._raise_landed_refusal()
        keys = self._check_keys(keys).detach()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or keys.shape[0] % blocks:
            raise ValueError(f"blocks must be a positive int dividing the {keys.shape[0]} keys, got {blocks!r}")
        if self.gather_distributed:
            gathered = concat_all_gather(keys)
            if blocks > 1 and gathered.shape[0] > keys.shape[0]:  # (rank, block, row) -> (block, rank, row)
                gathered = gathered.reshape(-1, blocks, keys.shape[0] // blocks, self.dim).transpose(0, 1)
                gathered = gathered.reshape(-1, self.dim)
            keys = gathered
        batch = keys.shape[0]
        if batch > self.size:
            raise ValueError(
                f"cannot enqueue {batch} keys (global batch) into a queue of size {self.size}; "
                "use a queue at least as large as the global batch"
            )
        ok = self._writer(keys)(self.keys, self.ptr, self.count, keys.contiguous(), self.normalize)
        self._calls += 1
        if not _reads_are_free(ok):
            self._after_device_write(ok, batch)
        elif bool(ok):
            self._advance_mirror(batch)
        elif self.on_nonfinite == "raise":
            raise self._refusal_error(f"#{self._calls}")
        else:
            self.num_skipped += 1

    def _advance_mirror(self, batch: int) -> None:
        if self._filled is not None:
            self._filled = min(self._filled + batch, self.size)

    def _after_device_write(self, ok: Tensor, batch: int) -> None:
        """Count a refusal on the device and keep the host informed, without reading the device."""
        self.num_skipped.add_(ok.logical_not())
        if self.on_nonfinite == "skip":
            if self._filled is not None and self._filled < self.size:
                self._filled = None  # unknown until read: the batch may have been skipped
            return
        self._advance_mirror(batch)  # assumes success; corrected when a refusal lands
        if self._watcher is None:
            self._watcher = _RefusalWatcher(self.num_skipped)
        self._watcher.after_call(self.num_skipped, self._calls)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, on_nonfinite={self.on_nonfinite!r}"


def _reads_are_free(t: Tensor) -> bool:
    """Whether reading ``t`` on the host costs no device sync (CPU tensors). Tests patch this."""
    return t.device.type == "cpu"
