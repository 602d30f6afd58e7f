"""Per-row InfoNCE loss and dq when the positive dominates (loss_i → 0), on every backend, vs float64.

Late in training, and for easy samples, p0 = softmax_i0 → 1 and loss_i = lse_i − pos_i → 0. Formed as
lse − pos in fp32 (and dq as O − k, two nearly equal vectors), everything below eps/loss cancels: at
loss ≈ 5e-5 that was 4e-3 of the row's loss. The backends keep the negatives' part apart from the
positive instead (docs/design.md "Numerics"): with m = max(pos, max_j s_j), l_neg = Σ_j exp(s_j − m),
w0 = exp(pos − m), loss_i = (m − pos) + log1p(l_neg + expm1(pos − m)) and
delta_i = O_i − k_i = (Σ_j exp(s_j − m)·(n_j − k_i)) / (w0 + l_neg). The contract: per-row loss and dq
within TOL = 1e-5 of float64 relative to the row's own |loss_i| and ‖dq_i‖, at any loss size.

The grid: 48 rows per case with target losses log-spaced over [1e-8, 10] (both regimes: the positive
the row's max, and a negative above it), T in (0.01, 0.07, 0.2, 1), K in (1, 1000), an fp32/bf16/fp16
queue with fp32 q and k. Row i is q_i = a_i·u_i with k_i ≈ u_i (a positive nearly equal to the query
direction) and a_i solved in float64 so that the loss hits its target: the logits then span what the
loss needs and no more. The oracle sees the inputs as rounded, upcast to float64.

Implementations: the torch backend (its blockwise loop, which the stats path runs, and the fused CPU
attention path), the reference backend and the official formulation (reported, and beaten), the Triton
kernels under the interpreter (fused single split, one split through the combine kernel, several
splits), and the CUDA kernels' algorithm emulated in fp32 PyTorch (tests/test_cuda_ext.py).

``python tests/test_tiny_losses.py`` prints the worst per-row relative errors of every implementation
over the grid (the table in the README).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py does, before triton's import

import moco_fast  # noqa: E402
from moco_fast.reference import reference_info_nce  # noqa: E402

TOL = 1e-5
ROWS = 48
DIM = 128
TARGET_LOSSES = torch.logspace(-8, 1, ROWS, dtype=torch.float64)
TEMPERATURES = (0.01, 0.07, 0.2, 1.0)
NUM_KEYS = (1, 1000)
QUEUES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRID = list(itertools.product(TEMPERATURES, NUM_KEYS))


# ------------------------------------------------------------------------------------------------
# cases and the float64 oracle
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def case(temperature: float, num_keys: int, queue: str):
    """(q (B, d) fp32, k (B, d) fp32, negatives (K, d) in the queue dtype, g (B,) fp32): see the module doc."""
    gen = torch.Generator().manual_seed(int(temperature * 1000) * 7 + num_keys * 3 + len(queue))
    u = F.normalize(torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(u + 0.05 * torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64), dim=1).float()
    n = F.normalize(torch.randn(num_keys, DIM, generator=gen, dtype=torch.float64), dim=1).to(QUEUES[queue])
    # loss_i(t) = log(1 + Σ_j exp(t·(u_i·n_j − u_i·k_i))) falls from +inf to 0 as t = a_i/T rises: bisect t.
    gaps = u @ n.double().T - (u * k.double()).sum(1, keepdim=True)  # (B, K), all < 0
    lo, hi = torch.full((ROWS,), -400.0, dtype=torch.float64), torch.full((ROWS,), 400.0, dtype=torch.float64)
    for _ in range(100):
        t = (lo + hi) / 2
        loss = torch.logsumexp(torch.cat([torch.zeros(ROWS, 1, dtype=torch.float64), t[:, None] * gaps], 1), 1)
        hi, lo = torch.where(loss > TARGET_LOSSES, hi, t), torch.where(loss > TARGET_LOSSES, t, lo)
    q = (u * (lo * temperature)[:, None]).float()
    g = 0.5 + torch.rand(ROWS, generator=gen)
    return q, k, n, g


@functools.lru_cache(maxsize=64)
def oracle(temperature: float, num_keys: int, queue: str):
    """float64 (loss (B,), dq (B, d)) of the case: loss = lse − pos, dq of Σ g_i·loss_i."""
    q, k, n, g = case(temperature, num_keys, queue)
    q64 = q.double().requires_grad_()
    logits = torch.cat([(q64 * k.double()).sum(1, keepdim=True), q64 @ n.double().T], 1) / temperature
    loss = torch.logsumexp(logits, 1) - logits[:, 0]
    (dq,) = torch.autograd.grad((loss * g.double()).sum(), q64)
    return loss.detach(), dq


def row_errors(temperature, num_keys, queue, loss, dq) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row |loss_i − ref_i| / |ref_i| and ‖dq_i − ref_i‖ / ‖ref_i‖ (float64, (B,) each) of one case."""
    ref_loss, ref_dq = oracle(temperature, num_keys, queue)
    assert loss.shape == ref_loss.shape and dq.shape == ref_dq.shape
    loss, dq = loss.detach().double(), dq.detach().double()
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all()
    return (loss - ref_loss).abs() / ref_loss.abs(), (dq - ref_dq).norm(dim=1) / ref_dq.norm(dim=1)


# ------------------------------------------------------------------------------------------------
# implementations: each maps (q, k, n, g, temperature) to per-row (loss, dq)
# ------------------------------------------------------------------------------------------------


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _public(backend: str, stats: bool, device: str = "cpu"):
    def run(q, k, n, g, temperature):
        q, k, n, g = _on(device, q, k, n, g)
        qq = q.clone().requires_grad_()
        out = moco_fast.info_nce(qq, k, n, temperature, reduction="none", backend=backend, return_stats=stats)
        loss = out[0] if stats else out
        (dq,) = torch.autograd.grad((loss * g).sum(), qq)
        return _on("cpu", loss, dq)

    return run


def _official(q, k, n, g, temperature):
    """The official formulation (materialized logits, cross_entropy) under ordinary autograd."""
    qq = q.clone().requires_grad_()
    loss, _, _ = reference_info_nce(qq, k, n, temperature, reduction="none")
    (dq,) = torch.autograd.grad((loss * g).sum(), qq)
    return loss, dq


def _triton_device() -> str:
    import moco_fast.kernels as KN

    return "cpu" if KN.INTERPRETED else "cuda"


def _small_tiles():
    from moco_fast.kernels import heuristics as H

    return H.TileConfig(16, 16, 4, 1)


def _contract(module: str, device, **forward_kwargs):
    """(q, k, n, g, T) -> (loss, delta, dq, dk) on the CPU from backend ``module``'s forward and backward
    contract functions, run on ``device`` (a callable: decided when the backend is known to be there)."""

    def run(q, k, n, g, temperature):
        q, k, n, g = _on(device(), q, k, n, g)
        backend, scale = importlib.import_module(module), 1.0 / temperature
        loss, _, delta, _ = backend.infonce_forward(q, k, n, scale, **forward_kwargs)
        dq, dk = backend.infonce_backward(g, q, k, loss, delta, scale)
        return _on("cpu", loss, delta, dq, dk)

    return run


def _cuda_emulated(q, k, n, g, temperature):
    """csrc/infonce.cu's forward (split + combine) as emulated in test_cuda_ext, and its dq/dk formulas
    (infonce_bwd_kernel): (loss, delta, dq, dk)."""
    from test_cuda_ext import _emulate_forward

    scale = 1.0 / temperature
    loss, _, delta, _, _ = _emulate_forward(q, k, n, scale, "ieee", sms=8)
    gs = g * scale
    return loss, delta, gs[:, None] * delta, (gs * torch.expm1(-loss))[:, None] * q


CONTRACTS = {
    "torch (contract)": lambda: _contract("moco_fast.torch_backend", lambda: "cpu", need_rank=True),
    "triton (fused)": lambda: _contract("moco_fast.kernels", _triton_device, num_splits=1, fuse=True),
    "triton (1 split + combine)": lambda: _contract("moco_fast.kernels", _triton_device, num_splits=1, fuse=False),
    "triton (7 splits + combine)": lambda: _contract(
        "moco_fast.kernels", _triton_device, num_splits=7, config=_small_tiles()
    ),
    "cuda (emulated)": lambda: _cuda_emulated,
    "cuda (GPU)": lambda: _contract("moco_fast.cuda_ext", lambda: "cuda"),
}


def _loss_and_dq(contract):
    """An IMPLEMENTATIONS entry from a CONTRACTS one."""

    def make():
        run = contract()

        def loss_and_dq(*args):
            loss, _, dq, _ = run(*args)
            return loss, dq

        return loss_and_dq

    return make


IMPLEMENTATIONS = {
    "torch (blockwise)": lambda: _public("torch", stats=True),
    "torch (fused CPU attention)": lambda: _public("torch", stats=False),
    **{name: _loss_and_dq(contract) for name, contract in CONTRACTS.items()},
    "triton (public)": lambda: _public("triton", stats=False, device=_triton_device()),
}
BASELINES = {"reference backend": lambda: _public("reference", stats=False), "official (autograd)": lambda: _official}


def _needs(name: str) -> None:
    if name.startswith("triton"):
        kernels = pytest.importorskip("moco_fast.kernels")
        if not kernels.AVAILABLE or (not kernels.INTERPRETED and not torch.cuda.is_available()):
            pytest.skip("the triton backend cannot run here")
    if name.startswith("cuda"):
        if importlib.util.find_spec("moco_fast._C") is None:
            pytest.skip("moco_fast._C was not built (the emulation reads the kernels' tiles from it)")
    if name == "cuda (GPU)" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def grid_errors(name: str, queue: str, min_loss: float = 0.0) -> tuple[float, float]:
    """Worst (loss, dq) per-row relative error of implementation ``name`` over GRID for one queue dtype,
    over the rows whose float64 loss is at least ``min_loss``."""
    impl = (IMPLEMENTATIONS | BASELINES)[name]()
    worst = [0.0, 0.0]
    for temperature, num_keys in GRID:
        q, k, n, g = case(temperature, num_keys, queue)
        rows = oracle(temperature, num_keys, queue)[0] >= min_loss
        errs = row_errors(temperature, num_keys, queue, *impl(q, k, n, g, temperature))
        worst = [max(w, e[rows].max().item()) for w, e in zip(worst, errs)]
    return tuple(worst)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_the_grid_spans_both_regimes():
    """Losses from 1e-8 to ~10, rows whose positive is the max and rows where a negative beats it."""
    for temperature, num_keys in GRID:
        for queue in QUEUES:
            loss, _ = oracle(temperature, num_keys, queue)
            assert loss.min() < 2e-8 and loss.max() > 8, (temperature, num_keys, queue)
            q, k, n, _ = case(temperature, num_keys, queue)
            pos = (q.double() * k.double()).sum(1)
            beaten = (q.double() @ n.double().T > pos[:, None]).any(1)
            assert 0 < beaten.sum() < ROWS, "both regimes must be present"


@pytest.mark.parametrize("queue", list(QUEUES))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_loss_and_dq_within_tolerance_at_any_loss_size(name, queue):
    _needs(name)
    loss_err, dq_err = grid_errors(name, queue)
    assert loss_err <= TOL and dq_err <= TOL, f"{name}, {queue} queue: loss {loss_err:.2e}, dq {dq_err:.2e}"


@pytest.mark.parametrize("queue", list(QUEUES))
def test_ours_beat_the_official_formulation(queue):
    """The official formulation cancels (its error is what it is, and the grid must show it); the
    reference backend runs it behind the contract. The torch backend beats both on the same rows."""
    ours = grid_errors("torch (blockwise)", queue)
    official = grid_errors("official (autograd)", queue)
    reference = grid_errors("reference backend", queue)
    assert official[0] > 1e-4 and official[1] > 1e-4, f"the grid shows no cancellation: {official}"
    assert reference[0] > 1e-4, f"the reference backend's loss is the official one: {reference}"
    for theirs in (official, reference):
        assert ours[0] < theirs[0] and ours[1] <= max(theirs[1], TOL), (ours, theirs)


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_no_negatives_give_zero_loss_delta_and_gradients_exactly(name):
    """K = 0: loss 0, delta 0, dq 0 and dk = g/T·expm1(−0)·q = 0, bit for bit."""
    _needs(name)
    q, k, _, g = case(0.07, 1, "fp32")
    for out in CONTRACTS[name]()(q, k, torch.empty(0, DIM), g, 0.07):
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_key_gradient_is_accurate_when_the_loss_is_tiny(name):
    """dk = g/T·(p0 − 1)·q with p0 − 1 = expm1(−loss): as accurate as the loss (relative to ‖dk_i‖)."""
    _needs(name)
    run = CONTRACTS[name]()
    for temperature, num_keys in GRID:
        q, k, n, g = case(temperature, num_keys, "fp32")
        k64 = k.double().requires_grad_()
        logits = torch.cat([(q.double() * k64).sum(1, keepdim=True), q.double() @ n.double().T], 1) / temperature
        (ref,) = torch.autograd.grad(((torch.logsumexp(logits, 1) - logits[:, 0]) * g.double()).sum(), k64)
        dk = run(q, k, n, g, temperature)[3]
        err = ((dk.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        assert err <= TOL, (temperature, num_keys, err)


# ------------------------------------------------------------------------------------------------
# the contrastive core (nt_xent, mocov3_loss, cmc_loss, the memory bank's exact softmax): the same cases,
# with the positives among the keys (keys = [k; n], row i's target column i) and, with ``exclude``, one
# other positive column removed per row (NT-Xent's self-similarity mask)
# ------------------------------------------------------------------------------------------------

EXCLUDE = (False, True)


def contrast_case(temperature: float, num_keys: int, queue: str, exclude: bool):
    """(q, keys (B + K, d) in the queue dtype, target (B,), exclude (B,) or None, g (B,)) from case():
    the losses still span 1e-8 .. 10, the other rows' positives now being negatives too."""
    q, k, n, g = case(temperature, num_keys, queue)
    keys = torch.cat([k.to(n.dtype), n])
    target = torch.arange(ROWS)
    return q, keys, target, (target + 1) % ROWS if exclude else None, g


@functools.lru_cache(maxsize=64)
def contrast_oracle(temperature: float, num_keys: int, queue: str, exclude: bool):
    """float64 (loss (B,), dq (B, d)): loss_i = lse_{j != e_i}(q_i·keys_j/T) − q_i·keys_{t_i}/T."""
    q, keys, target, excl, g = contrast_case(temperature, num_keys, queue, exclude)
    q64 = q.double().requires_grad_()
    logits = q64 @ keys.double().T / temperature
    if excl is not None:
        logits = logits.index_put((torch.arange(ROWS), excl), torch.tensor(float("-inf"), dtype=torch.float64))
    loss = torch.logsumexp(logits, 1) - logits.gather(1, target[:, None]).squeeze(1)
    (dq,) = torch.autograd.grad((loss * g.double()).sum(), q64)
    return loss.detach(), dq


def _contrast_contract(module: str, device, **forward_kwargs):
    """(q, keys, target, exclude, g, T) -> (loss, dq) on the CPU from backend ``module``'s contrast_forward."""

    def run(q, keys, target, excl, g, temperature):
        dev = device()
        q, keys, target, g = _on(dev, q, keys, target, g)
        excl = None if excl is None else excl.to(dev)
        backend = importlib.import_module(module)
        loss, _, dloss_dq, _ = backend.contrast_forward(q, keys, target, excl, 1.0 / temperature, **forward_kwargs)
        return _on("cpu", loss, g[:, None] * dloss_dq)

    return run


def _official_contrast(q, keys, target, excl, g, temperature):
    """The official formulation: materialized logits, the excluded column at -inf, cross_entropy."""
    from moco_fast.reference import reference_contrastive_cross_entropy

    qq = q.clone().requires_grad_()
    loss, _, _ = reference_contrastive_cross_entropy(qq, keys, target, temperature, excl, reduction="none")
    (dq,) = torch.autograd.grad((loss * g).sum(), qq)
    return loss, dq


CONTRAST_IMPLEMENTATIONS = {
    "torch (blockwise)": lambda: _contrast_contract("moco_fast.torch_backend", lambda: "cpu", need_rank=True),
    "torch (fused CPU attention)": lambda: _contrast_contract(
        "moco_fast.torch_backend", lambda: "cpu", need_rank=False
    ),
    "triton (fused)": lambda: _contrast_contract("moco_fast.kernels", _triton_device, num_splits=1, fuse=True),
    "triton (1 split + combine)": lambda: _contrast_contract(
        "moco_fast.kernels", _triton_device, num_splits=1, fuse=False
    ),
    "triton (7 splits + combine)": lambda: _contrast_contract(
        "moco_fast.kernels", _triton_device, num_splits=7, config=_small_tiles()
    ),
}
CONTRAST_BASELINES = {"official (autograd)": lambda: _official_contrast}


def contrast_grid_errors(name: str, queue: str, exclude: bool, min_loss: float = 0.0) -> tuple[float, float]:
    """Worst (loss, dq) per-row relative error of contrast implementation ``name`` over GRID."""
    impl = (CONTRAST_IMPLEMENTATIONS | CONTRAST_BASELINES)[name]()
    worst = [0.0, 0.0]
    for temperature, num_keys in GRID:
        ref_loss, ref_dq = contrast_oracle(temperature, num_keys, queue, exclude)
        loss, dq = (
            t.detach().double() for t in impl(*contrast_case(temperature, num_keys, queue, exclude), temperature)
        )
        assert torch.isfinite(loss).all() and torch.isfinite(dq).all(), name
        rows = ref_loss >= min_loss
        errs = ((loss - ref_loss).abs() / ref_loss.abs(), (dq - ref_dq).norm(dim=1) / ref_dq.norm(dim=1))
        worst = [max(w, e[rows].max().item()) for w, e in zip(worst, errs)]
    return tuple(worst)


def test_the_contrast_grid_spans_tiny_and_large_losses():
    for temperature, num_keys in GRID:
        for exclude in EXCLUDE:
            loss, _ = contrast_oracle(temperature, num_keys, "fp32", exclude)
            assert loss.min() < 1e-6 and loss.max() > 5, (temperature, num_keys, exclude)


@pytest.mark.parametrize("exclude", EXCLUDE, ids=["no exclusion", "exclusion"])
@pytest.mark.parametrize("queue", list(QUEUES))
@pytest.mark.parametrize("name", list(CONTRAST_IMPLEMENTATIONS))
def test_contrast_loss_and_dq_within_tolerance_at_any_loss_size(name, queue, exclude):
    _needs(name)
    loss_err, dq_err = contrast_grid_errors(name, queue, exclude)
    assert loss_err <= TOL and dq_err <= TOL, f"{name}, {queue}: loss {loss_err:.2e}, dq {dq_err:.2e}"


def test_contrast_official_formulation_cancels_on_the_same_grid():
    official = contrast_grid_errors("official (autograd)", "fp32", False)
    assert official[0] > 1e-4, f"the grid shows no cancellation: {official}"


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def main() -> None:
    """Print the worst per-row relative errors of every implementation over the grid, per queue dtype:
    over all rows, and over the rows with loss >= 1e-4."""
    torch.set_num_threads(1)
    print(f"worst per-row relative error (loss | dq) over T in {TEMPERATURES}, K in {NUM_KEYS}, {ROWS} rows")
    print(f"with losses log-spaced over 1e-8 .. 10, d = {DIM}, fp32 q and k, fp32 IEEE dots")
    for min_loss in (0.0, 1e-4):
        print(f"\nrows with loss >= {min_loss:g}:")
        print(f"{'implementation':30s}" + "".join(f"{q + ' queue':>24s}" for q in QUEUES))
        for name in list(IMPLEMENTATIONS) + list(BASELINES):
            cells = []
            for queue in QUEUES:
                try:
                    loss_err, dq_err = grid_errors(name, queue, min_loss)
                    cells.append(f"{loss_err:9.1e} | {dq_err:8.1e}")
                except Exception as err:  # noqa: BLE001 - a backend that cannot run here
                    cells.append(f"{type(err).__name__:>20s}")
            print(f"{name:30s}" + "".join(f"{c:>24s}" for c in cells))
    print("\nthe contrastive core (nt_xent, mocov3_loss, cmc_loss, memory bank): keys = [k; n], target i,")
    print("fp32 q, keys in the queue dtype; 'excl' removes one other column per row (NT-Xent's mask)")
    for min_loss in (0.0, 1e-4):
        print(f"\nrows with loss >= {min_loss:g}:")
        print(
            f"{'implementation':30s}" + "".join(f"{q + (' excl' if e else ''):>24s}" for q in QUEUES for e in EXCLUDE)
        )
        for name in list(CONTRAST_IMPLEMENTATIONS) + list(CONTRAST_BASELINES):
            cells = []
            for queue in QUEUES:
                for exclude in EXCLUDE:
                    try:
                        loss_err, dq_err = contrast_grid_errors(name, queue, exclude, min_loss)
                        cells.append(f"{loss_err:9.1e} | {dq_err:8.1e}")
                    except Exception as err:  # noqa: BLE001 - a backend that cannot run here
                        cells.append(f"{type(err).__name__:>20s}")
            print(f"{name:30s}" + "".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
