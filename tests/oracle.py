"""The float64 oracle and the error metrics of the whole suite (``from oracle import ...``).

Everything here is plain float64 torch math written from docs/design.md ("Op contracts"): it imports
nothing from moco_fast, so a bug in the code under test cannot hide in its own yardstick. Inputs are
taken as given (already rounded to their dtype) and upcast, so the error a test measures is the
implementation's own.

InfoNCE. Row i's logits are scale·[q_i·k_i, q_i·n_0, …, q_i·n_{K−1}] (scale = 1/T), target 0;
loss_i = lse_i − logit_i0; out_i = Σ_j softmax_ij·x_j over x = [k_i, n_0, …]; rank_i = #{j : q_i·n_j >
q_i·k_i} (strictly); dq_i = g_i·scale·(out_i − k_i), dk_i = g_i·scale·(p_i0 − 1)·q_i,
dn_j = scale·Σ_i g_i·softmax_ij·q_i.

Momentum (EMA). The default update is the lerp t + (1 − m)·(s − t) rounded once to the storage dtype;
the exact mode is the official ``t·m + s·(1 − m)`` with its two roundings in the storage dtype.

Queue. :class:`RingModel`: row (ptr + i) mod K gets key i, ptr ← (ptr + B) mod K, count saturates at K.

Error metrics: :func:`rel` (‖a − b‖/‖b‖), :func:`ulp` (the spacing of a dtype at |x|),
:func:`assert_close_norm`, :func:`assert_rounded_once`, :func:`close_1ulp`, and :func:`check_rank`
(the strict count, up to negatives within eps of a tie).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

F64 = torch.float64
EPS32 = 2.0**-23

# ------------------------------------------------------------------------------------------------
# error metrics
# ------------------------------------------------------------------------------------------------

#: (mantissa bits, smallest normal exponent) of the storage dtypes.
_FLOAT_BITS = {torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14), F64: (52, -1022)}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |x| (float64): 2^(floor(log2|x|) − mantissa bits), with
    the subnormal spacing below the smallest normal (so 2^-133 for bf16 at x = 0)."""
    mantissa, emin = _FLOAT_BITS[dtype]
    x = x.double()
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**emin)))
    return torch.exp2(exponent - mantissa)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """:func:`ulp` for bfloat16 (8 significant bits)."""
    return ulp(x, torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (‖b‖ clamped at 1e-300); a non-finite ``a`` fails at once."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close_norm(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """‖out − ref‖ ≤ rtol·‖ref‖ + atol (the design's error model), finite, same shape."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref = out.detach().double().cpu(), ref.double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    err = (out64 - ref).norm().item()
    bound = rtol * ref.norm().item() + atol
    assert err <= bound, f"{what}: ||out-ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref.norm().item():.3e})"


def assert_rounded_once(out: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    """``out`` (bf16) is the float64 ``ref`` rounded once: within one bf16 ulp elementwise
    (round-to-nearest gives half an ulp; atol covers the fp32 error before the rounding)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.bfloat16
    out64, ref = out.detach().double().cpu(), ref.double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    worst = ((out64 - ref).abs() - (bf16_ulp(ref) + atol)).max().item()
    assert worst <= 0, f"{what}: elementwise error exceeds one ulp by {worst:.3e}"


def close_1ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one rounding of a's dtype (relative), 1e-6 absolute."""
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10, F64: 1e-12}[a.dtype]
    return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=eps, atol=1e-6)


def check_rank(rank: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, eps: float) -> None:
    """``rank`` (B,) int64 counts the negatives beating the positive, up to negatives within ``eps`` of
    a tie: #{neg > pos + eps} ≤ rank ≤ #{neg > pos − eps}. ``pos`` (B,), ``neg`` (B, K) float64 in any
    one unit (dot products or logits) and eps in that unit. For exact ties use :func:`strict_rank`."""
    rank = rank.cpu()
    assert rank.dtype == torch.int64 and (rank >= 0).all()
    pos, neg = pos.cpu(), neg.cpu()
    lo = (neg > pos[:, None] + eps).sum(1)
    hi = (neg > pos[:, None] - eps).sum(1)
    bad = ((rank < lo) | (rank > hi)).nonzero().flatten().tolist()
    assert not bad, f"rank wrong at rows {bad[:5]}: got {rank[bad[:5]].tolist()}, exact {lo[bad[:5]].tolist()}"


def strict_rank(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """#{j : neg_ij > pos_i} (strictly: a tie does not count), int64."""
    return (neg > pos[:, None]).sum(1)


# ------------------------------------------------------------------------------------------------
# InfoNCE
# ------------------------------------------------------------------------------------------------


class InfoNCE(NamedTuple):
    """The float64 forward of one problem. pos (B,) = q_i·k_i and neg (B, K) = q_i·n_j are the
    unscaled dot products; logits (B, 1+K) = scale·[pos, neg]; rank is the strict count."""

    loss: torch.Tensor
    lse: torch.Tensor
    out: torch.Tensor
    rank: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    logits: torch.Tensor
    delta: torch.Tensor  # out - k, what the contract forward returns


def infonce_forward(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, scale: float) -> InfoNCE:
    """loss, lse, out (B, d), rank, pos, neg, logits, delta = out - k of InfoNCE in float64 (on the inputs'
    device)."""
    q, k, n = q.detach().double(), k.detach().double(), n.detach().double()
    pos = (q * k).sum(1)
    neg = q @ n.T
    logits = torch.cat([pos[:, None], neg], 1) * scale
    lse = torch.logsumexp(logits, 1)
    p = torch.softmax(logits, 1)
    out = p[:, :1] * k + p[:, 1:] @ n
    return InfoNCE(lse - logits[:, 0], lse, out, strict_rank(pos, neg), pos, neg, logits, out - k)


def infonce_forward_chunked(q, k, n, scale, chunk: int = 512) -> InfoNCE:
    """:func:`infonce_forward` in row chunks (B = 4096 × K = 65536 doubles would be 2 GB at once)."""
    parts = [infonce_forward(q[i : i + chunk], k[i : i + chunk], n, scale) for i in range(0, q.shape[0], chunk)]
    return InfoNCE(*(torch.cat([p[j] for p in parts]) for j in range(len(InfoNCE._fields))))


def assert_infonce_forward(outputs, q, k, n, scale, tol: float) -> None:
    """A contract forward's (loss, lse, delta, rank) against float64: shapes, dtypes, finite; lse and
    out = k + delta within ``tol`` in norm and 30·tol per row (a row never written cannot hide in a norm), the loss (the
    backend's own lse − scale·q·k, never negative) within 30·tol of the logit scale, rank exact up to
    negatives within 1e-4 of a tie."""
    loss, lse, delta, rank = outputs
    B, d = q.shape
    assert loss.shape == (B,) and loss.dtype == torch.float32
    assert lse.shape == (B,) and lse.dtype == torch.float32
    assert delta.shape == (B, d) and delta.dtype == torch.float32
    assert rank.shape == (B,) and rank.dtype == torch.int64
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(delta).all()
    out = delta.double() + k.double()  # O = k + delta
    ref = infonce_forward(q, k, n, scale)
    assert rel(lse, ref.lse) < tol, rel(lse, ref.lse)
    assert rel(out, ref.out) < tol, rel(out, ref.out)
    row_err = (out.double() - ref.out).norm(dim=1) / ref.out.norm(dim=1).clamp_min(1e-30)
    assert row_err.max().item() < 30 * tol, row_err.max().item()
    assert ((lse.double() - ref.lse).abs() / ref.lse.abs().clamp_min(1.0)).max().item() < 30 * tol
    assert ((loss.double() - ref.loss).abs() / ref.lse.abs().clamp_min(1.0)).max().item() < 30 * tol
    assert (loss >= 0).all()
    check_rank(rank, ref.pos, ref.neg, eps=1e-4)


def infonce_grads(q, k, n, scale, grad=None, *, negatives: bool = True):
    """(dq, dk, dn) of Σ_i grad_i·loss_i in float64 by autograd (grad None: all ones, i.e. sum(loss));
    dn is None with ``negatives=False`` (saves the (K, d) product)."""
    q, k = (t.detach().double().requires_grad_(True) for t in (q, k))
    n = n.detach().double().requires_grad_(negatives)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], 1) * scale
    loss = torch.logsumexp(logits, 1) - logits[:, 0]
    weights = torch.ones_like(loss) if grad is None else grad.detach().double().to(loss.device)
    (loss * weights).sum().backward()
    return q.grad, k.grad, n.grad


def infonce_backward(grad, q, k, loss, delta, scale):
    """(dq, dk) of the contract from a saved per-row loss (B,) and delta = O - k (B, d), in float64:
    dq = g·delta, dk = g·(p0 - 1)·q with p0 = exp(-loss) the positive's probability."""
    g = grad.double()[:, None] * scale
    return g * delta.double(), g * torch.expm1(-loss.double())[:, None] * q.double()


def infonce_backward_negatives(grad, q, n, lse, scale):
    """dn (K, d) of the contract from a saved lse (B,), in float64."""
    p = torch.exp((q.double() @ n.double().T) * scale - lse.double()[:, None])
    return scale * (grad.double()[:, None] * p).T @ q.double()


def infonce_error_scales(q, k, n, temperature, ulps: float = 4.0) -> dict[str, float]:
    """atol of an fp32 implementation for loss, lse, dq, dk, dn (norms) and elementwise, from the logit
    magnitude bound S_i = |q_i|·max|x|/T: no fp32 logit can be closer than a few ulps of S_i."""
    qn = q.double().norm(dim=1)
    xn = k.double().norm(dim=1)
    if n.shape[0]:
        xn = torch.maximum(xn, n.double().norm(dim=1).max())
    s = qn * xn / temperature
    return {
        "loss": ulps * EPS32 * s.norm().item(),
        "lse": ulps * EPS32 * s.norm().item(),
        "dq": ulps * EPS32 * (s * xn / temperature).norm().item(),
        "dk": ulps * EPS32 * (s * qn / temperature).norm().item(),
        "dn": ulps * EPS32 * (s * qn / temperature).norm().item(),
        "dn_elem": ulps * EPS32 * (s * qn / temperature).max().item(),
        "elem": ulps * EPS32 * (s * torch.maximum(xn, qn) / temperature).max().item(),
    }


def hadamard(n: int) -> torch.Tensor:
    """The n × n Sylvester Hadamard matrix (entries ±1, orthogonal rows), n a power of two, float64."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == n, f"{n} is not a power of two"
    return h


# ------------------------------------------------------------------------------------------------
# momentum
# ------------------------------------------------------------------------------------------------


def lerp(t: torch.Tensor, s: torch.Tensor, m: float) -> torch.Tensor:
    """The default update t + (1 − m)·(s − t) in float64, rounded once to t's dtype."""
    t64, s64 = t.double(), s.double()
    return (t64 + (1.0 - m) * (s64 - t64)).to(t.dtype)


def ema64(t: torch.Tensor, s: torch.Tensor, m: float) -> torch.Tensor:
    """The exact update value t·m + s·(1 − m) in float64 (not rounded)."""
    return t.double() * m + s.double() * (1.0 - m)


def official_momentum(t: torch.Tensor, s: torch.Tensor, m: float) -> torch.Tensor:
    """The official two-rounding update ``t·m + s·(1 − m)`` in the storage dtype (what ``exact=True``
    must reproduce bit for bit)."""
    return t * m + s * (1.0 - m)


# ------------------------------------------------------------------------------------------------
# the ring-buffer queue
# ------------------------------------------------------------------------------------------------


def normalize64(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float64, x / max(|x|, 1e-12) (F.normalize's rule)."""
    return F.normalize(x.double(), dim=1, eps=1e-12)


class RingModel:
    """The queue contract in float64: row (ptr + i) mod K gets key i, ptr ← (ptr + B) mod K,
    count ← min(count + B, K). ``rows`` (K, d) starts as given (the queue's contents) or NaN."""

    def __init__(self, size: int, dim: int, rows: torch.Tensor | None = None, ptr: int = 0, count: int = 0):
        self.size, self.dim = size, dim
        self.rows = torch.full((size, dim), float("nan"), dtype=F64) if rows is None else rows.double().cpu().clone()
        self.ptr, self.count = int(ptr), int(count)

    def enqueue(self, keys: torch.Tensor, normalize: bool = False) -> None:
        keys = normalize64(keys) if normalize else keys.double()
        batch = keys.shape[0]
        self.rows[(self.ptr + torch.arange(batch)) % self.size] = keys.cpu()
        self.ptr = (self.ptr + batch) % self.size
        self.count = min(self.count + batch, self.size)

    def negatives(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The filled rows (count, d) in ``dtype`` (what the queue's negatives() must equal)."""
        filled = self.rows[: self.count]
        assert not torch.isnan(filled).any(), "the model's filled part holds an unwritten row"
        return filled.to(dtype)

    def buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (K, d) buffer rounded to ``dtype``."""
        return self.rows.to(dtype)
