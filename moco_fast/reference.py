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
    """(loss, lse, delta, rank) from the materialized official logits (B, 1+K).

    The loss is the official cross_entropy (lse − pos in the logits' dtype: it cancels when the positive
    dominates, which is what the official code gets); delta = O − k = Σ_j p_j·(x_j − k) over
    x = [k, n_0, …] from the materialized softmax, in the logits' dtype."""
    logits = info_nce_logits(q, k, negatives, 1.0 / scale)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels, reduction="none")
    probs = torch.softmax(logits, dim=1)[:, 1:]  # the x_0 = k term of Σ_j p_j·(x_j − k) is 0
    delta = probs @ negatives.to(logits.dtype) - probs.sum(dim=1, keepdim=True) * k.to(logits.dtype)
    rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    return loss, torch.logsumexp(logits, dim=1), delta, rank


@torch.no_grad()
def infonce_backward(grad, q, k, loss, delta, scale):
    """(dq, dk): the cross-entropy gradient through the logits, dq = g·scale·delta and
    dk = g·scale·(p0 − 1)·q with the official p0 = exp(−loss)."""
    dtype = delta.dtype
    g = grad.to(dtype)[:, None] * scale
    p_pos = torch.exp(-loss.to(dtype))[:, None]
    return (g * delta).to(q.dtype), (g * (p_pos - 1.0) * q.to(dtype)).to(k.dtype)


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
# --- NT-Xent / MoCo v3 / CMC / memory bank: the naive formulations, then the contract functions
# ------------------------------------------------------------------------------------------------


def _wide(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (the dtype the naive formulations compute in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def contrast_logits(
    q: torch.Tensor, keys: torch.Tensor, temperature: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """The materialized (M, N) logits q·keysᵀ/T, with row i's excluded column (exclude[i] ≥ 0) at -inf."""
    dtype = _wide(q, keys)
    logits = q.to(dtype) @ keys.to(dtype).T / temperature
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        logits[rows, exclude[rows]] = float("-inf")
    return logits


def reference_contrastive_cross_entropy(
    q: torch.Tensor,
    keys: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cross_entropy(q·keysᵀ/T with excluded columns at -inf, target). Returns (loss, lse, rank) like
    :func:`reference_info_nce`; rank_i = keys (other than the target) whose logit beats the target's."""
    logits = contrast_logits(q, keys, temperature, exclude)
    loss = F.cross_entropy(logits, target, reduction=reduction)
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1).float()
        rank = (logits > logits.gather(1, target[:, None])).sum(dim=1)
    return loss.float() if loss.dtype != torch.float64 else loss, lse, rank


def reference_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent as its official code writes it: the (2N, 2N) similarity matrix of z = [z0; z1]
    over T, the diagonal masked (SimCLR subtracts LARGE_NUM = 1e9), labels i ± N, mean cross-entropy.
    Inputs used as given (normalize first)."""
    dtype = _wide(z0, z1)
    z = torch.cat([z0, z1]).to(dtype)
    n = z0.shape[0]
    logits = z @ z.T / temperature
    logits = logits - 1e9 * torch.eye(2 * n, dtype=dtype, device=z.device)
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, labels)


def reference_mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss`` (moco-v3/moco/builder.py): normalize, q·all_gather(k)ᵀ/T,
    labels arange(B) + B·rank, cross-entropy × 2T. k carries no gradient (the official concat_all_gather)."""
    import torch.distributed as dist

    from .distributed import concat_all_gather, is_distributed

    q = F.normalize(q, dim=1)
    k = concat_all_gather(F.normalize(k, dim=1).detach())
    logits = torch.einsum("nc,mc->nm", q.to(_wide(q, k)), k.to(_wide(q, k))) / temperature
    rank = dist.get_rank() if is_distributed() else 0
    labels = torch.arange(q.shape[0], dtype=torch.long, device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def reference_cmc_loss(views: Sequence[torch.Tensor], temperature: float = 0.07) -> torch.Tensor:
    """CMC's full graph (Tian et al. 2019, eq. 6) with in-batch negatives: the mean over every ordered
    pair of views (i, j), i ≠ j, and every sample a of cross_entropy(v_i[a]·v_jᵀ/T, a)."""
    losses = []
    for i, anchor in enumerate(views):
        for j, keys in enumerate(views):
            if i != j:
                logits = anchor.to(_wide(anchor, keys)) @ keys.to(_wide(anchor, keys)).T / temperature
                losses.append(F.cross_entropy(logits, torch.arange(anchor.shape[0], device=anchor.device)))
    return torch.stack(losses).mean()


def reference_memory_bank_loss(
    features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """NPID's exact non-parametric softmax (what its NCE approximates): cross_entropy(f·bankᵀ/T, index)."""
    dtype = _wide(features, bank)
    return F.cross_entropy(features.to(dtype) @ bank.to(dtype).T / temperature, indices)


@torch.no_grad()
def reference_memory_bank_update(
    memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float = 0.5
) -> None:
    """NPID's update (lemniscate.pytorch, NCEAverage/LinearAverage backward): index_select, mul_(m),
    add_(f·(1 − m)), divide by the norm, index_copy_. Duplicates: the last occurrence is kept."""
    keep = [b for b in range(indices.shape[0]) if int(indices[b]) not in indices[b + 1 :].tolist()]
    idx = indices[keep]
    weight_pos = memory.index_select(0, idx).to(_wide(memory, features))
    weight_pos.mul_(momentum)
    weight_pos.add_(torch.mul(features[keep].to(weight_pos.dtype), 1 - momentum))
    w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
    memory.index_copy_(0, idx, weight_pos.div(w_norm).to(memory.dtype))


# The "reference" backend's contract functions for these ops.


@torch.no_grad()
def contrast_forward(q, keys, target, exclude, scale, need_rank=True):
    """(loss, lse, dloss_dq, rank) from the materialized (M, N) logits and softmax."""
    logits = contrast_logits(q, keys, 1.0 / scale, exclude)
    loss = F.cross_entropy(logits, target, reduction="none")
    probs = torch.softmax(logits, dim=1)
    kf = keys.to(logits.dtype)
    dloss_dq = (probs @ kf - kf[target]) * scale
    rank = (logits > logits.gather(1, target[:, None])).sum(dim=1)
    return loss, torch.logsumexp(logits, dim=1), dloss_dq, rank


@torch.no_grad()
def contrast_backward_keys(grad, q, keys, target, exclude, lse, scale):
    """dk = s·(P − onehot(target))ᵀ·(g·q) from the materialized softmax."""
    logits = contrast_logits(q, keys, 1.0 / scale, exclude)
    probs = torch.exp(logits - lse.to(logits.dtype)[:, None])
    probs[torch.arange(q.shape[0], device=q.device), target] -= 1.0
    return (probs.T @ (q.to(logits.dtype) * grad.to(logits.dtype)[:, None] * scale)).to(keys.dtype)


@torch.no_grad()
def memory_bank_update_(bank, indices, features, momentum):
    """NPID's update, after a host check that every feature is finite (all-or-nothing)."""
    ok = bool(torch.isfinite(features).all())
    if ok:
        reference_memory_bank_update(bank, indices, features, momentum)
    return torch.tensor([ok], device=bank.device)


SUPPORT["contrast"] = Support(devices=None, dtypes=_ANY_FLOAT)
SUPPORT["memory_bank_update"] = Support(devices=None, dtypes=_ANY_FLOAT)
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
