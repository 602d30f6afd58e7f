"""The naive PyTorch oracle: what the official MoCo code computes, written the same way.

It materializes the B×(K+1) logits (einsum for l_pos and l_neg, torch.cat, divide by T,
cross_entropy against label 0), so it needs several fp32 copies of a B×K matrix. It is the baseline
of every benchmark and the oracle of every test; nothing here is meant to be fast.

It is also the "reference" backend: the functions of the backend contract (``moco_fast.backends``)
at the end of this module run the same naive formulations behind the same custom ops, so
``backend="reference"`` gives the official numbers through the library's own code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .backends import Support
from .validation import FLOAT_DTYPES

_ANY_FLOAT = frozenset(FLOAT_DTYPES)
SUPPORT = {
    "info_nce": Support(devices=None, dtypes=_ANY_FLOAT),
    "momentum_update": Support(devices=None, dtypes=_ANY_FLOAT, modes=frozenset({"lerp", "exact"})),
    "enqueue": Support(devices=None, dtypes=_ANY_FLOAT),
}


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official logits: (B, 1+K) = [q·k, q·negatives] / T, computed in fp32 (or q's wider dtype)."""
    dtype = torch.promote_types(
        torch.promote_types(q.dtype, k.dtype), torch.promote_types(negatives.dtype, torch.float32)
    )
    q, k, negatives = q.to(dtype), k.to(dtype), negatives.to(dtype)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, negatives)
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def reference_info_nce(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.07, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InfoNCE the official way. Returns (loss, lse, rank).

    loss: reduced as asked ("mean" | "sum" | "none" → (B,)); lse: (B,) logsumexp of the logits
    (detached); rank: (B,) int64 number of negatives whose logit is strictly above the positive's.
    Gradients flow to every input that requires them through ordinary autograd.
    """
    logits = info_nce_logits(q, k, negatives, temperature)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1).float()
        rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    return loss.float() if loss.dtype != torch.float64 else loss, lse, rank


def topk_accuracy(logits: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Fraction of rows whose label 0 is in the top-k logits (the official ``accuracy`` / 100)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(0)
    return [correct[:, : min(kk, maxk)].any(dim=1).float().mean() for kk in ks]


@torch.no_grad()
def reference_momentum_update(target: torch.nn.Module, source: torch.nn.Module, momentum: float) -> None:
    """The official per-parameter loop: param_k = param_k * m + param_q * (1 - m)."""
    for param_q, param_k in zip(source.parameters(), target.parameters()):
        param_k.data = param_k.data * momentum + param_q.data * (1.0 - momentum)


@torch.no_grad()
def reference_enqueue(queue_t: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """The official enqueue: queue is (dim, K), needs K % batch == 0 and syncs on int(ptr)."""
    batch_size = keys.shape[0]
    p = int(ptr)
    assert queue_t.shape[1] % batch_size == 0  # for simplicity, as in the official code
    queue_t[:, p : p + batch_size] = keys.T
    ptr[0] = (p + batch_size) % queue_t.shape[1]


# ------------------------------------------------------------------------------------------------
# The "reference" backend: the contract's functions, written the naive way
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def infonce_forward(q, k, negatives, scale, need_rank=True):
    """(loss, lse, out, rank) from the materialized official logits (B, 1+K)."""
    logits = info_nce_logits(q, k, negatives, 1.0 / scale)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction="none")
    probs = torch.softmax(logits, dim=1)
    out = probs[:, :1] * k.to(logits.dtype) + probs[:, 1:] @ negatives.to(logits.dtype)
    rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    return loss, torch.logsumexp(logits, dim=1), out, rank


@torch.no_grad()
def infonce_backward(grad, q, k, lse, out, scale):
    """(dq, dk): the cross-entropy gradient through the logits, written with the saved softmax mean."""
    dtype = out.dtype
    g = grad.to(dtype)[:, None] * scale
    positive_logit = info_nce_logits(q, k, k[:0], 1.0 / scale)  # (B, 1), rounded as in the forward
    p_pos = torch.exp(positive_logit - lse[:, None])
    return (g * (out - k.to(dtype))).to(q.dtype), (g * (p_pos - 1.0) * q.to(dtype)).to(k.dtype)


@torch.no_grad()
def infonce_backward_negatives(grad, q, negatives, lse, scale):
    """dn from the materialized (B, K) softmax."""
    dtype = lse.dtype
    probs = torch.exp(q.to(dtype) @ negatives.to(dtype).T * scale - lse[:, None])
    return (probs.T @ (q.to(dtype) * grad.to(dtype)[:, None] * scale)).to(negatives.dtype)


@torch.no_grad()
def momentum_update_(targets, sources, momentum, exact=False):
    """The official per-parameter loop (``exact``), or the same loop with a lerp."""
    for t, s in zip(targets, sources):
        if exact:
            t.copy_(t * momentum + s * (1.0 - momentum))
        else:
            t.lerp_(s, 1.0 - momentum)


@torch.no_grad()
def enqueue_(queue, ptr, count, keys, normalize):
    """One row at a time at (ptr + i) mod K, after the official host read of the pointer."""
    ok = bool(torch.isfinite(keys).all())
    if ok:
        size, start = queue.shape[0], int(ptr)
        rows = F.normalize(keys.to(torch.promote_types(keys.dtype, torch.float32)), dim=1) if normalize else keys
        for i in range(keys.shape[0]):
            queue[(start + i) % size] = rows[i]
        ptr.fill_((start + keys.shape[0]) % size)
        count.fill_(min(int(count) + keys.shape[0], size))
    return torch.tensor([ok], device=queue.device)


# ------------------------------------------------------------------------------------------------
# --- BYOL / SwAV / DINO: the official formulations (lightly's code, written the same way)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """The official / lightly Sinkhorn-Knopp in the exp domain, in ``scores``' dtype (single process).

    Q = exp(scores/ε)ᵀ (P, B), Q /= ΣQ, then per iteration Q /= row sums, Q /= P, Q /= column sums,
    Q /= B; returns (B·Q)ᵀ (B, P). Overflows to inf/NaN once scores/ε exceeds the dtype's exp range.
    """
    Q = torch.exp(scores / epsilon).t()
    Q /= torch.sum(Q)
    num_prototypes, num_samples = Q.shape
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= num_prototypes
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= num_samples
    Q *= num_samples
    return Q.t()


def reference_swav_loss(high, low, queue=None, temperature=0.1, iterations=3, epsilon=0.05) -> torch.Tensor:
    """lightly's SwaVLoss.forward on :func:`reference_sinkhorn`, in the inputs' dtype (0-dim result)."""
    crops = list(high) + list(low)
    loss = 0.0
    for i, scores in enumerate(high):
        inputs = scores.detach() if queue is None else torch.cat((scores.detach(), queue[i].detach()))
        q = reference_sinkhorn(inputs, iterations, epsilon)[: scores.shape[0]]
        sub = sum(
            -torch.mean(torch.sum(q * F.log_softmax(crops[v] / temperature, dim=1), dim=1))
            for v in range(len(crops))
            if v != i
        )
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)


def reference_dino_loss(
    teacher_out: Sequence[torch.Tensor],
    student_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """lightly's DINOLoss.forward without the center update: the materialized (views, B, P) softmaxes.

    center: (P,) or (1, 1, P). Pairs (teacher view t, student view s) with t ≠ s, averaged over pairs
    and batch rows.
    """
    t_out = F.softmax((torch.stack(list(teacher_out)) - center.reshape(1, 1, -1)) / teacher_temp, dim=-1)
    s_out = F.log_softmax(torch.stack(list(student_out)) / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    return loss.sum() / (n_terms * t_out.shape[1])


@torch.no_grad()
def dino_softmax_pass(x, keys, values, bias, scale):
    """(lse, out) from the materialized logits z = scale·(x·keysᵀ − bias): see moco_fast.backends."""
    ct = torch.promote_types(torch.promote_types(x.dtype, keys.dtype), torch.promote_types(values.dtype, torch.float32))
    logits = x.to(ct) @ keys.to(ct).T
    if bias is not None:
        logits = logits - bias.to(ct)
    logits = logits * scale
    return torch.logsumexp(logits, dim=1), torch.softmax(logits, dim=1) @ values.to(ct)


@torch.no_grad()
def dino_prototype_grad(
    student, teacher, prototypes, teacher_prototypes, center, lse_s, lse_t, num_views, num_teacher_views,
    student_scale, teacher_scale, grad_scale,
):  # fmt: skip
    """dW from the two materialized softmaxes: grad_scale·(P_sᵀ y_s + P_tᵀ y_t), in prototypes.dtype."""
    from .dino_pairs import prototype_grad_rows

    ct = lse_s.dtype
    y_s, y_t = prototype_grad_rows(student, num_views, num_teacher_views, ct)
    p_s = torch.exp((student.to(ct) @ prototypes.to(ct).T) * student_scale - lse_s[:, None])
    p_t = torch.exp((teacher.to(ct) @ teacher_prototypes.to(ct).T - center.to(ct)) * teacher_scale - lse_t[:, None])
    return ((p_s.T @ y_s + p_t.T @ y_t) * grad_scale).to(prototypes.dtype)


SUPPORT["dino_loss"] = Support(devices=None, dtypes=_ANY_FLOAT)
