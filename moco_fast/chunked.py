"""The "torch" backend: the single-pass InfoNCE in blockwise PyTorch ops, for any device.

One sweep over the negatives in blocks of rows keeps, per query row, the running max ``m``, the
running sum ``l`` and the rescaled weighted sum ``acc`` of key rows (a flash-attention forward with
V = K). The row starts with the positive key (m = q·k, l = 1, acc = k), so no B×(K+1) logits
ever exist: the extra memory is O(B·d + B·block). The backward needs only lse and O (DESIGN.md):
dq = g/T·(O − k) and dk = g/T·(p0 − 1)·q. The rarely needed gradient of the negatives recomputes
the logits block by block.

All arithmetic is fp32 whatever the input dtypes (bf16/fp16 blocks are upcast one block at a time),
or fp64 when an input is fp64 (so gradcheck can run on this backend).
Functions follow the interface in ``moco_fast.backends``.
"""

from __future__ import annotations

import torch

AVAILABLE = True

# Elements of the B×block score tile: 2**19 fp32 = 2 MiB, measured fastest here (B=256: 2048-key blocks).
_TILE_ELEMENTS = 1 << 19


def block_size(batch: int, num_keys: int) -> int:
    """Rows of negatives handled per step: about _TILE_ELEMENTS scores, at least 256 rows."""
    return max(256, min(max(num_keys, 1), _TILE_ELEMENTS // max(batch, 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 when an input is fp64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def infonce_forward(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, scale: float, block: int | None = None):
    """Single-pass forward: returns (lse (B,) fp32, out (B, d) fp32, rank (B,) int64)."""
    ct = _compute_dtype(q, k, negatives)
    qs = q.to(ct) * scale  # fold 1/T into q once: logits = qs · x
    kf = k.to(ct)
    pos = (qs * kf).sum(dim=1)
    row_max = pos.clone()
    row_sum = torch.ones_like(pos)
    acc = kf.clone()
    rank = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    num_keys = negatives.shape[0]
    block = block or block_size(q.shape[0], num_keys)
    for start in range(0, num_keys, block):
        keys = negatives[start : start + block].to(ct)
        scores = qs @ keys.T  # (B, block)
        rank += (scores > pos[:, None]).sum(dim=1)
        new_max = torch.maximum(row_max, scores.amax(dim=1))
        correction = torch.exp(row_max - new_max)
        probs = scores.sub_(new_max[:, None]).exp_()  # in place: the scores are not needed any more
        row_sum = row_sum * correction + probs.sum(dim=1)
        acc = torch.addmm(acc * correction[:, None], probs, keys)
        row_max = new_max
    lse = row_max + torch.log(row_sum)
    out = acc / row_sum[:, None]
    return lse, out, rank


def infonce_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, scale: float):
    """O(B·d) backward from the saved lse and O: returns (dq in q.dtype, dk in k.dtype)."""
    ct = _compute_dtype(q, k, lse)
    qf, kf = q.to(ct), k.to(ct)
    g = grad.to(ct) * scale
    p0 = torch.exp((qf * scale * kf).sum(dim=1) - lse)  # rounded like the forward's positive logit
    dq = g[:, None] * (out - kf)
    dk = (g * (p0 - 1.0))[:, None] * qf
    return dq.to(q.dtype), dk.to(k.dtype)


def infonce_backward_negatives(
    grad: torch.Tensor, q: torch.Tensor, negatives: torch.Tensor, lse: torch.Tensor, scale: float, block: int | None = None
) -> torch.Tensor:
    """dn_j = scale·Σ_i g_i·softmax_ij·q_i, recomputing the logits block by block: (K, d) in negatives.dtype."""
    ct = _compute_dtype(q, negatives, lse)
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


@torch.no_grad()
def momentum_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """target ← target·m + source·(1 − m) for each pair, the official formula and rounding, in fused foreach ops."""
    if not targets:
        return
    if targets[0].dtype in (torch.float32, torch.float64):
        # Same two roundings as the official `p_k * m + p_q * (1 - m)`; _foreach ops fuse the list.
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, torch._foreach_mul(sources, 1.0 - momentum))
    else:  # half types: compute in fp32, round once
        for t, s in zip(targets, sources):
            t.copy_(t.float().mul_(momentum).add_(s.float() * (1.0 - momentum)))


@torch.no_grad()
def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, keys: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Ring write of ``keys`` at rows (ptr + i) mod K, all-or-nothing on non-finite keys; no host sync."""
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
