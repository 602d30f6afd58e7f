"""Extreme settings on the CPU: half-precision queues at T = 0.01 (logits up to ±100), K up to 2^20 keys,
d up to 1024 — finite and within the documented tolerance against float64 math.

exp(100) overflows nothing in float64 but is 2.7e43 in fp32 (finite) and inf in fp16; the single pass
subtracts the running max, so no term ever exceeds 1. The reference values are float64 math on the very
same (rounded) inputs, so the only error measured is the op's own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moco_fast
from moco_fast import backends


def unit_rows(n, d, dtype, gen):
    return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)


def float64_info_nce(q, k, n, temperature):
    """Per-row loss and dq in float64 from the (already rounded) inputs."""
    q64 = q.double().detach().requires_grad_(True)
    logits = torch.cat([(q64 * k.double()).sum(1, keepdim=True), q64 @ n.double().T], dim=1) / temperature
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    (dq,) = torch.autograd.grad(loss.sum(), q64)
    return loss.detach(), dq


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


CASES = [
    # (B, K, d, q dtype, queue dtype, temperature, relative tolerance of loss and dq)
    (16, 4096, 128, torch.float32, torch.bfloat16, 0.01, 1e-5),
    (16, 4096, 128, torch.float32, torch.float16, 0.01, 1e-5),
    (16, 4096, 128, torch.bfloat16, torch.bfloat16, 0.01, 1e-5),
    (4, 1 << 20, 16, torch.float32, torch.bfloat16, 0.05, 1e-5),
    (8, 2048, 1024, torch.float32, torch.float32, 0.01, 1e-5),
    (8, 2048, 1024, torch.float16, torch.float16, 0.01, 1e-5),
]


@pytest.mark.parametrize("B, K, d, q_dtype, n_dtype, temperature, tol", CASES)
def test_torch_backend_at_extreme_settings(B, K, d, q_dtype, n_dtype, temperature, tol):
    gen = torch.Generator().manual_seed(B + K + d)
    n = unit_rows(K, d, n_dtype, gen)
    # Queries close to a few keys: the largest logits reach ~1/T = 100.
    q = F.normalize(n[:B].float() + 0.05 * torch.randn(B, d, generator=gen), dim=1).to(q_dtype)
    k = unit_rows(B, d, q_dtype, gen)
    ref_loss, ref_dq = float64_info_nce(q, k, n, temperature)
    assert float(ref_loss.max()) > 10.0  # the positive is far from the top: the hard regime
    qq = q.clone().requires_grad_(True)
    loss = moco_fast.info_nce(qq, k, n, temperature, reduction="none", backend="torch")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(qq.grad).all()
    assert rel(loss, ref_loss) < tol
    # dq is rounded to q's dtype (bf16/fp16 keep 8/11 bits): the tolerance is that rounding
    dq_tol = {torch.float32: tol, torch.bfloat16: 8e-3, torch.float16: 1e-3}[q_dtype]
    assert rel(qq.grad, ref_dq) < dq_tol


@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16])
def test_half_queue_of_a_million_keys_at_t_001(queue_dtype):
    """MoCoHead's path (normalize, info_nce with stats) over a 2^20-key half queue at T = 0.01."""
    gen = torch.Generator().manual_seed(7)
    head = moco_fast.MoCoHead(16, 1 << 20, 0.01, queue_dtype=queue_dtype, queue_init="random", backend="torch")
    q = torch.randn(4, 16, generator=gen, requires_grad=True)
    k = torch.randn(4, 16, generator=gen)
    queue_before = head.queue.negatives().clone()
    loss, stats = head(q, k, return_stats=True)
    loss.backward()
    ref, _ = float64_info_nce(F.normalize(q.detach(), dim=1), F.normalize(k, dim=1), queue_before, 0.01)
    assert torch.isfinite(q.grad).all() and torch.isfinite(stats.lse).all()
    assert abs(float(loss) - float(ref.mean())) < 1e-5 * float(ref.mean())
    assert 0 <= int(stats.rank.max()) <= (1 << 20)


@pytest.mark.skipif(not backends.is_available("triton"), reason="triton not importable")
@pytest.mark.parametrize("n_dtype", [torch.bfloat16, torch.float16])
def test_triton_interpreter_half_queue_at_t_001(n_dtype):
    gen = torch.Generator().manual_seed(3)
    n = unit_rows(300, 96, n_dtype, gen)
    q = F.normalize(n[:5].float() + 0.05 * torch.randn(5, 96, generator=gen), dim=1)
    k = unit_rows(5, 96, torch.float32, gen)
    ref_loss, ref_dq = float64_info_nce(q, k, n, 0.01)
    qq = q.clone().requires_grad_(True)
    loss = moco_fast.info_nce(qq, k, n, 0.01, reduction="none", backend="triton")
    loss.sum().backward()
    assert rel(loss, ref_loss) < 1e-5 and rel(qq.grad, ref_dq) < 1e-5
