"""The non-finite policy (docs/design.md, "Non-finite inputs and state"), one test per row of its table.

Ops propagate: a NaN/Inf in an input shows in the loss (the row it belongs to, or every row when it is in
a shared key / prototype / score), never a finite loss, on every backend — including a poisoned key whose
logit is −inf, which has probability 0 and would otherwise vanish from the loss (its 0·inf shows in the
forward's delta; moco_fast.functional.nonfinite_rows). Stateful objects refuse: KeyQueue, SwaVQueue,
MemoryBank and the DINO center never absorb a non-finite value (CPU: an error from that call, or a counted
skip; the GPU path, run here by patching ``_reads_are_free``: refused on the device, raised by the next
call or ``check()``). The rows already covered elsewhere name their tests in the table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moco_fast
from moco_fast import NonFiniteFeaturesError, NonFiniteKeysError, NonFiniteTeacherError

NAN, INF = float("nan"), float("inf")
BAD = [NAN, INF, -INF]
TRI = pytest.mark.parametrize("backend", ["torch", "reference", "triton"], indirect=True)


def unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def masked_key(q: torch.Tensor, keys: torch.Tensor, row: int, value: float) -> torch.Tensor:
    """keys with keys[row, c] = value at the component c where every query has the sign that makes the
    logit −inf (value·q[:, c] < 0 for all rows): that key gets probability 0 in every row."""
    keys = keys.clone()
    c = 0
    q[:, c] = -torch.sign(torch.tensor(value if value == value else 1.0)) * (q[:, c].abs() + 0.1)
    keys[row, c] = value
    return keys


# --- ops: propagate -----------------------------------------------------------------------------


@TRI
@pytest.mark.parametrize("value", BAD)
def test_info_nce_query_poisons_its_row_only(backend, device, value):
    q, k, n = unit(5, 8, 1).to(device), unit(5, 8, 2).to(device), unit(11, 8, 3).to(device)
    for bad in (q, k):
        bad[2, 3] = value
        loss = moco_fast.info_nce(q, k, n, 0.1, reduction="none", backend=backend)
        assert not torch.isfinite(loss[2]) and torch.isfinite(loss[torch.arange(5) != 2]).all()
        bad[2, 3] = 0.5


@TRI
@pytest.mark.parametrize("value", [INF, -INF])
def test_info_nce_masked_negative_still_shows(backend, device, value):
    """A ±inf component whose logit is −inf in every row: probability 0, yet every row's loss is NaN."""
    q, k = unit(4, 8, 1), unit(4, 8, 2)
    n = masked_key(q, unit(9, 8, 3), 5, value)
    loss = moco_fast.info_nce(q.to(device), k.to(device), n.to(device), 0.1, reduction="none", backend=backend)
    assert torch.isnan(loss).all()


@TRI
@pytest.mark.parametrize("value", [INF, -INF])
def test_contrast_masked_key_still_shows(backend, device, value):
    q = unit(4, 8, 1)
    keys = masked_key(q, unit(9, 8, 3), 5, value)
    target = torch.tensor([0, 1, 2, 3])
    loss = moco_fast.contrastive_cross_entropy(
        q.to(device), keys.to(device), target.to(device), 0.1, reduction="none", backend=backend
    )
    assert torch.isnan(loss).all()


@TRI
@pytest.mark.parametrize("value", BAD)
def test_contrast_query_poisons_its_row_and_a_key_every_row(backend, device, value):
    q, keys, target = unit(5, 8, 1), unit(7, 8, 2), torch.tensor([0, 2, 4, 6, 1])
    q[1, 0] = value
    loss = moco_fast.contrastive_cross_entropy(q, keys, target, 0.1, reduction="none", backend=backend)
    assert not torch.isfinite(loss[1]) and torch.isfinite(loss[torch.arange(5) != 1]).all()
    q[1, 0], keys[3, 1] = 0.5, value
    loss = moco_fast.contrastive_cross_entropy(q, keys, target, 0.1, reduction="none", backend=backend)
    assert not torch.isfinite(loss).any()


@TRI
@pytest.mark.parametrize("value", BAD)
def test_dictionary_losses_show_any_poisoned_element(backend, device, value):
    """nt_xent (every row is a key), mocov3_loss (q and k), cmc_loss (any view): the loss is not finite."""
    a, b = unit(4, 8, 1), unit(4, 8, 2)
    a[2, 5] = value
    assert not torch.isfinite(moco_fast.nt_xent(a, b, 0.5, reduction="none", backend=backend)).any()
    assert not torch.isfinite(moco_fast.mocov3_loss(a, b, 0.2, gather_distributed=False, backend=backend))
    assert not torch.isfinite(moco_fast.mocov3_loss(b, a, 0.2, gather_distributed=False, backend=backend))
    assert not torch.isfinite(moco_fast.cmc_loss([b, unit(4, 8, 3), a], 0.07, backend=backend))


@TRI
@pytest.mark.parametrize("what", ["student", "teacher", "prototypes", "teacher_prototypes", "center"])
@pytest.mark.parametrize("value", BAD)
def test_dino_loss_shows_any_poisoned_input(backend, device, what, value):
    """Including the teacher's prototypes and the center, which only enter the teacher logits (a +inf
    center entry or a −inf teacher logit gives that prototype probability 0: the loss would be finite)."""
    P, b = 6, 8
    x = {
        "student": [unit(3, b, 1), unit(3, b, 2)],
        "teacher": [unit(3, b, 3), unit(3, b, 4)],
        "prototypes": unit(P, b, 5),
        "teacher_prototypes": unit(P, b, 6),
        "center": torch.zeros(P),
    }
    target = x[what][1] if isinstance(x[what], list) else x[what]
    if what == "center":
        target[2] = value
    elif what == "teacher_prototypes":  # the −inf-logit case: the sign opposite to every teacher row's
        x["teacher"] = [t.abs() + 0.1 for t in x["teacher"]]
        target[2, 0] = -INF if value == INF else value
    else:
        target.view(-1)[4] = value
    loss = moco_fast.dino_loss(
        x["student"], x["teacher"], x["prototypes"], x["center"], teacher_prototypes=x["teacher_prototypes"],
        backend=backend,
    )  # fmt: skip
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("value", BAD)
def test_sinkhorn_any_poisoned_score_makes_every_code_nan(value):
    scores = unit(5, 7, 1)
    scores[3, 2] = value
    for iterations in (0, 1, 3):
        assert torch.isnan(moco_fast.sinkhorn(scores, iterations, 0.05)).all()


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("crop", ["high", "low"])
def test_swav_loss_shows_a_poisoned_crop(value, crop):
    high, low = [unit(4, 6, 1), unit(4, 6, 2)], [unit(4, 6, 3)]
    (high if crop == "high" else low)[-1][1, 1] = value
    assert not torch.isfinite(moco_fast.SwaVLoss()(high, low))


@pytest.mark.parametrize("value", BAD)
def test_byol_and_cosine_poison_their_row(value):
    p, z = torch.randn(4, 8), torch.randn(4, 8)
    p[1, 3] = value
    loss = moco_fast.byol_loss(p, z, reduction="none")
    assert not torch.isfinite(loss[1]) and torch.isfinite(loss[torch.arange(4) != 1]).all()
    assert not torch.isfinite(moco_fast.NegativeCosineSimilarity()(z, p))
    assert not torch.isfinite(moco_fast.BYOLLoss()(p, z, z, p))


@TRI
@pytest.mark.parametrize("value", BAD)
def test_momentum_update_propagates_elementwise(backend, device, value):
    """The EMA is not guarded (as in MoCo): a NaN/Inf in the online weights reaches those target elements
    only — the online network is already broken then, and a guard would cost a reduction per step."""
    t, s = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    s[1, 2] = value
    moco_fast.momentum_update([t], [s], 0.9, backend=backend)
    bad = ~torch.isfinite(t)
    assert bad[1, 2] and bad.sum() == 1


# --- state: refused -----------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "device"])
def code_path(request, monkeypatch):
    """ "cpu": the flag is read at once; "device": the GPU's sync-free path (the refusal lands later)."""
    if request.param == "device":
        import moco_fast.queue as queue_module

        monkeypatch.setattr(queue_module, "_reads_are_free", lambda t: False)
    return request.param


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(before, module, skipped_key_counts):
    after = module.state_dict()
    for key, v in before.items():
        if key.endswith("num_skipped"):
            assert int(after[key]) - int(v) == skipped_key_counts, key
        else:
            assert torch.equal(after[key], v), key


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_swav_queue_refuses_every_crop_of_a_poisoned_step(code_path, mode):
    """All or nothing across crops: a NaN in crop 1 leaves crop 0's queue as it was too."""
    sq = moco_fast.SwaVQueue(2, 8, 4, on_nonfinite=mode, backend="torch")
    sq.enqueue([torch.randn(3, 4), torch.randn(3, 4)])
    before = _state(sq)
    bad = torch.randn(3, 4)
    bad[2, 1] = NAN
    if mode == "raise" and code_path == "cpu":
        with pytest.raises(NonFiniteKeysError, match="NaN or Inf"):
            sq.enqueue([torch.randn(3, 4), bad])
        _unchanged(before, sq, 0)
        return
    sq.enqueue([torch.randn(3, 4), bad])  # skip, or the device path: refused without a host read
    _unchanged(before, sq, 1)
    if mode == "raise":  # the device path raises from the next call once the count has landed
        with pytest.raises(NonFiniteKeysError):
            sq.enqueue([torch.randn(3, 4), torch.randn(3, 4)])


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_memory_bank_head_refuses_a_poisoned_batch(code_path, mode):
    """The head's loss shows the NaN; training mode's update is refused (bank unchanged)."""
    head = moco_fast.MemoryBankHead(10, 4, gather_distributed=False, on_nonfinite=mode, backend="torch")
    f, idx = torch.randn(3, 4), torch.tensor([1, 5, 7])
    f[0, 0] = NAN
    before = _state(head)
    head.eval()
    assert torch.isnan(head(f, idx))
    _unchanged(before, head, 0)
    head.train()
    if mode == "raise" and code_path == "cpu":
        with pytest.raises(NonFiniteFeaturesError):
            head(f, idx)
        _unchanged(before, head, 0)
        return
    assert torch.isnan(head(f, idx))
    _unchanged(before, head, 1)
    if mode == "raise":
        with pytest.raises(NonFiniteFeaturesError):
            head(torch.randn(3, 4), idx)


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("path", ["forward", "forward_fused", "update_center"])
def test_dino_center_refuses_a_poisoned_teacher(code_path, mode, path):
    P, b = 7, 5
    loss_fn = moco_fast.DINOLoss(P, on_nonfinite=mode)
    W = unit(P, b, 1)
    loss_fn(*([torch.randn(2, P)] * 2, [torch.randn(2, P)] * 2))  # a center that is not zero
    before = _state(loss_fn)
    if path == "forward":
        teacher = [torch.randn(2, P), torch.randn(2, P)]
        teacher[1][0, 3] = INF
        call = lambda: loss_fn(teacher, [torch.randn(2, P)] * 2)  # noqa: E731
    elif path == "forward_fused":
        teacher = [unit(2, b, 2), unit(2, b, 3)]
        teacher[0][1, 1] = NAN
        call = lambda: loss_fn.forward_fused(teacher, [unit(2, b, 4)] * 2, W)  # noqa: E731
    else:
        call = lambda: loss_fn.update_center(torch.full((2, 2, P), -INF))  # noqa: E731
    if mode == "raise" and code_path == "cpu":
        with pytest.raises(NonFiniteTeacherError, match="center was not updated"):
            call()
        _unchanged(before, loss_fn, 0)
        return
    out = call()
    assert out is None or not torch.isfinite(out)
    _unchanged(before, loss_fn, 1)
    if mode == "raise":
        with pytest.raises(NonFiniteTeacherError):
            loss_fn.check()


def test_dino_student_poison_shows_in_the_loss_and_the_center_still_updates():
    """The center depends on the teacher only: a NaN student gives a NaN loss, the (finite) center moves."""
    P = 6
    loss_fn = moco_fast.DINOLoss(P)
    student = [torch.randn(2, P), torch.randn(2, P)]
    student[1][0, 0] = NAN
    loss = loss_fn([torch.randn(2, P), torch.randn(2, P)], student)
    assert torch.isnan(loss) and torch.isfinite(loss_fn.center).all() and loss_fn.center.abs().sum() > 0
