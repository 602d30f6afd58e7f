"""The "torch" backend's InfoNCE: the single pass in blockwise PyTorch ops, for any device.

One sweep over the negatives in blocks of rows keeps, per query row, the running max ``m``, the
running sum ``l`` and the rescaled weighted sum ``acc`` of key rows (a flash-attention forward with
V = K). The row starts with the positive key (m = q·k, l = 1, acc = k), so no B×(K+1) logits
ever exist: the extra memory is O(B·d + B·block). The backward needs only lse and O (docs/design.md):
dq = g/T·(O − k) and dk = g/T·(p0 − 1)·q. The rarely needed gradient of the negatives recomputes
the logits block by block.

All arithmetic is fp32 whatever the input dtypes (bf16/fp16 blocks are upcast one block at a time),
or fp64 when an input is fp64 (so gradcheck can run on this backend).
Functions follow the contract in ``moco_fast.backends``.
"""

from __future__ import annotations

import os

import torch

from ..validation import compute_dtype

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


def fused_attention(q: torch.Tensor, keys: torch.Tensor, scale: float):
    """(O (M, d), lse (M,)) of softmax(scale·q·keysᵀ) over keys (V = K) by the fused CPU kernel, or None
    when it does not apply (not CPU fp32, no keys, disabled, or the kernel refuses)."""
    if (
        _FUSED_ATTENTION_OP is None
        or os.environ.get("MOCO_FAST_CPU_FUSED_ATTENTION", "1") == "0"
        or q.device.type != "cpu"
        or keys.shape[0] == 0
        or q.dtype != torch.float32
        or keys.dtype != torch.float32
    ):
        return None
    try:
        out, lse = _FUSED_ATTENTION_OP(q[None, None], keys[None, None], keys[None, None], scale=scale)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return out.reshape(q.shape), lse.reshape(q.shape[0])


def _fused_attention_forward(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, scale: float):
    """(loss, lse, out, rank=-1) via the fused CPU attention kernel plus an analytic merge of the positive, or None."""
    fused = fused_attention(q, negatives, scale) if k.dtype == torch.float32 else None
    if fused is None:
        return None
    out_neg, lse_neg = fused
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
