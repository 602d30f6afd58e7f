"""The "torch" backend: the single-pass InfoNCE in blockwise PyTorch ops, for any device.

One sweep over the negatives in blocks of rows keeps, per query row, the running max ``m``, the
running sum ``l`` and the rescaled weighted sum ``acc`` of key rows (a flash-attention forward with
V = K). The row starts with the positive key (m = q·k, l = 1, acc = k), so no B×(K+1) logits
ever exist: the extra memory is O(B·d + B·block). The backward needs only lse and O (DESIGN.md):
dq = g/T·(O − k) and dk = g/T·(p0 − 1)·q. The rarely needed gradient of the negatives recomputes
the logits block by block.

All arithmetic is fp32 whatever the input dtypes (bf16/fp16 blocks are upcast one block at a time),
or fp64 when an input is fp64 (so gradcheck can run on this backend).
Functions follow the contract in ``moco_fast.backends``; ``SUPPORT`` declares what they serve.
"""

from __future__ import annotations

import math
import os

import torch

from .backends import Support
from .validation import FLOAT_DTYPES, compute_dtype

AVAILABLE = True

_ANY_FLOAT = frozenset(FLOAT_DTYPES)
SUPPORT = {
    "info_nce": Support(devices=None, dtypes=_ANY_FLOAT),
    "momentum_update": Support(devices=None, dtypes=_ANY_FLOAT, modes=frozenset({"lerp", "exact"})),
    "enqueue": Support(devices=None, dtypes=_ANY_FLOAT),
}

# Elements of the B×block score tile: 2**19 fp32 = 2 MiB, measured fastest here (B=256: 2048-key blocks).
_TILE_ELEMENTS = 1 << 19


def block_size(batch: int, num_keys: int) -> int:
    """Rows of negatives handled per step: about _TILE_ELEMENTS scores, at least 256 rows."""
    return max(256, min(max(num_keys, 1), _TILE_ELEMENTS // max(batch, 1)))


def infonce_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    scale: float,
    block: int | None = None,
    need_rank: bool = True,
):
    """Single-pass forward: returns (loss (B,), lse (B,), out (B, d), rank (B,) int64); fp32 (fp64 for fp64).

    With ``need_rank=False`` on CPU fp32 inputs, PyTorch's fused CPU flash-attention kernel does the
    sweep (faster, see _fused_attention_negatives) and rank is returned filled with -1.
    """
    if not need_rank:
        fused = _fused_attention_forward(q, k, negatives, scale)
        if fused is not None:
            return fused
    ct = compute_dtype(q, k, negatives)
    qs = q.to(ct) * scale  # fold 1/T into q once: logits = qs · x
    kf = k.to(ct)
    pos = (qs * kf).sum(dim=1)
    row_max = pos.clone()
    row_sum = torch.ones_like(pos)
    acc = kf.clone()
    rank = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    num_keys = negatives.shape[0]
    block = block or block_size(q.shape[0], num_keys)
    # One score tile reused by every block (the last one may be narrower): memory stays O(B·block).
    tile = torch.empty((q.shape[0], min(block, num_keys)), dtype=ct, device=q.device)
    for start in range(0, num_keys, block):
        keys = negatives[start : start + block].to(ct)
        scores = tile[:, : keys.shape[0]]
        torch.mm(qs, keys.T, out=scores)
        if need_rank:
            rank += (scores > pos[:, None]).sum(dim=1)
        new_max = torch.maximum(row_max, scores.amax(dim=1))
        correction = torch.exp(row_max - new_max)
        probs = scores.sub_(new_max[:, None]).exp_()  # in place: the scores are not needed any more
        row_sum.mul_(correction).add_(probs.sum(dim=1))
        acc.mul_(correction[:, None]).addmm_(probs, keys)
        row_max = new_max
    lse = row_max + torch.log(row_sum)
    out = acc.div_(row_sum[:, None])
    if not need_rank:
        rank.fill_(-1)
    return lse - pos, lse, out, rank


# PyTorch's CPU flash-attention kernel returns (O, logsumexp) over a shared key set, which is the
# negatives' part of the single pass; it is a private aten op, so it is used behind this guard and
# any failure falls back to the blockwise loop. Set MOCO_FAST_CPU_FUSED_ATTENTION=0 to disable it.
_FUSED_ATTENTION_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_attention_forward(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, scale: float):
    """(loss, lse, out, rank=-1) via the fused CPU attention kernel plus an analytic merge of the positive, or None."""
    if (
        _FUSED_ATTENTION_OP is None
        or os.environ.get("MOCO_FAST_CPU_FUSED_ATTENTION", "1") == "0"
        or q.device.type != "cpu"
        or negatives.shape[0] == 0
        or any(t.dtype != torch.float32 for t in (q, k, negatives))
    ):
        return None
    try:
        out_neg, lse_neg = _FUSED_ATTENTION_OP(q[None, None], negatives[None, None], negatives[None, None], scale=scale)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    out_neg, lse_neg = out_neg.reshape(q.shape), lse_neg.reshape(q.shape[0])
    pos = (q * scale * k).sum(dim=1)
    lse = torch.logaddexp(lse_neg, pos)
    out = out_neg * torch.exp(lse_neg - lse)[:, None] + k * torch.exp(pos - lse)[:, None]
    rank = torch.full((q.shape[0],), -1, dtype=torch.int64)
    return lse - pos, lse, out, rank


def infonce_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, scale: float
):
    """O(B·d) backward from the saved lse and O: returns (dq in q.dtype, dk in k.dtype)."""
    ct = compute_dtype(q, k, lse)
    qf, kf = q.to(ct), k.to(ct)
    g = grad.to(ct) * scale
    p0 = torch.exp((qf * scale * kf).sum(dim=1) - lse)  # rounded like the forward's positive logit
    dq = g[:, None] * (out - kf)
    dk = (g * (p0 - 1.0))[:, None] * qf
    return dq.to(q.dtype), dk.to(k.dtype)


def infonce_backward_negatives(
    grad: torch.Tensor,
    q: torch.Tensor,
    negatives: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    block: int | None = None,
) -> torch.Tensor:
    """dn_j = scale·Σ_i g_i·softmax_ij·q_i, recomputing the logits block by block: (K, d) in negatives.dtype."""
    ct = compute_dtype(q, negatives, lse)
    qf = q.to(ct)
    qs = qf * scale
    weighted_q = qf * (grad.to(ct) * scale)[:, None]
    dn = torch.empty(negatives.shape, dtype=negatives.dtype, device=negatives.device)
    block = block or block_size(q.shape[0], negatives.shape[0])
    for start in range(0, negatives.shape[0], block):
        keys = negatives[start : start + block].to(ct)
        probs = (qs @ keys.T).sub_(lse[:, None]).exp_()
        dn[start : start + block] = (probs.T @ weighted_q).to(negatives.dtype)
    return dn


# Elements of the temporary `source·(1 − m)` per fused call of the exact mode: bounded so that a
# ResNet-50 update does not allocate (and page-fault) a model-sized buffer every step.
_MOMENTUM_CHUNK = 1 << 20


def _chunks(targets: list[torch.Tensor], sources: list[torch.Tensor]):
    """Consecutive runs of (targets, sources) with about _MOMENTUM_CHUNK elements each."""
    begin, size = 0, 0
    for i, t in enumerate(targets):
        size += t.numel()
        if size >= _MOMENTUM_CHUNK:
            yield targets[begin : i + 1], sources[begin : i + 1]
            begin, size = i + 1, 0
    if begin < len(targets):
        yield targets[begin:], sources[begin:]


@torch.no_grad()
def momentum_update_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float, exact: bool = False
) -> None:
    """In place, for each pair: target ← lerp(target, source, 1 − m), one fused pass over the list.

    ``exact=True``: the official ``target·m + source·(1 − m)``, with its two roundings bit for bit
    (an alpha-add would fuse them into one FMA and differ in the last bit), in bounded chunks.
    """
    if not targets:
        return
    if not exact:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
        return
    for tgt, src in _chunks(targets, sources):
        scaled = torch._foreach_mul(src, 1.0 - momentum)
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, scaled)


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
