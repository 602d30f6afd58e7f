"""The "torch" backend's contrastive cross-entropy: one fused core for NT-Xent, MoCo v3, CMC and the
memory bank's exact softmax, in blockwise PyTorch ops, for any device.

The op (contract in ``moco_fast.backends``): queries q (M, d) against a key set keys (N, d), row i's
target column t_i and an optional excluded column e_i (NT-Xent's self-similarity):

    loss_i = lse_{j != e_i}(s·q_i·k_j) − s·q_i·k_{t_i}          (s = 1/temperature)

The forward is a flash-attention forward with V = K: per tile of query rows, a sweep over key tiles
keeps the running max, sum and rescaled Σ_j p_ij·k_j, so the M×N logits never exist (extra memory
O(tile + M·d)). As InfoNCE's, the sweep holds the keys other than the target and the target's logit
joins at the end (docs/design.md "Numerics"): loss_i = (m − pos) + log1p(l_other + expm1(pos − m)) and
O_i − k_{t_i} = (Σ_{j≠t} w_j·(k_j − k_{t_i})) / (w0 + l_other), exact when the loss → 0. It returns
dloss_dq_i = s·(O_i − k_{t_i}) with O_i = Σ_j P_ij k_j, which is the whole gradient of the queries:
the backward of q is elementwise and never reads the keys again. When the keys need a gradient
(NT-Xent, CMC), dk_j = s·Σ_i g_i (P_ij − [j = t_i])·q_i is a column pass that recomputes P block by
block from the saved lse. The excluded column and the target indicator are applied per tile by an
O(rows) gather/scatter, never by a materialized mask.

All arithmetic is fp32 whatever the input dtypes (one key tile upcast at a time), fp64 for fp64.
"""

from __future__ import annotations

import torch

from ..validation import compute_dtype
from .infonce import fused_attention, merge_positive

# Elements of one score tile (rows × keys): 2**20 fp32 = 4 MiB.
_TILE_ELEMENTS = 1 << 20


def tiles(rows: int, keys: int, tile: int = _TILE_ELEMENTS) -> tuple[int, int]:
    """(query rows, keys) per tile: about ``tile`` scores, keys a multiple of 256 when there are many."""
    block_n = min(max(keys, 1), 1024)
    block_m = min(max(rows, 1), max(256, tile // block_n))
    if block_m == rows:  # few query rows (a memory bank batch): widen the key tiles instead
        block_n = min(max(keys, 1), max(1024, tile // max(rows, 1)))
    return block_m, block_n


def _columns(index: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of ``index`` inside the tile [start, start + width), clamped; whether it is inside)."""
    col = index - start
    inside = (col >= 0) & (col < width)
    return col.clamp(0, width - 1).unsqueeze(1), inside.unsqueeze(1)


def _set_where(tile: torch.Tensor, col: torch.Tensor, inside: torch.Tensor, value) -> None:
    """tile[r, col[r]] = value (a float, or (rows, 1) per row) where inside[r] (one element per row; rows
    outside are rewritten unchanged)."""
    tile.scatter_(1, col, torch.where(inside, value, tile.gather(1, col)))


def contrast_forward(
    q: torch.Tensor,
    keys: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None,
    scale: float,
    need_rank: bool = True,
    block: tuple[int, int] | None = None,
):
    """(loss (M,), lse (M,), dloss_dq (M, d), rank (M,) int64); fp32 (fp64 for fp64 inputs).

    rank_i = #{j ∉ {t_i, e_i} : q_i·k_j > q_i·k_{t_i}}; with ``need_rank=False`` it is -1s. Without an
    excluded column and without the rank, CPU fp32 inputs go through PyTorch's fused CPU attention
    kernel (faster here; infonce.fused_attention) when it runs, and the rows whose loss it cannot give
    exactly go through the blockwise loop again (see _fused_forward).
    """
    if exclude is None and not need_rank and block is None:
        fused = _fused_forward(q, keys, target, scale)
        if fused is not None:
            return fused
    return _blockwise_forward(q, keys, target, exclude, scale, need_rank, block)


# The fused kernel's loss is lse − pos over every key, target included: its rounding is a few ulps of
# |lse| + |pos|, which is within 1e-6 of the loss only while loss >= _CANCELLATION·(|lse| + |pos|); the
# other rows (the target dominates: loss → 0) are recomputed with the target kept apart.
_CANCELLATION = 0.1


def _fused_forward(q, keys, target, scale):
    fused = fused_attention(q, keys, scale)
    if fused is None:
        return None
    out, lse = fused
    k_target = keys.index_select(0, target)
    pos = (q * scale * k_target).sum(dim=1)
    loss = lse - pos
    dloss_dq = out.sub_(k_target).mul_(scale)
    redo = torch.nonzero(loss < _CANCELLATION * (lse.abs() + pos.abs())).squeeze(1)  # CPU only: no sync cost
    if redo.numel():
        loss_r, lse_r, dq_r, _ = _blockwise_forward(q[redo], keys, target[redo], None, scale, False, None)
        loss[redo], lse[redo], dloss_dq[redo] = loss_r, lse_r, dq_r
    return loss, lse, dloss_dq, torch.full_like(target, -1)


def _blockwise_forward(q, keys, target, exclude, scale, need_rank, block):
    """The flash loop with the target column kept apart: the sweep holds the other keys only (the target
    and the excluded column masked to -inf per tile) and the target's logit joins at the end through
    infonce.merge_positive, so a loss → 0 is never a difference of two nearly equal numbers."""
    ct = compute_dtype(q, keys)
    rows, dim = q.shape
    num_keys = keys.shape[0]
    block_m, block_n = block or tiles(rows, num_keys)
    qs = q.to(ct) * scale  # fold 1/T into q once: logits = qs · k
    k_target = keys.index_select(0, target).to(ct)
    pos = (qs * k_target).sum(dim=1)  # the target's logit, in plain fp32
    loss = torch.empty(rows, dtype=ct, device=q.device)
    dloss_dq = torch.empty(rows, dim, dtype=ct, device=q.device)
    rank = torch.full((rows,), -1, dtype=torch.int64, device=q.device)
    for r0 in range(0, rows, block_m):
        r1 = min(r0 + block_m, rows)
        qb, pb, tb = qs[r0:r1], pos[r0:r1], target[r0:r1]
        eb = None if exclude is None else exclude[r0:r1]
        row_max = pb.clone()  # the target's logit is in the max from the start: every exp(s − m) <= 1
        row_sum = torch.zeros(r1 - r0, dtype=ct, device=q.device)  # the other keys' part only
        acc = torch.zeros(r1 - r0, dim, dtype=ct, device=q.device)
        beats = torch.zeros(r1 - r0, dtype=torch.int64, device=q.device) if need_rank else None
        tile = torch.empty(r1 - r0, min(block_n, num_keys), dtype=ct, device=q.device)
        for c0 in range(0, num_keys, block_n):
            kb = keys[c0 : c0 + block_n].to(ct)
            width = kb.shape[0]
            scores = tile[:, :width]
            torch.mm(qb, kb.T, out=scores)
            _set_where(scores, *_columns(tb, c0, width), float("-inf"))
            if eb is not None:
                _set_where(scores, *_columns(eb, c0, width), float("-inf"))
            if beats is not None:
                beats += (scores > pb[:, None]).sum(dim=1)
            new_max = torch.maximum(row_max, scores.amax(dim=1))
            correction = torch.exp(row_max - new_max)
            probs = scores.sub_(new_max[:, None]).exp_()  # in place: the scores are not needed any more
            row_sum.mul_(correction).add_(probs.sum(dim=1))
            acc.mul_(correction[:, None]).addmm_(probs, kb)
            row_max = new_max
        loss_b, delta = merge_positive(pb, row_max, row_sum, acc, k_target[r0:r1])
        loss[r0:r1] = loss_b
        dloss_dq[r0:r1] = delta.mul_(scale)
        if beats is not None:
            rank[r0:r1] = beats
    return loss, pos + loss, dloss_dq, rank


def contrast_backward_keys(
    grad: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None,
    lse: torch.Tensor,
    scale: float,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """dk_j = s·Σ_i g_i·(P_ij − [j = t_i])·q_i, recomputing P block by block: (N, d) in keys.dtype."""
    ct = compute_dtype(q, keys, lse)
    rows = q.shape[0]
    num_keys = keys.shape[0]
    block_m, block_n = block or tiles(rows, num_keys)
    qf = q.to(ct)
    qs = qf * scale
    weighted = qf * (grad.to(ct) * scale)[:, None]
    lse = lse.to(ct)
    # The target's P − 1 from its logit as the forward formed it (lse = pos + loss): expm1(pos − lse) is
    # −(1 − p_t) without the rounding of a recomputed dot, and exactly 0 when the target is the only key.
    target_term = torch.expm1((qs * keys.index_select(0, target).to(ct)).sum(dim=1) - lse)[:, None]
    dk = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device)
    tile = torch.empty(min(block_m, rows), min(block_n, num_keys), dtype=ct, device=q.device)
    for c0 in range(0, num_keys, block_n):
        kb = keys[c0 : c0 + block_n].to(ct)
        width = kb.shape[0]
        acc = torch.zeros(width, kb.shape[1], dtype=ct, device=q.device)
        for r0 in range(0, rows, block_m):
            r1 = min(r0 + block_m, rows)
            probs = tile[: r1 - r0, :width]
            torch.mm(qs[r0:r1], kb.T, out=probs)
            probs.sub_(lse[r0:r1, None]).exp_()
            if exclude is not None:
                _set_where(probs, *_columns(exclude[r0:r1], c0, width), 0.0)
            _set_where(probs, *_columns(target[r0:r1], c0, width), target_term[r0:r1])  # P − onehot(target)
            acc.addmm_(probs.T, weighted[r0:r1])
        dk[c0 : c0 + width] = acc.to(keys.dtype)
    return dk
