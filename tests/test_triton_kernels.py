"""Triton kernels (moco_fast.kernels) against float64 torch math.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is
imported) on CPU tensors with small sizes; the tests named *_gpu_* run the full sizes on CUDA.
The oracle is written inline in float64 so that it does not depend on any other backend.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# CI sets MOCO_FAST_EXPECT_TRITON=1: there a missing / unusable Triton backend is a failure, not a skip.
EXPECT_TRITON = os.environ.get("MOCO_FAST_EXPECT_TRITON", "0") not in ("", "0")


def _unavailable(reason: str):
    if EXPECT_TRITON:
        pytest.fail(f"MOCO_FAST_EXPECT_TRITON=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import triton  # noqa: F401
except ModuleNotFoundError:
    _unavailable("triton is not installed")
import moco_fast.kernels as KN  # noqa: E402
from moco_fast.kernels import heuristics as H  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not KN.AVAILABLE:
    _unavailable(f"triton backend unavailable: {KN.IMPORT_ERROR!r}")
if KN.INTERPRETED:
    DEV = "cpu"
elif HAS_CUDA:
    DEV = "cuda"
else:
    _unavailable("no CUDA and TRITON_INTERPRET is not set")

needs_gpu = pytest.mark.skipif(not HAS_CUDA or KN.INTERPRETED, reason="needs a CUDA GPU (not the interpreter)")
TEMP = 0.07


@pytest.fixture(autouse=True)
def _highest_precision():
    """IEEE fp32 dots unless a test asks otherwise; restore the global setting afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------------------------------------
# float64 oracle
# ---------------------------------------------------------------------------------------------


def oracle_forward(q, k, n, scale):
    """(lse, out, pos_logit, neg_logits) in float64; logits unscaled."""
    q, k, n = q.double(), k.double(), n.double()
    pos = (q * k).sum(1)
    neg = q @ n.T
    logits = torch.cat([pos[:, None], neg], 1) * scale
    lse = torch.logsumexp(logits, 1)
    p = torch.softmax(logits, 1)
    out = p[:, :1] * k + p[:, 1:] @ n
    return lse, out, pos, neg


def oracle_grads(q, k, n, scale, grad):
    """(dq, dk, dn) of sum_i grad_i * loss_i in float64."""
    q, k, n = (t.detach().double().requires_grad_(True) for t in (q, k, n))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], 1) * scale
    loss = torch.logsumexp(logits, 1) - logits[:, 0]
    (loss * grad.double()).sum().backward()
    return q.grad, k.grad, n.grad


def rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_rank(rank, pos, neg, eps=1e-4):
    """rank must count negatives beating the positive, up to logits within eps of a tie."""
    lo = (neg > pos[:, None] + eps).sum(1)
    hi = (neg > pos[:, None] - eps).sum(1)
    rank = rank.cpu()
    assert rank.dtype == torch.int64
    bad = ((rank < lo.cpu()) | (rank > hi.cpu())).nonzero().flatten().tolist()
    assert not bad, f"rank wrong at rows {bad[:5]}: got {rank[bad[:5]].tolist()}, exact {lo[bad[:5]].tolist()}"


def make(B, K, d, dq=torch.float32, dk=None, dn=None, *, normalize=True, device=DEV, seed=0):
    # Derived from torch's global RNG (seeded per test by conftest; MOCO_FAST_RANDOM_SEED varies it).
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())) + seed * 1000 + B * 7 + K * 3 + d)
    dk = dk or dq
    dn = dn or dk

    def rnd(rows, dt):
        x = torch.randn(rows, d, generator=g, dtype=torch.float32)
        if normalize:
            x = F.normalize(x, dim=1)
        return x.to(dt).to(device)

    return rnd(B, dq), rnd(B, dk), rnd(K, dn)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def tol_for(*dts):
    return max(TOL[t] for t in dts)


def run_forward_check(q, k, n, scale, tol, **kw):
    loss, lse, delta, rank = KN.infonce_forward(q, k, n, scale, **kw)
    B, d = q.shape
    assert loss.shape == (B,) and loss.dtype == torch.float32
    assert lse.shape == (B,) and lse.dtype == torch.float32
    assert delta.shape == (B, d) and delta.dtype == torch.float32
    assert rank.shape == (B,) and rank.dtype == torch.int64
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(delta).all()
    out = delta.double() + k.double()  # O = k + delta
    r_lse, r_out, pos, neg = oracle_forward(q, k, n, scale)
    assert rel(lse, r_lse) < tol, rel(lse, r_lse)
    assert rel(out, r_out) < tol, rel(out, r_out)
    # Elementwise too: a row the kernel never wrote cannot hide inside a norm.
    row_err = (out.double() - r_out).norm(dim=1) / r_out.norm(dim=1).clamp_min(1e-30)
    assert row_err.max().item() < 30 * tol, row_err.max().item()
    assert ((lse.double() - r_lse).abs() / r_lse.abs().clamp_min(1.0)).max().item() < 30 * tol
    # The per-row loss comes from the kernels: lse - scale * q.k, never negative.
    r_loss = r_lse - pos * scale
    assert ((loss.double() - r_loss).abs() / r_lse.abs().clamp_min(1.0)).max().item() < 30 * tol
    assert (loss >= 0).all()
    check_rank(rank, pos, neg)
    return lse, delta, rank


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

# A representative subset of B x K x d x dtypes x splits (the interpreter is slow).
FWD_CASES = [
    # B, K, d, q dtype, k dtype, n dtype, num_splits
    (1, 1, 16, torch.float32, None, None, None),
    (1, 1031, 128, torch.float32, None, None, 3),
    (7, 1000, 96, torch.float32, None, None, None),
    (7, 63, 16, torch.float32, None, None, 2),
    (37, 1031, 128, torch.float32, None, None, 5),
    (37, 1000, 96, torch.bfloat16, None, None, 4),
    (130, 63, 128, torch.bfloat16, None, None, None),
    (130, 1031, 16, torch.float16, None, None, 2),
    (37, 1000, 128, torch.float32, torch.float32, torch.bfloat16, 3),  # fp32 q, bf16 queue
    (7, 1031, 96, torch.bfloat16, torch.bfloat16, torch.float32, None),
    (37, 63, 128, torch.float16, torch.bfloat16, torch.bfloat16, None),  # bf16 x fp16 -> fp32
    (130, 1000, 128, torch.float32, torch.bfloat16, torch.float16, 7),
    (7, 300, 256, torch.float32, None, None, 2),
    (5, 1031, 256, torch.bfloat16, None, None, None),
]


@pytest.mark.parametrize("B,K,d,dq,dk,dn,splits", FWD_CASES)
def test_forward_matches_float64(B, K, d, dq, dk, dn, splits):
    q, k, n = make(B, K, d, dq, dk, dn)
    run_forward_check(q, k, n, 1 / TEMP, tol_for(q.dtype, k.dtype, n.dtype), num_splits=splits)


@pytest.mark.parametrize(
    "splits,fuse", [(1, True), (1, False), (2, None), (3, None), (8, None), (64, None), (1000, None)]
)
def test_forward_split_counts_agree(splits, fuse):
    """Small tiles force many splits (and the combine kernel) even in the interpreter; fuse=False
    runs a single split through the combine kernel, as the GPU does for the unfused configs."""
    B, K, d = 37, 1000, 96
    q, k, n = make(B, K, d, seed=3)
    cfg = H.TileConfig(16, 16, 4, 1)
    lse, delta, rank = run_forward_check(q, k, n, 1 / TEMP, 1e-5, num_splits=splits, config=cfg, fuse=fuse)
    _, lse1, delta1, rank1 = KN.infonce_forward(q, k, n, 1 / TEMP, num_splits=1, config=cfg)
    assert torch.equal(rank, rank1)
    assert (lse - lse1).abs().max().item() < 1e-5
    assert (delta - delta1).abs().max().item() < 1e-5


@pytest.mark.parametrize("B,K,d,splits", [(37, 1000, 96, 3), (7, 63, 16, None), (5, 300, 256, 2)])
def test_forward_transposed_second_copy(monkeypatch, B, K, d, splits):
    """TRANS_COPY (the sm_90 tf32 path: the tile loaded a second time as its transpose for p @ n),
    forced on in the interpreter: ragged K, padded d, split and fused."""
    monkeypatch.setattr(H, "trans_copy", lambda *args: True)
    H.fwd_plan.cache_clear()
    try:
        q, k, n = make(B, K, d, seed=12)
        plan = H.fwd_plan(B, K, d, "float32", "float32", "ieee", (9, 0), 1, True, splits)
        assert plan.trans_copy
        run_forward_check(q, k, n, 1 / TEMP, 1e-5, num_splits=splits)
    finally:
        H.fwd_plan.cache_clear()


@pytest.mark.parametrize("B,K,d", [(37, 1000, 96), (5, 1100, 16)])
def test_forward_with_a_132_sm_plan(monkeypatch, B, K, d):
    """The split counts and the small combine row blocks (2 rows) an H100/H200 would get."""
    from moco_fast.kernels import runtime as R

    monkeypatch.setattr(R, "device_info", lambda device: (132, (9, 0)))
    q, k, n = make(B, K, d, seed=6)
    plan = H.fwd_plan(B, K, d, "float32", "float32", "ieee", (9, 0), 132, True)
    assert plan.splits > 1 and plan.combine_block_m == 2
    run_forward_check(q, k, n, 1 / TEMP, 1e-5)


@pytest.mark.parametrize("B,d,fuse", [(1, 16, None), (7, 96, False), (37, 128, None), (5, 16, True)])
def test_forward_k0_is_positive_only(B, d, fuse):
    """K = 0: only the positive; loss exactly 0 (fused and split+combine paths), lse = scale*q.k."""
    q, k, n = make(B, 0, d)
    loss, lse, delta, rank = KN.infonce_forward(q, k, n, 1 / TEMP, fuse=fuse)
    assert torch.equal(loss, torch.zeros_like(loss))
    pos = (q.double() * k.double()).sum(1) / TEMP
    assert (lse.double() - pos).abs().max().item() < 1e-5
    pos32 = (q.float() * k.float()).sum(1) * torch.tensor(1 / TEMP, dtype=torch.float32)
    assert (lse - pos32).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * pos32.abs().max().item()
    assert torch.equal(delta, torch.zeros_like(delta))  # O = k exactly
    assert (rank == 0).all()


@pytest.mark.parametrize("need_rank", [True, False])
def test_forward_need_rank_accepted(need_rank):
    q, k, n = make(7, 63, 16)
    loss, lse, delta, rank = KN.infonce_forward(q, k, n, 1 / TEMP, need_rank)
    assert rank.shape == (7,) and rank.dtype == torch.int64


def test_forward_unnormalized_large_logits():
    """Raw (unnormalized) inputs: logits in the hundreds must not overflow exp2."""
    q, k, n = make(7, 1031, 96, normalize=False, seed=5)
    run_forward_check(q, k, n, 3.0, 1e-5, num_splits=3)


def test_forward_rank_with_planted_winners():
    """Plant negatives that beat the positive by a clear margin: rank must count them exactly."""
    B, K, d = 7, 200, 16
    q, k, n = make(B, K, d, seed=11)
    n = n.clone()
    for i in range(B):  # row i gets i planted negatives = q_i itself (logit 1 > q_i.k_i)
        n[17 * i : 17 * i + i] = q[i]
    _, _, _, rank = KN.infonce_forward(q, k, n, 1 / TEMP, num_splits=3, config=H.TileConfig(16, 16, 4, 1))
    _, _, pos, neg = oracle_forward(q, k, n, 1 / TEMP)
    exact = (neg > pos[:, None]).sum(1)
    assert torch.equal(rank.cpu(), exact.cpu())
    assert all(rank[i].item() >= i for i in range(B))


def test_forward_nan_propagates():
    q, k, n = make(7, 63, 16)
    n = n.clone()
    n[5, 3] = float("nan")
    _, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
    assert torch.isnan(lse).all() and torch.isnan(delta).any()


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

BWD_CASES = [
    (1, 63, 16, torch.float32, None, None),
    (7, 1000, 96, torch.float32, None, None),
    (37, 1031, 128, torch.bfloat16, None, None),
    (130, 63, 128, torch.float16, None, None),
    (37, 1000, 128, torch.float32, torch.float32, torch.bfloat16),
    (7, 1, 96, torch.bfloat16, torch.float32, torch.float16),
    (5, 300, 256, torch.float32, None, None),
]


@pytest.mark.parametrize("B,K,d,dq,dk,dn", BWD_CASES)
def test_backward_matches_float64(B, K, d, dq, dk, dn):
    q, k, n = make(B, K, d, dq, dk, dn, seed=2)
    grad = (torch.rand(B, generator=torch.Generator().manual_seed(B)) + 0.5).div(B).to(DEV)
    loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
    gq, gk = KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    gn = KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    rq, rk, rn = oracle_grads(q, k, n, 1 / TEMP, grad)
    assert gq.dtype == q.dtype and gk.dtype == k.dtype and gn.dtype == n.dtype
    assert gq.shape == q.shape and gk.shape == k.shape and gn.shape == n.shape
    tol = tol_for(q.dtype, k.dtype, n.dtype)
    assert rel(gq, rq) < tol, rel(gq, rq)
    assert rel(gk, rk) < tol, rel(gk, rk)
    assert rel(gn, rn) < tol, rel(gn, rn)
    row_err = (gn.double() - rn).norm(dim=1) / rn.norm(dim=1).clamp_min(1e-30)
    assert row_err.max().item() < 30 * tol


def test_backward_expanded_grad_and_k0():
    """grad from a mean is an expanded (stride 0) tensor; K = 0 gives dq = 0 ... up to p0 = 1."""
    B, d = 7, 96
    q, k, n = make(B, 0, d)
    grad = torch.full((1,), 1.0 / B, device=DEV).expand(B)
    loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
    gq, gk = KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    assert gq.abs().max().item() < 1e-6 and gk.abs().max().item() < 1e-6
    assert KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP).shape == (0, d)


def test_backward_negatives_deterministic():
    q, k, n = make(37, 1000, 96, seed=4)
    grad = torch.ones(37, device=DEV)
    _, lse, _, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
    a = KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    b = KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# momentum
# ---------------------------------------------------------------------------------------------


def ema_ref(t, s, m):
    """The contract's lerp t + (1 - m)(s - t) in float64, rounded once to the storage dtype."""
    return (t.double() + (1.0 - m) * (s.double() - t.double())).to(t.dtype)


def close_1ulp(a, b):
    """Equal up to one rounding of the output dtype (the interpreter truncates fp32 -> bf16)."""
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[a.dtype]
    return torch.allclose(a.float(), b.float(), rtol=eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_momentum_multi_tensor(dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(3,), (17, 5), (64,), (70001,), (2, 3, 4), (1,), (H.MOMENTUM_CHUNK,), (0,)]
    ts = [torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes]
    ss = [torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes]
    want = [ema_ref(t, s, 0.99) for t, s in zip(ts, ss)]
    ss_before = [s.clone() for s in ss]
    KN.momentum_update_(ts, ss, 0.99)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)
    assert all(torch.equal(a, b) for a, b in zip(ss, ss_before)), "sources must not change"
    # Second call reuses the cached chunk table and must update again.
    want = [ema_ref(t, s, 0.5) for t, s in zip(ts, ss)]
    KN.momentum_update_(ts, ss, 0.5)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)


def test_momentum_unaligned_views():
    """Views starting 1 element into a buffer: not 16-byte aligned, takes the unvectorized path."""
    bt = torch.randn(10001, device=DEV)
    bs = torch.randn(10001, device=DEV)
    ts = [bt[1:5001], bt[5003:10001]]
    ss = [bs[1:5001].clone(), bs[5003:10001]]
    want = [ema_ref(t, s, 0.9) for t, s in zip(ts, ss)]
    untouched = (bt[0].item(), bt[5001].item(), bt[5002].item())
    KN.momentum_update_(ts, ss, 0.9)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)
    assert (bt[0].item(), bt[5001].item(), bt[5002].item()) == untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_flat_buffer(dtype):
    """One flat buffer, or views lying back to back in one: the single flat launch."""
    flat_t = torch.randn(123457).to(dtype).to(DEV)
    flat_s = torch.randn(123457).to(dtype).to(DEV)
    want = ema_ref(flat_t, flat_s, 0.999)
    KN.momentum_update_([flat_t], [flat_s], 0.999)
    assert close_1ulp(flat_t, want)
    sizes = [100, 2000, 3, 121354]
    ts, ss = list(flat_t.split(sizes)), list(flat_s.split(sizes))
    want = ema_ref(flat_t, flat_s, 0.7)
    KN.momentum_update_(ts, ss, 0.7)
    assert close_1ulp(flat_t, want)


@pytest.mark.parametrize("n", [1, 15, H.MOMENTUM_BLOCK - 1, H.MOMENTUM_BLOCK, 3 * H.MOMENTUM_BLOCK + 17])
def test_momentum_flat_tail(n):
    """The flat kernel's unmasked body and masked last block: sizes around the block, and the
    element just past the end untouched."""
    bt = torch.randn(n + 1, device=DEV)
    ts = bt[:n]
    ss = torch.randn(n, device=DEV)
    sentinel = bt[n].item()
    want = ema_ref(ts, ss, 0.9)
    KN.momentum_update_([ts], [ss], 0.9)
    assert close_1ulp(ts, want) and bt[n].item() == sentinel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [True, False])
def test_momentum_is_a_lerp(dtype, flat):
    """target == source stays bit-identical (a lerp moves by w*(s - t) = 0); the two-rounding
    t*m + s*(1-m) does not. Both kernels (flat and multi-tensor)."""
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(4099, generator=g) * 3).to(dtype).to(DEV)
    ts = [t] if flat else [t[:2000], t[2003:]]
    ss = [x.clone() for x in ts]
    before = [x.clone() for x in ts]
    KN.momentum_update_(ts, ss, 0.999)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


def test_momentum_table_cache_keeps_its_source():
    """The chunk table is cached per (addresses, sizes); the entry keeps the host copy it was built
    from (pinned on CUDA, copied with non_blocking=True), so a reused table is never re-uploaded."""
    from moco_fast.kernels import momentum as M

    ts = [torch.randn(n, device=DEV) for n in (5, 70001, 3)]
    ss = [torch.randn(n, device=DEV) for n in (5, 70001, 3)]
    M._TABLES.clear()
    table, aligned = M._chunk_table(ts, ss)
    (entry,) = M._TABLES.values()
    assert entry[0] is table and entry[2].device.type == "cpu"
    assert entry[2].shape == table.shape and torch.equal(entry[2], table.cpu())
    assert table[:, 2].tolist() == [5, H.MOMENTUM_CHUNK, 70001 - H.MOMENTUM_CHUNK, 3]
    again, _ = M._chunk_table(ts, ss)
    assert again is table and len(M._TABLES) == 1


@needs_gpu
def test_gpu_momentum_table_is_pinned():
    from moco_fast.kernels import momentum as M

    ts = [torch.randn(n, device="cuda") for n in (5, 70001)]
    ss = [torch.randn(n, device="cuda") for n in (5, 70001)]
    M._TABLES.clear()
    table, _ = M._chunk_table(ts, ss)
    (entry,) = M._TABLES.values()
    assert entry[2].is_pinned() and table.device == ts[0].device


def test_momentum_rejects_mismatch():
    with pytest.raises(ValueError):
        KN.momentum_update_([torch.zeros(3, device=DEV)], [torch.zeros(4, device=DEV)], 0.9)
    KN.momentum_update_([], [], 0.9)  # nothing to do


# ---------------------------------------------------------------------------------------------
# enqueue
# ---------------------------------------------------------------------------------------------


def ring_ref(queue, ptr, count, keys, normalize):
    K = queue.shape[0]
    B = keys.shape[0]
    q = queue.clone()
    x = keys.double()
    if normalize:
        x = F.normalize(x, dim=1, eps=1e-12)
    idx = (torch.arange(B) + ptr) % K
    q[idx.to(q.device)] = x.to(q.dtype)
    return q, (ptr + B) % K, min(count + B, K)


@pytest.mark.parametrize(
    "K,B,d,ptr0,count0,qdt,kdt,normalize",
    [
        (10, 3, 16, 0, 0, torch.float32, torch.float32, False),
        (10, 4, 16, 8, 8, torch.float32, torch.float32, True),  # wraps around
        (37, 37, 96, 5, 37, torch.bfloat16, torch.float32, True),  # B == K, full queue
        (1000, 130, 128, 950, 990, torch.float16, torch.bfloat16, False),
        (64, 7, 128, 63, 10, torch.float32, torch.float64, True),
    ],
)
def test_enqueue_matches_ring_buffer(K, B, d, ptr0, count0, qdt, kdt, normalize):
    g = torch.Generator().manual_seed(K + B)
    queue = torch.randn(K, d, generator=g).to(qdt).to(DEV)
    keys = (torch.randn(B, d, generator=g) * 3).to(kdt).to(DEV)
    ptr = torch.tensor([ptr0], dtype=torch.int64, device=DEV)
    count = torch.tensor([count0], dtype=torch.int64, device=DEV)
    want_q, want_p, want_c = ring_ref(queue.cpu(), ptr0, count0, keys.cpu(), normalize)
    ok = KN.enqueue_(queue, ptr, count, keys, normalize)
    assert ok.dtype == torch.bool and ok.shape == (1,) and ok.item() is True
    assert ptr.item() == want_p and count.item() == want_c
    assert close_1ulp(queue.cpu(), want_q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_enqueue_non_finite_writes_nothing(bad):
    K, B, d = 50, 20, 96
    queue = torch.randn(K, d, device=DEV)
    keys = torch.randn(B, d, device=DEV)
    keys[B - 1, d - 1] = bad  # the very last value: a partial write would already have happened
    ptr = torch.tensor([45], dtype=torch.int64, device=DEV)
    count = torch.tensor([45], dtype=torch.int64, device=DEV)
    before = queue.clone()
    ok = KN.enqueue_(queue, ptr, count, keys, True)
    assert ok.item() is False
    assert torch.equal(queue, before)
    assert ptr.item() == 45 and count.item() == 45
    keys[B - 1, d - 1] = 0.5  # fixed: now it goes in
    ok = KN.enqueue_(queue, ptr, count, keys, False)
    assert ok.item() is True and ptr.item() == (45 + B) % K and count.item() == K


def test_enqueue_rejects_bad_sizes():
    queue = torch.zeros(4, 16, device=DEV)
    ptr = torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError):
        KN.enqueue_(queue, ptr, ptr.clone(), torch.ones(5, 16, device=DEV), False)


# ---------------------------------------------------------------------------------------------
# through the public API (moco_fast.ops dispatching to this backend)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,K,d,dts",
    [(7, 1000, 96, (torch.float32,) * 3), (37, 63, 128, (torch.bfloat16,) * 3), (5, 0, 16, (torch.float32,) * 3)],
)
def test_public_info_nce_triton_backend(B, K, d, dts):
    moco_fast = pytest.importorskip("moco_fast")
    q, k, n = make(B, K, d, *dts, seed=7)
    q.requires_grad_(True)
    k.requires_grad_(True)
    n.requires_grad_(True)
    loss, stats = moco_fast.info_nce(q, k, n, TEMP, backend="triton", return_stats=True)
    loss.backward()
    r_lse, _, pos, neg = oracle_forward(q.detach(), k.detach(), n.detach(), 1 / TEMP)
    want = (r_lse - pos / TEMP).mean()
    tol = tol_for(*dts)
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    check_rank(stats.rank, pos, neg)
    grad = torch.full((B,), 1.0 / B, dtype=torch.float64)
    rq, rk, rn = oracle_grads(q, k, n, 1 / TEMP, grad)
    if K:
        assert rel(q.grad, rq) < tol and rel(k.grad, rk) < tol and rel(n.grad, rn) < tol
    else:  # only the positive: the exact gradient is 0
        assert q.grad.abs().max().item() < 1e-5 and k.grad.abs().max().item() < 1e-5


def test_public_momentum_and_queue_triton_backend():
    moco_fast = pytest.importorskip("moco_fast")
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(s, generator=g).to(DEV) for s in ((5, 3), (7,), (11, 2))]
    ss = [torch.randn(t.shape, generator=g).to(DEV) for t in ts]
    want = [ema_ref(t, s, 0.99) for t, s in zip(ts, ss)]
    moco_fast.momentum_update(ts, ss, 0.99, backend="triton")
    assert all(close_1ulp(t, w) for t, w in zip(ts, want))
    queue = moco_fast.KeyQueue(10, 16, gather_distributed=False, device=DEV, backend="triton")
    keys = torch.randn(4, 16, generator=g).to(DEV)
    for step in range(3):  # 12 keys into 10 slots: wraps
        queue.enqueue(keys + step)
    assert int(queue.ptr) == 2 and int(queue.count) == 10
    assert torch.allclose(queue.keys[:2].cpu(), (keys[2:] + 2).cpu())
    bad = keys.clone()
    bad[1, 1] = float("nan")
    before = queue.keys.clone()
    with pytest.raises(ValueError):
        queue.enqueue(bad)
    assert torch.equal(queue.keys, before) and int(queue.ptr) == 2


# ---------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------


def test_import_without_triton_is_unavailable():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import moco_fast.kernels as k\n"
        "assert k.AVAILABLE is False, k.AVAILABLE\n"
        "try:\n    k.infonce_forward(None, None, None, 1.0)\nexcept RuntimeError as e:\n    print('ok', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_import_error_of_a_kernel_module_propagates():
    """Only a missing triton means "not available": a broken kernel module must raise, not turn
    into AVAILABLE = False (which would silently skip every Triton test)."""
    code = (
        "import sys, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'moco_fast.kernels.momentum':\n"
        "            raise RuntimeError('boom from a broken kernel module')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import moco_fast.kernels as k\n"
        "print('imported', k.AVAILABLE)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, f"import succeeded: {res.stdout}"
    assert "boom from a broken kernel module" in res.stderr, res.stderr[-2000:]


def test_heuristics_pick_sane_configs():
    assert H.d_pad(96) == 128 and H.d_pad(16) == 16 and H.d_pad(3) == 16 and H.d_pad(256) == 256
    # B=256 on 132 SMs: the row blocks are split so that ~a full wave of programs runs.
    s = H.num_splits(H.cdiv(256, 128), H.cdiv(65536, 64), 132)
    assert 32 <= s <= 132
    assert H.num_splits(1, 0, 132) == 1
    assert H.num_splits(10_000, 1024, 132) == 1
    for d in (16, 32, 64, 96, 128, 256):
        for qd, nd in (("bfloat16",) * 2, ("float16",) * 2, ("float32",) * 2, ("float32", "bfloat16")):
            dot = H.dot_dtype_name(qd, nd)
            for prec in ("ieee", "tf32"):
                for cc in ((9, 0), (8, 0)):
                    cfg = H.fwd_config(H.d_pad(d), dot, cc, precision=H.dot_precision(dot, prec))
                    assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.ctas_per_sm >= 1
    assert H.dot_precision("bfloat16", "tf32") == "ieee" and H.dot_precision("float32", "tf32") == "tf32"


def test_forward_plan_covers_the_keys_and_is_cached():
    for B, K, d in ((1, 65536, 128), (256, 65536, 128), (4096, 65536, 96), (37, 1000, 16), (5, 0, 256)):
        for dot, nd, prec in (("bfloat16", "bfloat16", "ieee"), ("float32", "float32", "tf32")):
            plan = H.fwd_plan(B, K, d, nd, dot, prec, (9, 0), 132, False)
            assert plan.splits * plan.keys_per_split >= K and (plan.splits - 1) * plan.keys_per_split < max(K, 1)
            assert plan.keys_per_split % plan.config.block_n == 0
            assert plan.trans_copy == (dot == "float32" and prec == "tf32")
            if not plan.fused:  # the workspace parts start on 16-byte boundaries and do not overlap
                offs = [0, plan.m_off, plan.l_off, plan.r_off, plan.pos_off, plan.ws_size]
                assert all(o % 4 == 0 for o in offs) and offs == sorted(offs)
                assert plan.m_off >= plan.splits * B * d and plan.ws_size - plan.pos_off >= B
            assert H.fwd_plan(B, K, d, nd, dot, prec, (9, 0), 132, False) is plan  # memoized
    # the bf16 forward counts 2 programs per SM, so B=256 splits over 2 x 132 slots
    plan = H.fwd_plan(256, 65536, 128, "bfloat16", "bfloat16", "ieee", (9, 0), 132, False)
    assert plan.config.ctas_per_sm == 2 and plan.row_blocks * plan.splits <= 2 * 132


class _Launches:
    """Replaces every kernel object of moco_fast.kernels by a recorder (no launch at all)."""

    def __init__(self, monkeypatch, on_launch=None):
        from moco_fast.kernels import enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum

        self.calls = []
        for mod in (enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum):
            for name in dir(mod):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(mod, name, self._recorder(name, on_launch))

    def _recorder(self, name, on_launch):
        outer = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    outer.calls.append(name)
                    if on_launch is not None:
                        on_launch(name, args)

                return launch

        return Kernel()


def _call_every_launcher(device=DEV):
    q, k, n = make(7, 63, 16, device=device)
    loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP, num_splits=2, config=H.TileConfig(16, 16, 4, 1))
    grad = torch.ones(7, device=device)
    KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    ts = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    KN.momentum_update_(ts, [torch.ones_like(t) for t in ts], 0.9)  # two storages: the multi-tensor kernel
    KN.momentum_update_(ts[:1], [torch.ones(5, device=device)], 0.9)  # one tensor: the flat kernel
    queue = torch.zeros(10, 16, device=device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    KN.enqueue_(queue, ptr, ptr.clone(), torch.ones(2, 16, device=device), True)


def test_every_launch_runs_under_the_tensors_device_guard(monkeypatch):
    """Triton launches on the current CUDA device and stream: every launcher must enter the tensors'
    device around its launches (checked with a recording guard and recording kernels)."""
    from moco_fast.kernels import runtime as R

    inside: list = []
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    seen = []
    monkeypatch.setattr(R, "device_guard", guard)
    launches = _Launches(monkeypatch, on_launch=lambda name, args: seen.append((name, list(inside))))
    _call_every_launcher()
    kernels = {name for name, _ in seen}
    assert kernels == {
        "infonce_fwd_split_kernel",
        "infonce_combine_kernel",
        "infonce_bwd_qk_kernel",
        "infonce_bwd_negatives_kernel",
        "momentum_multi_kernel",
        "momentum_flat_kernel",
        "enqueue_kernel",
    }, launches.calls
    for name, stack in seen:
        assert stack == [torch.device(DEV)], f"{name} launched outside the device guard: {stack}"


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    """The guard makes the tensors' CUDA device current (torch.cuda.device), and is a no-op on CPU."""
    from moco_fast.kernels import runtime as R

    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with R.device_guard(torch.device("cuda", 1)):
        pass
    with R.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_launchers_on_the_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launchers must run on cuda:1 (else an illegal
    memory access) and give the same results as on cuda:0."""
    torch.cuda.set_device(0)
    q, k, n = make(37, 1000, 96, device="cuda:1")
    run_forward_check(q, k, n, 1 / TEMP, 1e-5)
    _call_every_launcher("cuda:1")
    torch.cuda.synchronize(1)


@pytest.mark.parametrize("new_api", ["tf32", "ieee"])
def test_new_fp32_precision_api_does_not_raise(new_api):
    """torch >= 2.9 raises from torch.get_float32_matmul_precision() once the new
    torch.backends.cuda.matmul.fp32_precision is set: forward and backward must still run
    (bf16 and fp32 inputs, both read the precision)."""
    try:
        torch.backends.cuda.matmul.fp32_precision = new_api
        for dt in (torch.float32, torch.bfloat16):
            q, k, n = make(7, 63, 16, dt, seed=8)
            loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
            grad = torch.ones(7, device=DEV)
            KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
            KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
            assert torch.isfinite(loss).all()
    finally:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")


def test_launchers_plan_once_per_shape(monkeypatch):
    """A repeated call does not rerun the split search (the plan is memoized per shape)."""
    from moco_fast.kernels import heuristics as HH

    _Launches(monkeypatch)
    q, k, n = make(37, 1000, 96)
    KN.infonce_forward(q, k, n, 1 / TEMP)
    calls = []
    real = HH.num_splits
    monkeypatch.setattr(HH, "num_splits", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    for _ in range(3):
        KN.infonce_forward(q, k, n, 1 / TEMP)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# GPU, full sizes
# ---------------------------------------------------------------------------------------------


def oracle_forward_chunked(q, k, n, scale, chunk=512):
    """float64 oracle on the GPU in row chunks (B=4096 x K=65536 doubles would be 2 GB at once)."""
    outs = [oracle_forward(q[i : i + chunk], k[i : i + chunk], n, scale) for i in range(0, q.shape[0], chunk)]
    return tuple(torch.cat([o[j] for o in outs]) for j in range(4))


@needs_gpu
@pytest.mark.parametrize("B", [256, 4096])
@pytest.mark.parametrize(
    "dts,precision",
    [
        ((torch.bfloat16,) * 3, "highest"),
        ((torch.float16,) * 3, "highest"),
        ((torch.float32,) * 3, "highest"),
        ((torch.float32,) * 3, "high"),
        ((torch.float32, torch.float32, torch.bfloat16), "high"),
    ],
)
def test_gpu_forward_backward_full_size(B, dts, precision):
    torch.set_float32_matmul_precision(precision)
    K, d = 65536, 128
    q, k, n = make(B, K, d, *dts, device="cuda", seed=B)
    tol = tol_for(*dts) if precision == "highest" or all(t != torch.float32 for t in dts) else 3e-3
    loss, lse, delta, rank = KN.infonce_forward(q, k, n, 1 / TEMP)
    out = delta.double() + k.double()  # O = k + delta
    r_lse, r_out, pos, neg = oracle_forward_chunked(q, k, n, 1 / TEMP)
    assert rel(lse, r_lse) < tol and rel(out, r_out) < tol, (rel(lse, r_lse), rel(out, r_out))
    check_rank(rank, pos, neg, eps=1e-3 if tol > 1e-5 else 1e-4)
    grad = torch.full((B,), 1.0 / B, device="cuda")
    gq, gk = KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    sub = slice(0, 256)  # float64 autograd on a row subset (grads of rows are independent)
    rq, rk, _ = oracle_grads(q[sub], k[sub], n, 1 / TEMP, grad[sub])
    assert rel(gq[sub], rq) < tol and rel(gk[sub], rk) < tol


@needs_gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_gpu_backward_negatives_full_size(dt):
    B, K, d = 256, 65536, 128
    q, k, n = make(B, K, d, dt, device="cuda", seed=9)
    grad = torch.full((B,), 1.0 / B, device="cuda")
    _, lse, _, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
    gn = KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    _, _, rn = oracle_grads(q, k, n, 1 / TEMP, grad)
    assert rel(gn, rn) < tol_for(dt)
    assert torch.equal(gn, KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP))


@needs_gpu
@pytest.mark.parametrize("splits", [1, 7, 64, 300])
def test_gpu_forward_forced_splits(splits):
    q, k, n = make(256, 65536, 128, torch.bfloat16, device="cuda", seed=splits)
    run_forward_check(q, k, n, 1 / TEMP, 1e-2, num_splits=splits)


@needs_gpu
@pytest.mark.parametrize("d", [16, 32, 64, 96, 256])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_gpu_forward_other_dims(d, dt):
    q, k, n = make(300, 5000, d, dt, device="cuda", seed=d)
    run_forward_check(q, k, n, 1 / TEMP, tol_for(dt))


@needs_gpu
def test_gpu_momentum_resnet50_sized():
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [2359296, 1048576, 262144, 65536, 4096, 2048, 512, 256, 64, 10] * 16
    ts = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    ss = [torch.randn(s, device="cuda", generator=g) for s in sizes]
    want = [ema_ref(t, s, 0.999) for t, s in zip(ts, ss)]
    KN.momentum_update_(ts, ss, 0.999)
    assert all(close_1ulp(t, w) for t, w in zip(ts, want))


@needs_gpu
def test_gpu_enqueue_no_host_sync_and_wraps():
    K, d = 65536, 128
    queue = torch.randn(K, d, device="cuda", dtype=torch.bfloat16)
    ptr = torch.tensor([K - 100], dtype=torch.int64, device="cuda")
    count = torch.tensor([K], dtype=torch.int64, device="cuda")
    keys = torch.randn(4096, d, device="cuda")
    want_q, want_p, want_c = ring_ref(queue, K - 100, K, keys, True)
    ok = KN.enqueue_(queue, ptr, count, keys, True)
    assert ok.item() is True and ptr.item() == want_p and count.item() == want_c
    assert close_1ulp(queue, want_q)
    keys[0, 0] = math.nan
    before = queue.clone()
    assert KN.enqueue_(queue, ptr, count, keys, True).item() is False
    assert torch.equal(queue, before) and ptr.item() == want_p
