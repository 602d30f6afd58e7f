"""The "torch" backend's DINO passes: softmaxes over P prototypes, blockwise, never (rows, P).

``dino_softmax_pass`` is a flash-attention forward with the prototypes as keys (and values) and the
center as a per-column bias: one sweep over the prototypes in blocks keeps, per row, the running max,
the running sum and the rescaled weighted sum of value rows. ``dino_prototype_grad`` recomputes the
probabilities block by block from the saved lse and accumulates each block's rows of dW (the
cut-cross-entropy backward). Extra memory: one (rows, block) tile, about ``_TILE_ELEMENTS`` values,
plus O(rows·b), whatever P is.

All arithmetic is fp32 whatever the input dtypes (fp64 when an input is fp64). Functions follow the
contract in ``moco_fast.backends``.
"""

from __future__ import annotations

import torch

from ..validation import compute_dtype

# Values of the (rows, block) logits tile: 2**18 fp32 = 1 MiB, so the tile's exp and its two GEMMs stay
# in this CPU's L2 (measured: 2**17 .. 2**19 are within a few percent at rows = 768, P = 65536).
_TILE_ELEMENTS = 1 << 18


def block_size(rows: int, num_prototypes: int) -> int:
    """Prototypes per block: about _TILE_ELEMENTS logits, at least 128 columns."""
    return max(128, min(max(num_prototypes, 1), _TILE_ELEMENTS // max(rows, 1)))


def dino_softmax_pass(x, keys, values, bias, scale, block: int | None = None):
    """(lse (R,), out (R, b)) of z = scale·(x·keysᵀ − bias): lse_r = logsumexp_k z_rk, out_r = Σ_k p_rk·values_k."""
    ct = compute_dtype(x, keys, values)
    rows, num_prototypes = x.shape[0], keys.shape[0]
    xs = x.to(ct) * scale  # fold 1/T into the rows once
    bs = None if bias is None else bias.to(ct) * scale
    row_max = torch.full((rows,), float("-inf"), dtype=ct, device=x.device)
    row_sum = torch.zeros(rows, dtype=ct, device=x.device)
    acc = torch.zeros(rows, values.shape[1], dtype=ct, device=x.device)
    if rows == 0:
        return row_max, acc
    same = values is keys
    block = block or block_size(rows, num_prototypes)
    tile = torch.empty((rows, min(block, num_prototypes)), dtype=ct, device=x.device)
    for start in range(0, num_prototypes, block):
        k = keys[start : start + block].to(ct)
        v = k if same else values[start : start + block].to(ct)
        scores = tile[:, : k.shape[0]]
        torch.mm(xs, k.T, out=scores)
        if bs is not None:
            scores.sub_(bs[start : start + block])
        new_max = torch.maximum(row_max, scores.amax(dim=1))
        correction = torch.exp(row_max - new_max)
        probs = scores.sub_(new_max[:, None]).exp_()
        row_sum.mul_(correction).add_(probs.sum(dim=1))
        acc.mul_(correction[:, None]).addmm_(probs, v)
        row_max = new_max
    return row_max + torch.log(row_sum), acc.div_(row_sum[:, None])


def dino_prototype_grad(
    x_s, keys_s, lse_s, y_s, scale_s, x_t, keys_t, bias_t, lse_t, y_t, scale_t, grad_scale, block: int | None = None
):
    """dW (P, b) = grad_scale·(P_sᵀ·y_s + P_tᵀ·y_t), the probabilities recomputed blockwise; in keys_s.dtype.

    P_s = exp(scale_s·x_s·keys_sᵀ − lse_s) (student rows), P_t = exp(scale_t·(x_t·keys_tᵀ − bias_t) − lse_t)
    (teacher rows).
    """
    ct = compute_dtype(x_s, keys_s, x_t, keys_t, lse_s)
    num_prototypes = keys_s.shape[0]
    sets = []
    for x, keys, bias, lse, y, scale in (
        (x_s, keys_s, None, lse_s, y_s, scale_s),
        (x_t, keys_t, bias_t, lse_t, y_t, scale_t),
    ):
        if x.shape[0]:
            bs = None if bias is None else bias.to(ct) * scale
            sets.append((x.to(ct) * scale, keys, bs, lse.to(ct)[:, None], y.to(ct) * grad_scale))
    dw = torch.zeros(keys_s.shape, dtype=ct, device=keys_s.device)
    if not sets:
        return dw.to(keys_s.dtype)
    rows = max(s[0].shape[0] for s in sets)
    block = block or block_size(rows, num_prototypes)
    tile = torch.empty((rows, min(block, num_prototypes)), dtype=ct, device=keys_s.device)
    for start in range(0, num_prototypes, block):
        out = dw[start : start + block]
        for xs, keys, bs, lse, y in sets:
            k = keys[start : start + block].to(ct)
            probs = tile[: xs.shape[0], : k.shape[0]]
            torch.mm(xs, k.T, out=probs)
            if bs is not None:
                probs.sub_(bs[start : start + block])
            probs.sub_(lse).exp_()
            out.addmm_(probs.T, y)
    return dw if dw.dtype == keys_s.dtype else dw.to(keys_s.dtype)
