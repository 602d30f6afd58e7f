"""torch.distributed helpers and the all-gathering KeyQueue, with 2 real gloo processes on loopback.

Each rank writes what it saw to a file under tmp_path; the parent process checks the results.
Timeouts everywhere (process group, join) so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, run_ranks

from moco_fast import KeyQueue, batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather
from moco_fast.distributed import is_distributed

WORLD = 2
SIZE, DIM = 16, 8
BATCHES = (3, 5, 6)  # per rank: global batches 6, 10, 12 -> the queue wraps around
TIMEOUT_S = 60


def rank_keys(rank: int, step: int, batch: int) -> torch.Tensor:
    """Keys a rank enqueues at a step: distinct per rank and step, reproducible in the parent."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(batch, DIM, generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    result: dict = {"rank": rank}
    try:
        init_gloo(rank, WORLD, port, TIMEOUT_S // 2)
        result["is_distributed"] = is_distributed()

        # KeyQueue with gather_distributed=True: every rank ends with the same queue
        queue = KeyQueue(SIZE, DIM, gather_distributed=True)
        states = []
        for step, batch in enumerate(BATCHES):
            queue.enqueue(rank_keys(rank, step, batch))
            states.append({name: b.clone() for name, b in queue.named_buffers()})
        result["queue_states"] = states
        result["negatives"] = queue.negatives().clone()

        # a global batch larger than the queue is rejected on every rank, nothing written
        try:
            queue.enqueue(torch.randn(9, DIM))  # 18 > 16 keys after the gather
            result["big_batch"] = "no error"
        except ValueError as e:
            result["big_batch"] = str(e)
        result["after_big_batch"] = queue.keys.clone()

        # a NaN on one rank: the gathered batch is rejected on every rank
        keys = torch.randn(2, DIM)
        if rank == 1:
            keys[1, 3] = float("nan")
        try:
            queue.enqueue(keys)
            result["nan"] = "no error"
        except ValueError as e:
            result["nan"] = type(e).__name__
        result["after_nan"] = {name: b.clone() for name, b in queue.named_buffers()}

        # concat_all_gather: rank order, any trailing shape
        x = torch.full((3, 2, 2), float(rank)) + torch.arange(12.0).reshape(3, 2, 2)
        result["gather"] = concat_all_gather(x)
        result["gather_2d"] = concat_all_gather(torch.full((4, 5), float(rank + 1)))

        # shuffle BN helpers: unshuffle(shuffle(x)) == x, and the shuffle is a real permutation
        torch.manual_seed(123 + rank)  # ranks draw different perms: rank 0's broadcast must win
        x = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) + 1000 * rank
        shuffled, idx_unshuffle = batch_shuffle_ddp(x)
        result["shuffled"] = shuffled
        result["idx_unshuffle"] = idx_unshuffle
        result["unshuffled"] = batch_unshuffle_ddp(shuffled, idx_unshuffle)
        result["x"] = x
        dist.barrier()
        dist.destroy_process_group()
        result["ok"] = True
    except Exception:  # noqa: BLE001 - report everything to the parent
        result["ok"] = False
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_workers(tmp_path) -> list[dict]:
    return run_ranks(_worker, WORLD, tmp_path, TIMEOUT_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return _run_workers(tmp_path_factory.mktemp("ddp"))


def test_ranks_see_a_distributed_run(results):
    assert all(r["is_distributed"] for r in results)


def test_gathered_queue_is_identical_on_all_ranks_and_in_rank_order(results):
    # the expected queue: each step's keys of rank 0 then rank 1, written in a ring
    rows = [None] * SIZE
    ptr = count = 0
    for step, batch in enumerate(BATCHES):
        gathered = torch.cat([rank_keys(r, step, batch) for r in range(WORLD)])
        for i in range(gathered.shape[0]):
            rows[(ptr + i) % SIZE] = gathered[i]
        ptr = (ptr + gathered.shape[0]) % SIZE
        count = min(count + gathered.shape[0], SIZE)
        for r in results:
            state = r["queue_states"][step]
            assert state["ptr"].item() == ptr and state["count"].item() == count
            assert torch.equal(state["keys"][:count], torch.stack(rows[:count])), f"step {step} rank {r['rank']}"
        s0, s1 = (r["queue_states"][step] for r in results)
        for name in s0:
            assert torch.equal(s0[name], s1[name]), f"step {step}: {name} differs between ranks"
    assert count == SIZE and ptr == (6 + 10 + 12) % SIZE  # it wrapped
    for r in results:
        assert torch.equal(r["negatives"], torch.stack(rows))


def test_global_batch_larger_than_queue_raises_on_every_rank(results):
    for r in results:
        assert "size 16" in r["big_batch"], r["big_batch"]
        assert torch.equal(r["after_big_batch"], r["negatives"])


def test_nan_on_one_rank_rejected_on_every_rank(results):
    for r in results:
        assert r["nan"] == "NonFiniteKeysError"
        last = r["queue_states"][-1]
        for name, b in r["after_nan"].items():
            assert torch.equal(b, last[name]), name


def test_concat_all_gather_shapes_and_order(results):
    base = torch.arange(12.0).reshape(3, 2, 2)
    expected = torch.cat([base + r for r in range(WORLD)])
    for r in results:
        assert r["gather"].shape == (6, 2, 2)
        assert torch.equal(r["gather"], expected)
        assert r["gather_2d"].shape == (8, 5)
        assert torch.equal(r["gather_2d"], torch.cat([torch.full((4, 5), 1.0), torch.full((4, 5), 2.0)]))


def test_shuffle_unshuffle_round_trip(results):
    global_batch = torch.cat([r["x"] for r in results])
    shuffled_global = torch.cat([r["shuffled"] for r in results])
    for r in results:
        assert torch.equal(r["unshuffled"], r["x"])
        assert r["shuffled"].shape == r["x"].shape
    # both ranks use one permutation (rank 0's), and it is a permutation of the global batch
    assert torch.equal(results[0]["idx_unshuffle"], results[1]["idx_unshuffle"])
    order = torch.argsort(shuffled_global[:, 0])
    assert torch.equal(shuffled_global[order], global_batch)
    assert not torch.equal(shuffled_global, global_batch)  # 16! permutations: identity is ~0 chance
    # samples did cross ranks (rank 0 holds some of rank 1's rows or vice versa)
    assert (results[0]["shuffled"][:, 0] >= 1000).any() or (results[1]["shuffled"][:, 0] < 1000).any()


# ------------------------------------------------------------------------------------------------
# single process: the helpers are the identity
# ------------------------------------------------------------------------------------------------


def test_single_process_helpers_are_identity():
    assert not is_distributed()
    x = torch.randn(5, 3)
    assert concat_all_gather(x) is x
    shuffled, idx = batch_shuffle_ddp(x)
    assert torch.equal(shuffled, x)
    assert torch.equal(idx, torch.arange(5))
    assert torch.equal(batch_unshuffle_ddp(shuffled, idx), x)


def test_single_process_queue_with_gather_flag():
    queue = KeyQueue(4, 2, gather_distributed=True)
    keys = torch.randn(3, 2)
    queue.enqueue(keys)
    assert torch.equal(queue.negatives(), keys)
