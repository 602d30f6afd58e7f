"""The "torch" backend's internals (moco_fast/torch_backend): its two paths per op.

Its public-op correctness is in the by-op files (tests/test_info_nce.py, test_momentum.py, test_queue.py)
with the other backends; here are the paths a caller cannot choose: the InfoNCE forward without the rank
(PyTorch's fused CPU attention kernel behind a guard, and the blockwise fallback) and the enqueue's host
and device write paths (both run on CPU tensors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import RingModel, infonce_forward

# ------------------------------------------------------------------------------------------------
# the torch backend without stats runs PyTorch's fused CPU attention kernel behind a guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,K,d", [(1, 1, 16), (7, 1000, 96), (37, 4099, 128)])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_torch_forward_without_rank_fused_and_fallback_match_float64(monkeypatch, B, K, d, fused):
    from moco_fast.torch_backend import infonce as chunked

    monkeypatch.setenv("MOCO_FAST_CPU_FUSED_ATTENTION", fused)
    calls = []
    real = chunked._FUSED_ATTENTION_OP
    if real is not None:
        monkeypatch.setattr(chunked, "_FUSED_ATTENTION_OP", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, n = (F.normalize(torch.randn(r, d), dim=1) for r in (B, B, K))
    scale = 1 / 0.07
    _, lse, delta, rank = chunked.infonce_forward(q, k, n, scale, need_rank=False)
    out = delta.double() + k.double()  # O = k + delta
    assert len(calls) == (1 if fused == "1" and real is not None else 0)
    assert torch.equal(rank, torch.full((B,), -1, dtype=torch.int64))
    ref = infonce_forward(q, k, n, scale)
    assert ((lse.double() - ref.lse).norm() / ref.lse.norm()).item() < 1e-6
    assert ((out.double() - ref.out).norm() / ref.out.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------------
# the torch backend's two write paths (host pointer on CPU, device pointer elsewhere), both on CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["_enqueue_host_", "_enqueue_device_"])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_enqueue_paths_match_ring_model_and_reject_nan(path, normalize):
    from moco_fast.torch_backend import enqueue as chunked

    write = getattr(chunked, path)
    size, dim = 10, 6
    queue = torch.full((size, dim), float("nan"), dtype=torch.bfloat16)
    ptr, count = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    model = RingModel(size, dim)
    for batch in (3, 7, 1, 10, 4, 9, 2):
        keys = torch.randn(batch, dim) * 3
        assert bool(write(queue, ptr, count, keys, normalize).item())
        written = F.normalize(keys, dim=1) if normalize else keys
        model.enqueue(written.to(torch.bfloat16).float())
        assert ptr.tolist() == [model.ptr] and count.tolist() == [model.count]
        assert torch.equal(queue[: model.count].float(), model.negatives())
    before = (queue.clone(), ptr.clone(), count.clone())
    bad = torch.randn(4, dim)
    bad[2, 1] = float("inf")
    assert not bool(write(queue, ptr, count, bad, normalize).item())
    assert all(torch.equal(a, b) for a, b in zip(before, (queue, ptr, count)))
