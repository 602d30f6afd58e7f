"""moco_fast.MoCo: the official builder's constructor, (loss, stats) forward, shuffle-BN emulation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import train_dependency
from torch import nn

from moco_fast.builder import MoCo
from moco_fast.train.models import SmallCNN


def cnn(num_classes=16):
    return SmallCNN(num_classes=num_classes, in_channels=1, width=4)


def images(b=6, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


def official_step(shadow, im_q, im_k, m, T, symmetric=False):
    """The official MoCo.forward written out on a copy of the model: momentum update of the key encoder,
    keys without grad, logits [q·k, q·queue] / T against the queue before this batch, cross-entropy with
    label 0 (in float64). Symmetric: the average of (q1, k2) and (q2, k1), as MoCoHead.
    Returns (loss, logits (rows, 1 + K), the keys the step enqueues, normalized, in order).

    The update is written as the library's default arithmetic, torch.lerp(θk, θq, 1 − m), which differs
    from the official θk·m + θq·(1 − m) in the last bit only (tests/test_momentum.py holds both to their
    formula): BatchNorm over a batch of 2 would amplify that bit far beyond the tolerance here."""
    with torch.no_grad():
        for pk, pq in zip(shadow.encoder_k.parameters(), shadow.encoder_q.parameters()):
            pk.lerp_(pq, 1 - m)
    queue = shadow.queue.negatives()

    def pair(x_q, x_k):
        q = F.normalize(shadow.encoder_q(x_q), dim=1)
        with torch.no_grad():
            k = F.normalize(shadow.encoder_k(x_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / T
        return F.cross_entropy(logits.double(), torch.zeros(q.shape[0], dtype=torch.long)), logits, k

    if not symmetric:
        return pair(im_q, im_k)
    loss12, logits12, k2 = pair(im_q, im_k)  # q1 = encoder_q(im_q), k2 = encoder_k(im_k)
    loss21, logits21, k1 = pair(im_k, im_q)
    return 0.5 * (loss12 + loss21), torch.cat([logits12, logits21]), torch.cat([k1, k2])


def test_official_constructor_and_attributes():
    model = MoCo(cnn, 16, 64, 0.99, 0.1, True)  # positional, as in moco.builder.MoCo
    assert (model.K, model.m, model.T) == (64, 0.99, 0.1)
    fc = model.encoder_q.fc
    assert isinstance(fc, nn.Sequential) and isinstance(fc[0], nn.Linear) and isinstance(fc[1], nn.ReLU)
    assert fc[0].in_features == fc[0].out_features == fc[2].in_features and fc[2].out_features == 16
    q_params = dict(model.encoder_q.named_parameters())
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad
        assert torch.equal(p, q_params[name])  # the key encoder starts as a copy
        assert p.data_ptr() != q_params[name].data_ptr()
    assert model.queue.size == 64 and model.queue.dim == 16
    linear = MoCo(cnn, dim=16, K=64)
    assert isinstance(linear.encoder_q.fc, nn.Linear)


def test_forward_returns_loss_and_stats_and_enqueues():
    torch.manual_seed(0)
    model = MoCo(cnn, dim=16, K=32, m=0.9, T=0.2)
    im_q, im_k = images(6)
    loss, stats = model(im_q, im_k)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    assert 0.0 <= stats.acc1.item() <= stats.acc5.item() <= 1.0
    assert stats.rank.shape == (6,)
    assert int(model.queue.ptr) == 6 and int(model.queue.count) == 6
    loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    model.eval()  # eval: no momentum update, no enqueue
    before = model.queue.keys.clone()
    model(im_q, im_k)
    assert int(model.queue.ptr) == 6 and torch.equal(before, model.queue.keys)


def test_loss_matches_the_official_logits_and_cross_entropy():
    torch.manual_seed(1)
    model = MoCo(cnn, dim=16, K=40, m=0.99, T=0.07, mlp=True)
    for seed in range(3):  # fill part of the queue
        model(*images(8, seed))
    im_q, im_k = images(8, 10)
    shadow = copy.deepcopy(model)
    assert shadow.queue.negatives().shape == (24, 16)  # (count, dim): the 24 keys enqueued so far
    loss, stats = model(im_q, im_k)
    expected, logits, k = official_step(shadow, im_q, im_k, 0.99, 0.07)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue.keys[24:32], k, rtol=1e-6, atol=1e-7)  # enqueued after the loss
    acc1 = (logits.argmax(1) == 0).float().mean()
    torch.testing.assert_close(stats.acc1, acc1)
    # the momentum update used the same formula
    for pk, ps in zip(model.encoder_k.parameters(), shadow.encoder_k.parameters()):
        torch.testing.assert_close(pk, ps, rtol=1e-6, atol=1e-7)


def test_momentum_zero_makes_the_key_encoder_the_query_encoder():
    torch.manual_seed(2)
    model = MoCo(cnn, dim=16, K=32, m=0.0)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    for seed in range(2):
        loss, _ = model(*images(4, seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # after the steps the encoders differ; the next forward copies q into k before computing keys
    diff = [not torch.equal(a, b) for a, b in zip(model.encoder_k.parameters(), model.encoder_q.parameters())]
    assert any(diff)
    model(*images(4, 5))
    for a, b in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
        assert torch.equal(a, b)


def test_symmetric_enqueues_both_views():
    """Both views play both roles: the loss is the official average of (q1, k2) and (q2, k1), and the
    keys of view 1 then view 2 are enqueued once, after both losses."""
    torch.manual_seed(3)
    model = MoCo(cnn, dim=16, K=32, m=0.9, T=0.2, symmetric=True)
    for step, seed in enumerate((0, 1)):  # the second step has 10 negatives
        im_1, im_2 = images(5, seed)
        shadow = copy.deepcopy(model)
        loss, stats = model(im_1, im_2)
        expected, logits, keys = official_step(shadow, im_1, im_2, 0.9, 0.2, symmetric=True)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        assert stats.rank.shape == (10,)
        assert torch.equal(stats.rank, (logits[:, 1:] > logits[:, :1]).sum(1)), step
        assert int(model.queue.count) == 10 * (step + 1) and int(model.queue.ptr) == 10 * (step + 1)
        torch.testing.assert_close(model.queue.keys[10 * step : 10 * (step + 1)], keys, rtol=1e-6, atol=1e-7)
    assert loss.item() > 0


def test_bn_splits_encodes_shuffled_chunks():
    torch.manual_seed(4)
    model = MoCo(cnn, dim=16, K=64, bn_splits=2)
    x = torch.randn(8, 1, 28, 28)
    torch.manual_seed(0)
    keys = model.encode_keys(x)
    torch.manual_seed(0)
    perm = torch.randperm(8)
    # a permutation that is not its own inverse, or k[perm] and k[argsort(perm)] could not be told apart
    assert not torch.equal(perm[perm], torch.arange(8)), perm
    enc = model.encoder_k
    manual = torch.cat([enc(x[perm][:4]), enc(x[perm][4:])])[torch.argsort(perm)]
    torch.testing.assert_close(keys, manual)
    whole = enc(x)  # one BatchNorm over the whole batch gives other keys: the split is real
    assert not torch.allclose(keys, whole, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="bn_splits"):
        MoCo(cnn, dim=16, K=32, bn_splits=0)

    class NoFc(nn.Module):
        def __init__(self, num_classes=16):
            super().__init__()
            self.head = nn.Linear(4, num_classes)

    with pytest.raises(TypeError, match="fc"):
        MoCo(NoFc, dim=16, K=32, mlp=True)
    model = MoCo(cnn, dim=16, K=4)
    with pytest.raises(ValueError, match="queue"):
        model(*images(6))


def test_torchvision_resnet_as_base_encoder():
    """A torchvision ResNet-18 (BatchNorm, mlp head on its fc) gives the official loss and keys."""
    torchvision = train_dependency("torchvision")
    torch.manual_seed(5)
    model = MoCo(torchvision.models.resnet18, dim=8, K=16, m=0.99, T=0.2, mlp=True, queue_init="random")
    assert model.encoder_q.fc[0].in_features == 512 and model.encoder_q.fc[2].out_features == 8
    im_q, im_k = images(2, 1, (3, 32, 32))
    shadow = copy.deepcopy(model)
    loss, stats = model(im_q, im_k)
    expected, logits, k = official_step(shadow, im_q, im_k, 0.99, 0.2)
    assert logits.shape == (2, 17) and expected.item() > 0  # 16 random unit keys in the queue
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.rank, (logits[:, 1:] > logits[:, :1]).sum(1))
    torch.testing.assert_close(model.queue.keys[:2], k, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
