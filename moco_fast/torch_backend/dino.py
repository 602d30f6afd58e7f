"""The "torch" backend's DINO passes: softmaxes over P prototypes, blockwise, never (rows, P).

``dino_softmax_pass`` is a flash-attention forward with the prototypes as keys (and values) and the
center as a per-column bias: one sweep over the prototypes in blocks keeps, per row, the running max,
the running sum and the rescaled weighted sum of value rows. ``dino_prototype_grad`` recomputes the
probabilities block by block from the saved lse and writes each block's rows of dW (the cut-cross-entropy
backward), the teacher's term folded into the student rows it pairs with. Extra memory: one (rows, block)
tile, about ``_TILE_ELEMENTS`` values, plus O(rows·b), whatever P is.

All arithmetic is fp32 whatever the input dtypes (fp64 when an input is fp64). Functions follow the
contract in ``moco_fast.backends``.
"""

from __future__ import annotations

import os

import torch

from .. import dino_pairs
from ..validation import compute_dtype

# Values of the (rows, block) logits tile: 2**18 fp32 = 1 MiB, so the tile's exp and its two GEMMs stay
# in this CPU's L2 (measured: 2**17 .. 2**19 are within a few percent at rows = 768, P = 65536).
_TILE_ELEMENTS = 1 << 18


def block_size(rows: int, num_prototypes: int) -> int:
    """Prototypes per block: about _TILE_ELEMENTS logits, at least 128 columns."""
    return max(128, min(max(num_prototypes, 1), _TILE_ELEMENTS // max(rows, 1)))


# Rows per sweep of the forward: the running (rows, b) accumulator and the (rows, block) tile stay in cache
# (P = 65536, b = 256, 768 rows, 1 thread on the shared 2-core machine: 128-row sweeps with 2048-wide blocks
# were as fast or faster than one 768-row sweep; the loads were too noisy for a firmer figure).
_ROW_CHUNK = 128


def dino_softmax_pass(x, keys, values, bias, scale, block: int | None = None):
    """(lse (R,), out (R, b)) of z = scale·(x·keysᵀ − bias): lse_r = logsumexp_k z_rk, out_r = Σ_k p_rk·values_k."""
    if bias is None and block is None:
        fused = _fused_attention_pass(x, keys, values, scale)
        if fused is not None:
            return fused
    if x.shape[0] > _ROW_CHUNK:
        parts = [
            _softmax_sweep(x[r : r + _ROW_CHUNK], keys, values, bias, scale, block)
            for r in range(0, x.shape[0], _ROW_CHUNK)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _softmax_sweep(x, keys, values, bias, scale, block)


def _fused_attention_pass(x, keys, values, scale):
    """The student pass (no bias, values = keys) by PyTorch's fused CPU flash-attention kernel, or None.

    The same private aten op and guard as the InfoNCE forward (torch_backend/infonce.py): fp32 CPU tensors
    only, any failure falls back to the blockwise sweep, MOCO_FAST_CPU_FUSED_ATTENTION=0 disables it.
    """
    from .infonce import _FUSED_ATTENTION_OP

    if (
        _FUSED_ATTENTION_OP is None
        or os.environ.get("MOCO_FAST_CPU_FUSED_ATTENTION", "1") == "0"
        or x.device.type != "cpu"
        or x.shape[0] == 0
        or any(t.dtype != torch.float32 for t in (x, keys, values))
        or not (values is keys or values.data_ptr() == keys.data_ptr())
    ):
        return None
    try:
        out, lse = _FUSED_ATTENTION_OP(x[None, None], keys[None, None], keys[None, None], scale=scale)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return lse.reshape(x.shape[0]), out.reshape(x.shape)


def _softmax_sweep(x, keys, values, bias, scale, block: int | None):
    ct = compute_dtype(x, keys, values)
    rows, num_prototypes = x.shape[0], keys.shape[0]
    xs = x.to(ct) * scale  # fold 1/T into the rows once
    bs = None if bias is None else bias.to(ct) * scale
    row_max = torch.full((rows,), float("-inf"), dtype=ct, device=x.device)
    row_sum = torch.zeros(rows, dtype=ct, device=x.device)
    acc = torch.zeros(rows, values.shape[1], dtype=ct, device=x.device)
    if rows == 0:
        return row_max, acc
    same = values is keys or (values.data_ptr() == keys.data_ptr() and values.dtype == keys.dtype)
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
    student,
    teacher,
    prototypes,
    teacher_prototypes,
    center,
    lse_s,
    lse_t,
    num_views,
    num_teacher_views,
    student_scale,
    teacher_scale,
    grad_scale,
    block: int | None = None,
):
    """dW (P, b) in prototypes.dtype, the probabilities recomputed block by block (contract: moco_fast.backends).

    Per block of prototypes, with P_s = exp(scale_s·h·Wᵀ − lse_s) (S, B, blk) and P_t = exp(scale_t·(h_t·W_tᵀ − c)
    − lse_t) (T, B, blk): G[v] = n_v·P_s[v] − Σ_{u≠v} P_t[u] and dW_blk = grad_scale·Σ_v G[v]ᵀ·h[v] — one
    (blk × S·B) @ (S·B × b) product, the teacher's term folded into the student rows it pairs with (one GEMM
    per block fewer than P_sᵀ·y_s + P_tᵀ·y_t).
    """
    ct = compute_dtype(student, teacher, prototypes, teacher_prototypes, lse_s)
    S, T = num_views, num_teacher_views
    num_prototypes, dim = prototypes.shape
    rows = student.shape[0] // S
    counts, _ = dino_pairs.partners(S, T)
    n_v = torch.tensor(counts, dtype=ct, device=student.device)[:, None, None]
    h = student.to(ct)
    xs, xt = h * student_scale, teacher.to(ct) * teacher_scale
    bs = center.to(ct) * teacher_scale
    same = teacher_prototypes.data_ptr() == prototypes.data_ptr() and teacher_prototypes.dtype == prototypes.dtype
    dw = torch.empty((num_prototypes, dim), dtype=ct, device=student.device)
    block = block or block_size(student.shape[0] + teacher.shape[0], num_prototypes)
    width = min(block, num_prototypes)
    tile_s = torch.empty((student.shape[0], width), dtype=ct, device=student.device)
    tile_t = torch.empty((teacher.shape[0], width), dtype=ct, device=student.device)
    both = min(S, T)
    for start in range(0, num_prototypes, block):
        w = prototypes[start : start + block].to(ct)
        wt = w if same else teacher_prototypes[start : start + block].to(ct)
        n = w.shape[0]
        p_s, p_t = tile_s[:, :n], tile_t[:, :n]
        torch.mm(xs, w.T, out=p_s)
        p_s.sub_(lse_s[:, None]).exp_()
        torch.mm(xt, wt.T, out=p_t)
        p_t.sub_(bs[start : start + n]).sub_(lse_t[:, None]).exp_()
        g = p_s.view(S, rows, n).mul_(n_v)  # n_v·P_s[v], in place
        pt = p_t.view(T, rows, n)
        g.sub_(pt.sum(dim=0))  # − Σ_u P_t[u] ...
        g[:both].add_(pt[:both])  # ... + P_t[v]: the teacher view of the same crop is not a partner
        torch.mm(p_s.T, h, out=dw[start : start + n])
    dw.mul_(grad_scale)
    return dw if dw.dtype == prototypes.dtype else dw.to(prototypes.dtype)
