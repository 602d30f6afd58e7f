"""DDP done right: 2 gloo ranks training a model under DistributedDataParallel produce the same loss
(the mean of the ranks' losses) and the same parameter gradients as 1 process on the global batch,
for nt_xent / NTXentLoss / cmc_loss (gathers WITH gradient back to each row's owner), mocov3_loss
(gathered keys without gradient) and MemoryBankHead (a bank all-gathered so every rank holds the same).

A negative control runs the same training step with a gather that carries no gradient (the bug of
lightly#1528 / vissl PR #123): its gradients must NOT match, so the equality test can fail.
Each rank writes its results under tmp_path; the parent computes the 1-process reference.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import init_gloo, run_ranks
from torch import nn

import moco_fast
from moco_fast.distributed import concat_all_gather

WORLD = 2
BATCH = 5  # per rank (odd on purpose)
DIM_IN, DIM_OUT = 12, 8
NUM_SAMPLES = 40
TIMEOUT_S = 90


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Linear(16, DIM_OUT))


def global_batch(views: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * BATCH, DIM_IN, generator=g) for _ in range(views)]


def global_indices() -> torch.Tensor:
    return torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(11))[: WORLD * BATCH]


def nt_xent_nograd_gather(z0, z1, temperature):
    """The bug: keys gathered without gradient (only the local rows' query role gets a gradient)."""
    z = torch.cat([z0, z1])
    keys = concat_all_gather(z)  # no grad
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = torch.arange(z.shape[0])
    target = rank * z.shape[0] + (local + z.shape[0] // 2) % z.shape[0]
    return moco_fast.contrastive_cross_entropy(z, keys, target, temperature, exclude=rank * z.shape[0] + local)


# Each case: (model, views of this process's batch, indices) -> loss. Built identically in both settings.
def case_nt_xent(model, views, idx, state):
    return moco_fast.nt_xent(model(views[0]), model(views[1]), 0.3, gather_distributed=True)


def case_ntxent_module(model, views, idx, state):
    return state.setdefault("loss", moco_fast.NTXentLoss(0.5, gather_distributed=True))(
        model(views[0]), model(views[1])
    )


def case_cmc(model, views, idx, state):
    return moco_fast.cmc_loss([F.normalize(model(v), dim=1) for v in views], 0.2, gather_distributed=True)


def case_mocov3(model, views, idx, state):
    k = state.setdefault("key_encoder", make_model())  # a frozen "momentum" copy
    with torch.no_grad():
        k1, k2 = k(views[0]), k(views[1])
    return moco_fast.mocov3_loss(model(views[0]), k2, 0.2) + moco_fast.mocov3_loss(model(views[1]), k1, 0.2)


def case_memory_bank(model, views, idx, state):
    if "head" not in state:
        torch.manual_seed(5)  # the same random bank on every rank and in the 1-process run
        state["head"] = moco_fast.MemoryBankHead(NUM_SAMPLES, DIM_OUT, temperature=0.1)
    return state["head"](model(views[0]), idx)


def case_nograd_gather(model, views, idx, state):
    z0, z1 = F.normalize(model(views[0]), dim=1), F.normalize(model(views[1]), dim=1)
    return nt_xent_nograd_gather(z0, z1, 0.3)


CASES = {
    "nt_xent": (case_nt_xent, 2),
    "ntxent_module": (case_ntxent_module, 2),
    "cmc": (case_cmc, 3),
    "mocov3": (case_mocov3, 2),
    "memory_bank": (case_memory_bank, 1),
    "nograd_gather": (case_nograd_gather, 2),
}
STEPS = 2  # two optimizer steps: the second sees the updated bank / weights


def train_steps(name, rank_slice, wrap=None):
    """Two SGD steps of case ``name`` on rows ``rank_slice`` of the global batch; returns (losses, grads, extra)."""
    fn, num_views = CASES[name]
    model = make_model()
    net = wrap(model) if wrap else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state: dict = {}
    losses, grads = [], []
    for step in range(STEPS):
        views = [v[rank_slice] + step for v in global_batch(num_views)]
        idx = global_indices()[rank_slice]
        opt.zero_grad()
        loss = fn(net, views, idx, state)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    extra = {"bank": state["head"].bank.bank.clone()} if "head" in state else {}
    return losses, grads, extra


def _worker(rank: int, port: int, out_dir: str) -> None:
    result: dict = {"rank": rank}
    try:
        init_gloo(rank, WORLD, port, TIMEOUT_S // 2)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        for name in CASES:
            result[name] = train_steps(name, mine, wrap=lambda m: nn.parallel.DistributedDataParallel(m))
        dist.barrier()
        dist.destroy_process_group()
        result["ok"] = True
    except Exception:  # noqa: BLE001 - report everything to the parent
        result["ok"] = False
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp_dicts"), TIMEOUT_S)


def _compare(results, name, steps=STEPS):
    single_losses, single_grads, single_extra = train_steps(name, slice(0, WORLD * BATCH))
    worst_loss = worst_grad = 0.0
    for step in range(steps):
        ddp_loss = sum(r[name][0][step] for r in results) / WORLD
        worst_loss = max(worst_loss, abs(ddp_loss.item() - single_losses[step].item()))
        for r in results:  # DDP leaves the same averaged gradient on every rank
            for g, ref in zip(r[name][1][step], single_grads[step]):
                worst_grad = max(worst_grad, ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item())
    return worst_loss, worst_grad, single_extra


@pytest.mark.parametrize("name", ["nt_xent", "ntxent_module", "cmc", "mocov3", "memory_bank"])
def test_two_ranks_equal_one_process_on_the_global_batch(results, name):
    loss_err, grad_err, single_extra = _compare(results, name)
    assert loss_err < 1e-6, f"{name}: mean rank loss differs from the 1-process loss by {loss_err:.2e}"
    assert grad_err < 1e-5, f"{name}: DDP gradients differ from the 1-process gradients by {grad_err:.2e} (relative)"
    if name == "memory_bank":  # every rank holds the bank the 1-process run holds
        for r in results:
            assert torch.allclose(r[name][2]["bank"], single_extra["bank"], atol=1e-6)


def test_negative_control_gather_without_gradient_is_wrong(results):
    """The first step with keys gathered without gradient: the loss agrees, the gradients do not."""
    loss_err, grad_err, _ = _compare(results, "nograd_gather", steps=1)
    assert loss_err < 1e-6
    assert grad_err > 1e-2, f"the gradient-free gather matched ({grad_err:.2e}): the equality test could not fail"
