"""SwAV's Sinkhorn and DINO's center under torch.distributed: 2 gloo processes on loopback equal one process
on the global batch, with one collective per Sinkhorn iteration.

Each rank takes its half of a global batch drawn from a fixed seed (the parent redraws it) and saves what
it computed; the parent compares with the single-process result on the whole batch.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import init_gloo, run_ranks

WORLD = 2
B, P, D = 6, 40, 8  # per-rank batch, prototypes, bottleneck
TIMEOUT_S = 60


def global_batch():
    g = torch.Generator().manual_seed(7)
    scores = (
        F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1)
        @ F.normalize(torch.randn(P, D, generator=g), dim=1).T
    )
    teacher = [torch.randn(WORLD * B, P, generator=g) for _ in range(2)]
    student = [torch.randn(WORLD * B, P, generator=g) for _ in range(3)]
    h_t = [F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1) for _ in range(2)]
    h_s = [F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1) for _ in range(3)]
    w = F.normalize(torch.randn(P, D, generator=g), dim=1)
    return scores, teacher, student, h_t, h_s, w


def _part(x, rank):
    return x[rank * B : (rank + 1) * B]


def _compute(rank: int | None):
    """What each rank computes on its part (rank None: one process on the global batch)."""
    from moco_fast import DINOLoss, SwaVLoss, sinkhorn

    scores, teacher, student, h_t, h_s, w = global_batch()
    part = (lambda x: x) if rank is None else (lambda x: _part(x, rank))
    out = {}
    for eps in (0.05, 0.01):
        out[f"codes_{eps}"] = sinkhorn(part(scores), 3, eps, gather_distributed=True)
    out["codes_0"] = sinkhorn(part(scores), 0, 0.05, gather_distributed=True)
    swav = SwaVLoss(sinkhorn_gather_distributed=True)
    out["swav_codes_loss"] = swav([part(scores), part(scores.flip(0))], [])
    plain, fused = DINOLoss(P), DINOLoss(P)
    for _ in range(2):
        plain([part(t) for t in teacher], [part(s) for s in student])
        fused.forward_fused([part(h) for h in h_t], [part(h) for h in h_s], w)
    out["center_plain"], out["center_fused"] = plain.center.clone(), fused.center.clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    result: dict = {"rank": rank}
    try:
        init_gloo(rank, WORLD, port, TIMEOUT_S // 2)
        import moco_fast.swav as swav_module

        calls = {"all_gather": 0, "all_reduce": 0}
        real_gather, real_reduce = dist.all_gather, dist.all_reduce

        def counting_gather(*args, **kwargs):
            calls["all_gather"] += 1
            return real_gather(*args, **kwargs)

        def counting_reduce(*args, **kwargs):
            calls["all_reduce"] += 1
            return real_reduce(*args, **kwargs)

        swav_module.dist.all_gather, swav_module.dist.all_reduce = counting_gather, counting_reduce
        scores = global_batch()[0]
        swav_module.sinkhorn(_part(scores, rank), 5, 0.05, gather_distributed=True)
        result["collectives_for_5_iterations"] = dict(calls)
        swav_module.dist.all_gather, swav_module.dist.all_reduce = real_gather, real_reduce
        result.update(_compute(rank))
        dist.barrier()
        dist.destroy_process_group()
        result["ok"] = True
    except Exception:  # noqa: BLE001 - report everything to the parent
        result["ok"] = False
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("family_ddp"), TIMEOUT_S)


def test_sinkhorn_two_ranks_equal_one_process(results):
    single = _compute(None)
    for key in ("codes_0.05", "codes_0.01", "codes_0"):
        for r in results:
            expected = _part(single[key], r["rank"])
            assert torch.allclose(r[key], expected, rtol=1e-5, atol=1e-7), (key, r["rank"])
            assert torch.isfinite(r[key]).all()


def test_sinkhorn_one_collective_per_iteration(results):
    for r in results:
        assert r["collectives_for_5_iterations"] == {"all_gather": 5, "all_reduce": 0}


def test_swav_loss_uses_the_global_codes(results):
    from moco_fast import SwaVLoss
    from moco_fast.swav import sinkhorn

    scores = global_batch()[0]
    # each rank's loss is its local mean of the cross entropies against the global codes
    codes = [sinkhorn(s, 3, 0.05) for s in (scores, scores.flip(0))]
    loss = SwaVLoss()
    expected = [
        0.5
        * (
            loss.subloss(_part(scores.flip(0), r), _part(codes[0], r))
            + loss.subloss(_part(scores, r), _part(codes[1], r))
        )
        for r in range(WORLD)
    ]
    for r in results:
        assert torch.allclose(r["swav_codes_loss"], expected[r["rank"]], rtol=1e-5)


def test_dino_center_two_ranks_equal_one_process(results):
    single = _compute(None)
    for key in ("center_plain", "center_fused"):
        assert torch.allclose(results[0][key], results[1][key], rtol=0, atol=0), key  # the same on every rank
        assert torch.allclose(results[0][key], single[key], rtol=1e-5, atol=1e-7), key
    assert single["center_plain"].abs().max() > 1e-3  # the updates did move it
