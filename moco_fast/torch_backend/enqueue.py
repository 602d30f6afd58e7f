"""The "torch" backend's ring-buffer enqueue: all-or-nothing on non-finite keys, no host sync on a GPU."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def enqueue_(
    queue: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, keys: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """Ring write of ``keys`` at rows (ptr + i) mod K, all-or-nothing on non-finite keys; no host sync."""
    if queue.device.type == "cpu":
        return _enqueue_host_(queue, ptr, count, keys, normalize)
    return _enqueue_device_(queue, ptr, count, keys, normalize)


def _enqueue_device_(queue: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, keys: torch.Tensor, normalize: bool):
    """Device enqueue: the pointer stays on the device; a rejected batch rewrites the old rows."""
    size = queue.shape[0]
    batch = keys.shape[0]
    ok = torch.isfinite(keys).all().reshape(1)
    rows = (ptr + torch.arange(batch, device=queue.device)) % size
    new = keys.float()
    if normalize:
        new = torch.nn.functional.normalize(new, dim=1)
    # Keep the old rows where the batch is rejected, so the write is a no-op then.
    new = torch.where(ok, new.to(queue.dtype), queue.index_select(0, rows))
    queue.index_copy_(0, rows, new)
    step = ok.to(torch.int64) * batch
    ptr.copy_((ptr + step) % size)
    count.copy_(torch.clamp(count + step, max=size))
    return ok


def _all_finite(x: torch.Tensor) -> bool:
    """Exactly whether every value of x is finite, cheaply on the CPU: a finite sum proves it (NaN and
    ±Inf propagate into a sum), and only a sum that overflowed needs the max of |x| (NaN-propagating)."""
    return math.isfinite(x.sum().item()) or bool(x.abs().amax() < math.inf)


_OK = {True: torch.tensor([True]), False: torch.tensor([False])}  # read-only verdicts of the host path


def _enqueue_host_(queue: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, keys: torch.Tensor, normalize: bool):
    """CPU enqueue: reading ptr costs no sync here, so write at most two slices directly."""
    ok = _all_finite(keys)
    if ok:
        size, batch, start = queue.shape[0], keys.shape[0], ptr.item()
        new = torch.nn.functional.normalize(keys.float(), dim=1) if normalize else keys
        first = min(batch, size - start)
        queue[start : start + first] = new[:first]
        if first < batch:
            queue[: batch - first] = new[first:]
        ptr.fill_((start + batch) % size)
        count.fill_(min(count.item() + batch, size))
    return _OK[ok]
