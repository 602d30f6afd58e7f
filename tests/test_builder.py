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


def images(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randn(b, 1, 28, 28, generator=g)


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
    loss, stats = model(im_q, im_k)
    # The official MoCo.forward, written out: momentum update, keys, logits, cross-entropy with label 0.
    with torch.no_grad():
        for pk, pq in zip(shadow.encoder_k.parameters(), shadow.encoder_q.parameters()):
            pk.mul_(0.99).add_(pq, alpha=0.01)
        k = F.normalize(shadow.encoder_k(im_k), dim=1)
    q = F.normalize(shadow.encoder_q(im_q), dim=1)
    queue = shadow.queue.negatives()  # (count, dim): the 24 keys enqueued so far
    assert queue.shape == (24, 16)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.07
    expected = F.cross_entropy(logits.double(), torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
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
    torch.manual_seed(3)
    model = MoCo(cnn, dim=16, K=32, symmetric=True)
    loss, stats = model(*images(5))
    assert torch.isfinite(loss) and stats.rank.shape == (10,)
    assert int(model.queue.count) == 10


def test_bn_splits_encodes_shuffled_chunks():
    torch.manual_seed(4)
    model = MoCo(cnn, dim=16, K=64, bn_splits=2)
    x = torch.randn(8, 1, 28, 28)
    torch.manual_seed(123)
    keys = model.encode_keys(x)
    torch.manual_seed(123)
    perm = torch.randperm(8)
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
    torchvision = train_dependency("torchvision")
    torch.manual_seed(5)
    model = MoCo(torchvision.models.resnet18, dim=8, K=16, mlp=True)
    loss, _ = model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)
    assert model.encoder_q.fc[0].in_features == 512
