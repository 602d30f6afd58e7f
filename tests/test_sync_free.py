"""A whole MoCo step reads nothing back from the device, so it can run ahead of the GPU and be captured
in a CUDA graph: MomentumEncoder.update, MoCoHead forward (InfoNCE) and backward, and the enqueue.

On the CPU every read is free, so the code takes the CPU's shortcuts there; these tests force the
GPU code path on CPU tensors (``queue._reads_are_free`` → False, the torch backend's device enqueue)
and turn every host read of a tensor's value into an error. The GPU test captures and replays the step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moco_fast
from moco_fast import queue as queue_module
from moco_fast.torch_backend import enqueue as torch_enqueue

# Every way Python code reads a tensor's values back to the host (each is a device sync on CUDA).
_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch, host_mirrors=()):
    """Inside the block, reading a tensor's value on the host raises HostRead.

    ``host_mirrors``: tensors that stand for pinned host memory on a GPU (reading them is no device
    access), whose storage may be read.
    """
    allowed = {t.untyped_storage().data_ptr() for t in host_mirrors}

    def forbid(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() in allowed:
                return real(self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} called: a device -> host read")

        return read

    with monkeypatch.context() as patch:
        for name in _READS:
            patch.setattr(torch.Tensor, name, forbid(name))
        yield


@pytest.fixture
def device_code_path(monkeypatch):
    """Run the GPU code path on CPU tensors."""
    monkeypatch.setattr(queue_module, "_reads_are_free", lambda t: False)
    monkeypatch.setattr(torch_enqueue, "_enqueue_host_", torch_enqueue._enqueue_device_)


class Encoder(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, dim))

    def forward(self, x):
        return self.net(x)


def moco_step(online, key_encoder, head, x_q, x_k):
    key_encoder.update()
    loss = head(online(x_q), key_encoder(x_k))
    loss.backward()
    return loss


def test_the_guard_catches_reads(monkeypatch):
    """The guard is not vacuous: each kind of read raises inside it."""
    t = torch.ones(2)
    with no_host_reads(monkeypatch):
        for read in (lambda: t.sum().item(), lambda: bool(t[0]), lambda: int(t[0]), lambda: t.tolist()):
            with pytest.raises(HostRead):
                read()
    assert t.sum().item() == 2.0  # restored


def test_the_cpu_code_path_does_read(monkeypatch):
    """Without the device path, the enqueue reads its verdict (free on a CPU): the test below would fail."""
    q = moco_fast.KeyQueue(64, 8, init="random")
    with no_host_reads(monkeypatch), pytest.raises(HostRead):
        q.enqueue(torch.randn(4, 8))


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_step_reads_nothing_back(monkeypatch, device_code_path, symmetric):
    torch.manual_seed(0)
    online = Encoder()
    key_encoder = moco_fast.MomentumEncoder(online, momentum=0.99)
    head = moco_fast.MoCoHead(16, 64, 0.2, queue_init="random", symmetric=symmetric, backend="torch")
    x_q, x_k = torch.randn(8, 12), torch.randn(8, 12)

    def step():
        if not symmetric:
            return moco_step(online, key_encoder, head, x_q, x_k)
        key_encoder.update()
        head(online(x_q), online(x_k), key_encoder(x_q), key_encoder(x_k)).backward()

    step()  # first call: builds the plans, selects the backends, creates the refusal watcher
    ptr_before = head.queue.ptr.clone()
    with no_host_reads(monkeypatch, host_mirrors=[head.queue._watcher.mirror]):
        for _ in range(3):
            step()
    per_step = 16 if symmetric else 8
    assert int(head.queue.ptr) == (int(ptr_before) + 3 * per_step) % 64
    assert head.last_stats.acc1.shape == ()


def test_refused_batch_raises_at_the_next_enqueue_naming_it(device_code_path):
    q = moco_fast.KeyQueue(32, 8)
    good = F.normalize(torch.randn(4, 8), dim=1)
    q.enqueue(good)
    before = {name: b.clone() for name, b in q.named_buffers()}
    bad = good.clone()
    bad[2, 3] = float("nan")
    q.enqueue(bad)  # refused on the device, no error yet (no host read)
    assert torch.equal(q.keys, before["keys"]) and torch.equal(q.ptr, before["ptr"])
    assert torch.equal(q.count, before["count"])
    assert int(q.num_skipped) == 1
    with pytest.raises(moco_fast.NonFiniteKeysError, match="enqueue call #2"):
        q.enqueue(good)
    # the failing call wrote nothing either; the queue keeps working afterwards
    assert torch.equal(q.keys, before["keys"]) and int(q.count) == 4
    q.enqueue(good)
    assert int(q.count) == 8 and q.filled == 8


def test_check_raises_a_refusal_at_once(device_code_path):
    q = moco_fast.KeyQueue(32, 8)
    q.enqueue(torch.full((2, 8), float("inf")))
    with pytest.raises(moco_fast.NonFiniteKeysError):
        q.check()
    q.check()  # reported once
    q.enqueue(torch.randn(2, 8))
    assert int(q.count) == 2


def test_skip_mode_on_the_device_path_counts_without_raising(device_code_path):
    q = moco_fast.KeyQueue(32, 8, on_nonfinite="skip")
    q.enqueue(torch.full((2, 8), float("nan")))
    q.enqueue(torch.randn(3, 8))
    q.check()  # skip mode never raises
    assert int(q.num_skipped) == 1 and q.filled == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_moco_step_captures_and_replays_in_a_cuda_graph(backend):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    online = Encoder().to(dev)
    key_encoder = moco_fast.MomentumEncoder(online, momentum=0.99, backend=backend)
    head = moco_fast.MoCoHead(16, 256, 0.2, queue_init="random", backend=backend).to(dev)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    static_q, static_k = torch.randn(8, 12, device=dev), torch.randn(8, 12, device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = moco_step(online, key_encoder, head, static_q, static_k)
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: plans, backend choices, Triton compilation
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    ptr = int(head.queue.ptr)
    eager_losses = []
    for _ in range(4):
        static_q.copy_(torch.randn(8, 12, device=dev))
        graph.replay()
        eager_losses.append(static_loss.clone())
    torch.cuda.synchronize()
    assert int(head.queue.ptr) == (ptr + 4 * 8) % 256  # every replay enqueued its keys
    assert all(torch.isfinite(x).all() for x in eager_losses)
    head.queue.check()
