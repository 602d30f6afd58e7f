"""Small versions of the three benchmarks for pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each case checks its row against the reference first (a benchmark of a wrong result is worthless),
then times it. CUDA when available (timed calls synchronize), else the CPU.
"""

from __future__ import annotations

import itertools

import bench_infonce
import bench_momentum
import bench_queue
import pytest
import torch

from moco_fast import benchmarking as mb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ---------------------------------------------------------------------------------------------- InfoNCE

INFONCE_CASE = bench_infonce.Case(batch=64, keys=4096, dim=128, dtype=torch.float32, device=DEVICE)
INFONCE_ROWS = {row.name: row for row in bench_infonce.all_rows(DEVICE)}


@pytest.fixture(scope="module")
def infonce_inputs():
    q, k, n = bench_infonce.make_inputs(INFONCE_CASE)
    ref = bench_infonce.Reference()
    ref.setup(INFONCE_CASE, q, k, n)
    loss, dq = ref.fwd_bwd(None, q, k, n)
    return q, k, n, loss, dq


@pytest.mark.benchmark(group="infonce fwd+bwd B=64 K=4096 d=128 fp32")
@pytest.mark.parametrize("name", list(INFONCE_ROWS))
def test_infonce(name, infonce_inputs, timed):
    row = INFONCE_ROWS[name]
    reason = row.available(INFONCE_CASE)
    if reason:
        pytest.skip(reason)
    q, k, n, ref_loss, ref_dq = infonce_inputs
    state = row.setup(INFONCE_CASE, q, k, n)
    loss, dq = row.fwd_bwd(state, q, k, n)
    tol_loss, tol_dq = bench_infonce._tolerances(row, INFONCE_CASE)
    assert abs(float(loss) - float(ref_loss)) <= tol_loss
    assert bench_infonce._rel(dq, row.expected_dq(ref_dq, q)) <= tol_dq
    timed(row.fwd_bwd, state, q, k, n)


# ---------------------------------------------------------------------------------------------- momentum

MOMENTUM_ROWS = bench_momentum.rows_for(DEVICE, None)


@pytest.fixture(scope="module")
def momentum_models():
    online = bench_momentum.build_model("resnet18", DEVICE, torch.float32)
    target0 = bench_momentum.perturbed_copy(online)
    update, read = bench_momentum.make_updater("official", None, online, target0, 0.99)
    update()
    return online, target0, mb.flat_values(read())


@pytest.mark.benchmark(group="momentum update resnet18 fp32")
@pytest.mark.parametrize("row", MOMENTUM_ROWS, ids=[r[0] for r in MOMENTUM_ROWS])
def test_momentum(row, momentum_models, timed):
    name, kind, backend = row
    if kind == "lightly":
        pytest.importorskip("lightly.models.utils")
    online, target0, expected = momentum_models
    update, read = bench_momentum.make_updater(kind, backend, online, target0, 0.99)
    update()
    torch.testing.assert_close(mb.flat_values(read()), expected, rtol=0, atol=1e-6)
    timed(update)


# ---------------------------------------------------------------------------------------------- queue

QUEUE_ROWS = bench_queue.rows_for(DEVICE, None)


@pytest.mark.benchmark(group="enqueue B=256 K=65536 d=128 fp32")
@pytest.mark.parametrize("row", QUEUE_ROWS, ids=[r[0] for r in QUEUE_ROWS])
def test_queue(row, timed):
    name, backend, mode = row
    gen = torch.Generator().manual_seed(0)
    start = torch.nn.functional.normalize(torch.randn(65536, 128, generator=gen), dim=1).to(DEVICE)
    impl = mb.OfficialQueue(start) if mode == "official" else bench_queue.Moco(start, backend, mode)
    keys = bench_queue.make_keys(4, 256, 128, DEVICE, torch.float32, seed=1)
    for batch in keys[:2]:
        impl.enqueue(batch)
    assert torch.equal(impl.contents()[:256], keys[0]) and torch.equal(impl.contents()[256:512], keys[1])
    step = itertools.cycle(keys)
    timed(lambda: impl.enqueue(next(step)))


# ---------------------------------------------------------------------------------------------- NT-Xent / memory bank
# --- NT-Xent / MoCo v3 / CMC / memory bank

import bench_memory_bank  # noqa: E402
import bench_ntxent  # noqa: E402

NTXENT_CASE = bench_ntxent.Case(rows=512, dim=128, dtype=torch.float32, device=DEVICE)
NTXENT_ROWS = {row.name: row for row in bench_ntxent.all_rows()}
BANK_CASE = bench_memory_bank.Case(batch=64, bank=20000, dim=128, dtype=torch.float32, device=DEVICE)
BANK_ROWS = {row.name: row for row in bench_memory_bank.loss_rows()}


def _checked(rows, name, case, inputs, reference):
    """(row, state) after checking the row against the reference row's (loss, grads)."""
    row = rows[name]
    reason = row.available(case)
    if reason:
        pytest.skip(reason)
    ref_row = rows[reference]
    ref = ref_row.fwd_bwd(ref_row.setup(case), *inputs)
    state = row.setup(case)
    loss, grads = row.fwd_bwd(state, *inputs)
    expected = [bench_ntxent.radial_free(g, x) for g, x in zip(ref[1], inputs)] if row.radial_free else ref[1]
    assert abs(float(loss) - float(ref[0])) <= 1e-4
    assert all(bench_ntxent._rel(g, e) <= 1e-4 for g, e in zip(grads, expected))
    return row, state


@pytest.mark.benchmark(group="nt_xent fwd+bwd 2N=512 d=128 fp32")
@pytest.mark.parametrize("name", list(NTXENT_ROWS))
def test_ntxent(name, timed):
    inputs = bench_ntxent.make_inputs(NTXENT_CASE)
    row, state = _checked(NTXENT_ROWS, name, NTXENT_CASE, inputs, "naive")
    timed(row.fwd_bwd, state, *inputs)


@pytest.mark.benchmark(group="memory-bank exact softmax fwd+bwd B=64 N=20000 d=128 fp32")
@pytest.mark.parametrize("name", list(BANK_ROWS))
def test_memory_bank_softmax(name, timed):
    inputs = bench_memory_bank.make_inputs(BANK_CASE)
    row, state = _checked(BANK_ROWS, name, BANK_CASE, inputs, "naive")
    timed(row.fwd_bwd, state, *inputs)
