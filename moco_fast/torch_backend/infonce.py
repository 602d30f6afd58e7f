"""The "torch" backend's InfoNCE: the single pass in blockwise PyTorch ops, for any device.

One sweep over the negatives in blocks of rows keeps, per query row, the running max ``m`` (started
at the positive's logit, so m = max(pos, max_j s_j)), the negatives' running sum
``l_neg = Σ_j exp(s_j − m)`` and their rescaled weighted sum ``acc = Σ_j exp(s_j − m)·n_j`` (a
flash-attention forward with V = K). The positive is kept apart from the negatives, so nothing
cancels when it dominates (loss → 0; docs/design.md "Numerics"):

    loss  = (m − pos) + log1p(l_neg + expm1(pos − m))      = log1p(l_neg) when pos is the max
    delta = O − k = (acc − l_neg·k) / (exp(pos − m) + l_neg)

No B×(K+1) logits ever exist: the extra memory is O(B·d + B·block). The backward needs only loss
and delta: dq = g/T·delta and dk = g/T·expm1(−loss)·q. The rarely needed gradient of the negatives
recomputes the logits block by block from lse.

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
    """Single-pass forward: returns (loss (B,), lse (B,), delta (B, d), rank (B,) int64); fp32 (fp64 for fp64).

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
    row_max = pos.clone()  # the positive is in the max from the start: exp(s − m) and exp(pos − m) <= 1
    row_sum = torch.zeros_like(pos)  # the negatives' part only
    acc = torch.zeros_like(kf)
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
    loss, delta = merge_positive(pos, row_max, row_sum, acc, kf)
    if not need_rank:
        rank.fill_(-1)
    return loss, pos + loss, delta, rank


def merge_positive(pos, row_max, neg_sum, neg_acc, kf):
    """(loss, delta) of rows whose max ``row_max`` >= pos, from the negatives' sum and weighted sum
    relative to it; the positive enters only through w0 = exp(pos − m), never as a difference."""
    below = pos - row_max  # <= 0; exactly 0 when the positive is the max
    loss = torch.log1p(neg_sum + torch.expm1(below)).add_(-below)
    delta = neg_acc.sub_(neg_sum[:, None] * kf).div_((torch.exp(below) + neg_sum)[:, None])
    return loss, delta


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
    """(loss, lse, delta, rank=-1) via the fused CPU attention kernel plus an analytic merge of the positive, or None.

    The kernel gives the negatives' lse_neg and mean out_neg; with a = lse_neg − pos the row's loss is
    softplus(a) and delta = O − k = sigmoid(a)·(out_neg − k) = (1 − p0)·(out_neg − k): no cancellation
    in either regime (a << 0 when the positive dominates)."""
    fused = fused_attention(q, negatives, scale) if k.dtype == torch.float32 else None
    if fused is None:
        return None
    out_neg, lse_neg = fused
    pos = (q * scale * k).sum(dim=1)
    a = lse_neg - pos
    loss = a.clamp_min(0).add_(torch.log1p(torch.exp(-a.abs())))  # softplus(a), exact for a of either sign
    delta = out_neg.sub_(k).mul_(torch.sigmoid(a)[:, None])
    rank = torch.full((q.shape[0],), -1, dtype=torch.int64)
    return loss, pos + loss, delta, rank


def infonce_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, loss: torch.Tensor, delta: torch.Tensor, scale: float
):
    """O(B·d) backward from the saved loss and delta = O − k: returns (dq in q.dtype, dk in k.dtype).

    dq = g·scale·delta; dk = g·scale·(p0 − 1)·q with p0 − 1 = expm1(−loss), exact when the loss is tiny
    (and exactly 0 when K = 0)."""
    ct = compute_dtype(q, k, loss)
    g = grad.to(ct) * scale
    dq = g[:, None] * delta.to(ct)
    dk = (g * torch.expm1(-loss.to(ct)))[:, None] * q.to(ct)
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
