"""``MoCo``: the official MoCo builder's constructor on top of MoCoHead and MomentumEncoder.

Code written against facebookresearch/moco's ``moco.builder.MoCo`` switches by changing one import::

    model = moco_fast.MoCo(torchvision.models.resnet50, dim=128, K=65536, m=0.999, T=0.07, mlp=False)
    loss, stats = model(im_q, im_k)          # NOT (logits, labels): see MoCo.forward

Differences from the official module (all deliberate):

* ``forward`` returns ``(loss, stats)`` — the InfoNCE loss (fp32 scalar) and an
  :class:`moco_fast.InfoNCEStats` (acc@1, acc@5, rank, lse) — instead of ``(logits, labels)``:
  the B×(K+1) logits are never materialized, so there is no ``criterion(output, target)`` step.
* The queue is a :class:`moco_fast.KeyQueue` (``model.queue``) of shape (K, dim) that starts empty
  (``queue_init="random"`` gives the official random unit keys) and accepts any batch size ≤ K.
* The key encoder is a :class:`moco_fast.MomentumEncoder` (``model.momentum_encoder``; its network is
  ``model.encoder_k``) whose update is one fused call instead of a Python loop over parameters.
* Shuffle-BN: under torch.distributed the key batch is shuffled across ranks (as in the official
  code); in a single process ``bn_splits > 1`` emulates it — the key batch is randomly permuted,
  encoded in ``bn_splits`` chunks (each with its own BatchNorm statistics, like ``bn_splits`` GPUs)
  and un-permuted. With ``bn_splits=1`` and one process the key encoder sees the whole batch.
* ``with model.accumulate():`` runs one optimizer step as several micro-batches that give exactly the
  loss, gradients, key encoder and queue of one large batch (the official code does not: it updates and
  enqueues at every forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .distributed import batch_shuffle_ddp, batch_unshuffle_ddp, is_distributed
from .functional import InfoNCEStats
from .head import MoCoHead
from .momentum import MomentumEncoder


class MoCo(nn.Module):
    """MoCo with a query encoder, a momentum key encoder and a queue of keys.

    Args (the official ones):
        base_encoder: a callable ``base_encoder(num_classes=dim)`` returning an nn.Module whose last
            layer is a Linear named ``fc`` (torchvision ResNets, ``moco_fast.train.models``).
        dim: feature dimension (default 128).
        K: queue size, number of negative keys (default 65536).
        m: momentum of the key encoder update (default 0.999).
        T: softmax temperature (default 0.07).
        mlp: replace ``fc`` by a 2-layer MLP head ending in the original ``fc`` (MoCo v2).

    Keyword-only extras:
        symmetric: ``forward(im_1, im_2)`` computes the symmetrized loss (MoCo CIFAR demo / v3 style).
        bn_splits: single-process shuffle-BN emulation, see the module docstring (1 = off).
        momentum_schedule, final_momentum, total_steps: see :class:`moco_fast.MomentumEncoder`.
        queue_dtype, queue_init, gather_distributed, backend: see :class:`moco_fast.MoCoHead`.
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        symmetric: bool = False,
        bn_splits: int = 1,
        momentum_schedule: str | None = None,
        final_momentum: float = 1.0,
        total_steps: int | None = None,
        queue_dtype: torch.dtype | None = None,
        queue_init: str = "empty",
        gather_distributed: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(bn_splits, bool) or not isinstance(bn_splits, int) or bn_splits < 1:
            raise ValueError(f"bn_splits must be a positive int, got {bn_splits!r}")
        self.K, self.m, self.T = K, m, T
        self.bn_splits = bn_splits
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            fc = getattr(self.encoder_q, "fc", None)
            if not isinstance(fc, nn.Linear):
                raise TypeError("mlp=True needs an encoder whose last layer is an nn.Linear named 'fc'")
            dim_mlp = fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), fc)
        self.momentum_encoder = MomentumEncoder(
            self.encoder_q,
            m,
            schedule=momentum_schedule,
            final_momentum=final_momentum,
            total_steps=total_steps,
            backend=backend,
        )
        self._updates_left = -1  # momentum updates still allowed in this step (-1: every forward, no limit)
        self.head = MoCoHead(
            dim,
            K,
            T,
            queue_dtype=queue_dtype,
            symmetric=symmetric,
            gather_distributed=gather_distributed,
            backend=backend,
            queue_init=queue_init,
        )

    @property
    def encoder_k(self) -> nn.Module:
        """The key encoder network (the momentum copy of ``encoder_q``)."""
        return self.momentum_encoder.module

    @property
    def queue(self):
        """The :class:`moco_fast.KeyQueue` of negatives: ``queue.keys`` (K, dim), ``queue.ptr``."""
        return self.head.queue

    @property
    def symmetric(self) -> bool:
        return self.head.symmetric

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> float:
        return self.momentum_encoder.update()

    @torch.no_grad()
    def encode_keys(self, im_k: Tensor) -> Tensor:
        """Key features of ``im_k`` with shuffle-BN (across ranks under DDP, emulated with bn_splits)."""
        if is_distributed():
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            k = self._split_forward(im_k)
            return batch_unshuffle_ddp(k, idx_unshuffle)
        if self.bn_splits > 1 and im_k.shape[0] > 1:
            perm = torch.randperm(im_k.shape[0], device=im_k.device)
            k = self._split_forward(im_k[perm])
            return k[torch.argsort(perm)]
        return self.encoder_k(im_k)

    def _split_forward(self, x: Tensor) -> Tensor:
        if self.bn_splits == 1 or x.shape[0] < 2:
            return self.encoder_k(x)
        return torch.cat([self.encoder_k(c) for c in x.chunk(self.bn_splits)])

    def forward(self, im_q: Tensor, im_k: Tensor) -> tuple[Tensor, InfoNCEStats]:
        """One MoCo step's loss.

        Input: im_q, im_k — two augmented views of the same batch (with ``symmetric=True``, both
        views play both roles). Output: ``(loss, stats)`` — the InfoNCE loss (fp32 scalar; call
        ``loss.backward()``) and :class:`moco_fast.InfoNCEStats` — *not* the official
        ``(logits, labels)`` pair. In training mode the key encoder is momentum-updated first and the
        keys are enqueued after the loss is computed (the official order).
        """
        if self.training and self._updates_left != 0:
            self._momentum_update_key_encoder()
            if self._updates_left > 0:
                self._updates_left -= 1
        if self.head.symmetric:
            q1, q2 = self.encoder_q(im_q), self.encoder_q(im_k)
            k1, k2 = self.encode_keys(im_q), self.encode_keys(im_k)
            return self.head(q1, q2, k1, k2, return_stats=True)
        q = self.encoder_q(im_q)
        k = self.encode_keys(im_k)
        return self.head(q, k, return_stats=True)

    @contextlib.contextmanager
    def accumulate(self):
        """One optimizer step of micro-batches, exactly as one large batch: the key encoder moves once (at
        the first forward inside), every forward sees the same queue, and all keys are enqueued at the end
        (see :meth:`MoCoHead.accumulate`). Divide each micro-batch's loss by their number."""
        with self.head.accumulate():
            self._updates_left = 1
            try:
                yield self
            finally:
                self._updates_left = -1

    def extra_repr(self) -> str:
        return f"K={self.K}, m={self.m}, T={self.T}, bn_splits={self.bn_splits}"
