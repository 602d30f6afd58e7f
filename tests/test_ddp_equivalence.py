"""DDP equivalence for every loss with a gather, over several optimizer steps.

2 gloo ranks, each training a small BN-free model under DistributedDataParallel on its half of a global
batch, must give at every step what 1 process gives on the whole batch: the loss (the mean of the ranks'
row-mean losses), the parameters after the step, and the shared state — the queue (MoCo, MoCoHead,
NTXentLoss's bank), the memory bank, DINO's center. Three steps, so later steps see the state the earlier
ones left (the queues wrap around). ``broadcast_buffers=False``: DDP must not paper over a rank whose
buffers diverged by copying rank 0's.

One worker function runs every case of ``CASES`` (one spawn for the file, ~15 s); a case that raises is
reported on its own. ``*_accumulate``: 2 unequal micro-batches per rank inside ``DINOLoss.accumulate()``
(gradients all-reduced at the last one), still equal to 1 process on the global batch, with ONE all-reduce
of the center per step. ``moco_head_symmetric`` found that a symmetric MoCoHead under DDP enqueued
[k1, k2 of rank 0, k1, k2 of rank 1], not the global batch's [k1 of all; k2 of all], so the queues — and
the losses once they wrap — differed (fixed: ``KeyQueue.enqueue(keys, blocks=2)`` gathers block by block).

Negative controls show the comparison can fail: NT-Xent with keys gathered WITHOUT gradient
(lightly#1528), and DINO with each rank moving its center from its own rows (no all-reduce).
"""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import init_gloo, run_ranks
from test_dicts_distributed import nt_xent_nograd_gather
from torch import nn

import moco_fast
import moco_fast.dino

WORLD, BATCH = 2, 5  # per-rank batch (odd on purpose)
DIM_IN, DIM, P = 12, 16, 16  # input, feature dim d, DINO / SwAV prototypes
NUM_SAMPLES = 24  # memory-bank rows
STEPS = 3
LR = 0.1  # small enough that no case diverges (a diverging run amplifies fp32 rounding)
TIMEOUT_S = 120


class Encoder(nn.Module):
    """BN-free, with the ``fc`` (and ``num_classes``) the MoCo builder expects."""

    def __init__(self, num_classes: int = DIM):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM_IN, 24), nn.Tanh())
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class DINOStudent(nn.Module):
    """Encoder + DINOHead (no BatchNorm). ``fused``: forward returns (bottleneck, prototypes), not logits."""

    def __init__(self, fused: bool):
        super().__init__()
        self.encoder, self.head, self.fused = Encoder(), moco_fast.DINOHead(DIM, 24, 8, P), fused

    def forward(self, x):
        e = self.encoder(x)
        return (self.head.bottleneck(e), self.head.prototypes) if self.fused else self.head(e)


class SwaVModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.prototypes = Encoder(), moco_fast.SwaVPrototypes(DIM, P)

    def forward(self, x):
        return self.prototypes(F.normalize(self.encoder(x), dim=1))


@torch.no_grad()
def ema(teacher: nn.Module, student: nn.Module, m: float = 0.8) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1 - m)


def backward(loss):
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------- the cases
# build() -> a dict: "model" (the trainable module), "views" (crops per sample), "step"(net, views, idx)
# -> the loss after its backward, optionally "after_step"() and "state"() -> {name: tensor} to compare.


def build_moco():
    model = moco_fast.MoCo(Encoder, dim=DIM, K=14, m=0.9, T=0.2, queue_init="random")  # 14: wraps unevenly
    return {
        "model": model,
        "step": lambda net, v, idx: backward(net(v[0], v[1])[0]),
        "state": lambda: {"keys": model.queue.keys, "ptr": model.queue.ptr},
    }


def build_moco_head(symmetric=True):
    model = Encoder()
    key_encoder = copy.deepcopy(model).requires_grad_(False)
    head = moco_fast.MoCoHead(DIM, 26, 0.2, symmetric=symmetric, queue_init="random")

    def step(net, v, idx):
        with torch.no_grad():
            k = [key_encoder(x) for x in v]
        q = [net(x) for x in v]
        return backward(head(q[0], q[1], k[0], k[1]) if symmetric else head(q[0], k[1]))

    return {
        "model": model,
        "step": step,
        "after_step": lambda: ema(key_encoder, model),
        "state": lambda: {"keys": head.queue.keys, "ptr": head.queue.ptr},
    }


def build_nt_xent():
    return {
        "model": Encoder(),
        "step": lambda net, v, idx: backward(moco_fast.nt_xent(net(v[0]), net(v[1]), 0.3, gather_distributed=True)),
    }


def build_ntxent_module(bank=False):
    loss_fn = moco_fast.NTXentLoss(0.5, memory_bank_size=(22, DIM) if bank else 0, gather_distributed=True)
    case = {"model": Encoder(), "step": lambda net, v, idx: backward(loss_fn(net(v[0]), net(v[1])))}
    if bank:
        case["state"] = lambda: {"keys": loss_fn.memory_bank.keys, "ptr": loss_fn.memory_bank.ptr}
    return case


def build_mocov3():
    model = Encoder()
    key_encoder = copy.deepcopy(model).requires_grad_(False)

    def step(net, v, idx):
        with torch.no_grad():
            k1, k2 = key_encoder(v[0]), key_encoder(v[1])
        return backward(moco_fast.mocov3_loss(net(v[0]), k2, 0.2) + moco_fast.mocov3_loss(net(v[1]), k1, 0.2))

    return {"model": model, "step": step, "after_step": lambda: ema(key_encoder, model)}


def build_cmc():
    def step(net, v, idx):
        return backward(moco_fast.cmc_loss([F.normalize(net(x), dim=1) for x in v], 0.2, gather_distributed=True))

    return {"model": Encoder(), "views": 3, "step": step}


def build_memory_bank():
    head = moco_fast.MemoryBankHead(NUM_SAMPLES, DIM, temperature=0.1)
    return {
        "model": Encoder(),
        "views": 1,
        "step": lambda net, v, idx: backward(head(net(v[0]), idx)),
        "state": lambda: {"bank": head.bank.bank},
    }


def build_dino(fused=False, allreduce=True, micro_batches=1):
    model = DINOStudent(fused)
    teacher = copy.deepcopy(model).requires_grad_(False)
    loss_fn = moco_fast.DINOLoss(P, warmup_teacher_temp_epochs=0, center_momentum=0.6)
    center_all_reduces: list[int] = []  # per accumulated step

    def loss_of(net, v):
        if fused:
            with torch.no_grad():
                h_t = [teacher(x)[0] for x in v[:2]]
                w_t = teacher.head.prototypes
            out = [net(x) for x in v]
            return loss_fn.forward_fused(h_t, [h for h, _ in out], out[0][1], w_t)
        with torch.no_grad():
            t = [teacher(x) for x in v[:2]]
        return loss_fn(t, [net(x) for x in v])

    def step(net, v, idx):
        if micro_batches == 1:
            per_rank = mock.patch.object(moco_fast.dino, "is_distributed", lambda: False)  # the negative control
            with contextlib.nullcontext() if allreduce else per_rank:
                return backward(loss_of(net, v))
        # gradient accumulation under DDP: gradients all-reduced at the last micro-batch, the center moved once
        total, rows = 0.0, v[0].shape[0]
        with mock.patch.object(dist, "all_reduce", side_effect=dist.all_reduce) as spy, loss_fn.accumulate():
            for i, part in enumerate(zip(*(x.chunk(micro_batches) for x in v))):
                last = i == micro_batches - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
                with contextlib.nullcontext() if last else net.no_sync():
                    total = total + backward(loss_of(net, part) * (part[0].shape[0] / rows))
        center_all_reduces.append(spy.call_count)
        return total

    return {
        "model": model,
        "views": 3,  # 2 global crops (the teacher's) + 1 local
        "step": step,
        "after_step": lambda: ema(teacher, model),
        "state": lambda: {"center": loss_fn.center},
        "record": center_all_reduces,
    }


def build_swav():
    model = SwaVModel()
    loss_fn = moco_fast.SwaVLoss(sinkhorn_gather_distributed=True)

    def step(net, v, idx):
        model.prototypes.normalize()  # once per step, before the forward (the official order)
        return backward(loss_fn([net(v[0]), net(v[1])], [net(v[2])]))

    return {"model": model, "views": 3, "step": step}


CASES = {
    "moco": build_moco,
    "moco_head_symmetric": build_moco_head,
    "nt_xent": build_nt_xent,
    "ntxent_module": build_ntxent_module,
    "ntxent_memory_bank": lambda: build_ntxent_module(bank=True),
    "mocov3": build_mocov3,
    "cmc": build_cmc,
    "memory_bank": build_memory_bank,
    "dino": build_dino,
    "dino_fused": lambda: build_dino(fused=True),
    "dino_accumulate": lambda: build_dino(micro_batches=2),
    "dino_fused_accumulate": lambda: build_dino(fused=True, micro_batches=2),
    "swav": build_swav,
    # negative controls (must NOT match)
    "nograd_gather": lambda: {
        "model": Encoder(),
        "step": lambda net, v, idx: backward(
            nt_xent_nograd_gather(F.normalize(net(v[0]), dim=1), F.normalize(net(v[1]), dim=1), 0.3)
        ),
    },
    "dino_no_allreduce": lambda: build_dino(allreduce=False),
}
NEGATIVE = ("nograd_gather", "dino_no_allreduce")


def global_views(step: int, views: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(WORLD * BATCH, DIM_IN, generator=g) for _ in range(views)]


def global_indices(step: int) -> torch.Tensor:
    """With replacement: some rows repeat, within a rank and across ranks (the global last one wins)."""
    return torch.randint(NUM_SAMPLES, (WORLD * BATCH,), generator=torch.Generator().manual_seed(200 + step))


def train(name: str, rows: slice, ddp: bool) -> dict:
    """STEPS SGD steps of case ``name`` on ``rows`` of each global batch: per step the loss, the flat
    parameters after the step and the state."""
    torch.manual_seed(0)  # the same model, dictionary and random bank in every process
    case = CASES[name]()
    model = case["model"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ddp else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    out: dict = {"loss": [], "params": [], "state": []}
    for step in range(STEPS):
        views = [v[rows] for v in global_views(step, case.get("views", 2))]
        opt.zero_grad()
        out["loss"].append(case["step"](net, views, global_indices(step)[rows]))
        opt.step()
        if "after_step" in case:
            case["after_step"]()
        out["params"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        out["state"].append({k: v.detach().clone() for k, v in case.get("state", dict)().items()})
    out["record"] = case.get("record")
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    result: dict = {}
    try:
        init_gloo(rank, WORLD, port, TIMEOUT_S // 2)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        for name in CASES:
            try:
                result[name] = train(name, mine, ddp=True)
            except Exception:  # noqa: BLE001 - reported by that case's test
                result[name] = traceback.format_exc()
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        result["setup_error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp_equivalence"), TIMEOUT_S)
    for r, res in enumerate(results):
        assert "setup_error" not in res, f"rank {r}: {res['setup_error']}"
    return results


def differences(ranks, name) -> list[dict]:
    """Per step, DDP against 1 process: the loss's difference relative to max(1, |loss|), the largest
    parameter difference relative to the largest parameter, and each state's largest difference."""
    for r, res in enumerate(ranks):
        assert not isinstance(res[name], str), f"{name} failed on rank {r}:\n{res[name]}"
    single = train(name, slice(None), ddp=False)
    steps = []
    for s in range(STEPS):
        ref_loss, ref_params = single["loss"][s].item(), single["params"][s]
        loss = abs(sum(res[name]["loss"][s] for res in ranks).item() / WORLD - ref_loss) / max(1.0, abs(ref_loss))
        params = max((res[name]["params"][s] - ref_params).abs().max().item() for res in ranks)
        params /= ref_params.abs().max().item()
        state = {
            k: max((res[name]["state"][s][k].double() - ref.double()).abs().max().item() for res in ranks)
            for k, ref in single["state"][s].items()
        }
        steps.append({"loss": loss, "params": params, **state})
    return steps


@pytest.mark.parametrize("name", [n for n in CASES if n not in NEGATIVE])
def test_two_ranks_train_like_one_process_on_the_global_batch(ranks, name):
    for step, diff in enumerate(differences(ranks, name)):
        for key, value in diff.items():  # fp32 rounding of reductions split differently (seen: ≤ 1.2e-6)
            assert value < 1e-5, f"{name}, step {step}: {key} differs by {value:.2e} ({diff})"


@pytest.mark.parametrize("name", ["dino_accumulate", "dino_fused_accumulate"])
def test_accumulated_dino_step_all_reduces_the_center_once(ranks, name):
    for res in ranks:
        assert res[name]["record"] == [1] * STEPS


@pytest.mark.parametrize("name", NEGATIVE)
def test_negative_controls_do_not_match(ranks, name):
    worst = max(max(d.values()) for d in differences(ranks, name))
    assert worst > 1e-3, f"{name} matched ({worst:.2e}): the equivalence test could not fail"


def test_enqueue_blocks_must_divide_the_keys():
    queue = moco_fast.KeyQueue(8, DIM)
    with pytest.raises(ValueError, match="blocks"):
        queue.enqueue(torch.randn(5, DIM), blocks=2)
    assert int(queue.count) == 0
    queue.enqueue(torch.randn(6, DIM), blocks=2)  # one process: the same as blocks=1
    assert int(queue.count) == 6
