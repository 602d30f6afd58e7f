"""Self-supervised methods the trainer can run: ``--method NAME`` picks one from :data:`METHODS`.

A method is a :class:`Method`: how to build its model from the configuration and the checks it needs
once the global batch is known (its presets live with the others in ``config.PRESETS``, each naming its
``method``; ``config.DEFAULT_PRESET`` maps (method, dataset kind) to the preset used when none is given).
Its model is an ``nn.Module`` that

* takes the list of augmented views of one batch, ``model(views)`` (two views today; a multi-crop
  method gets its crops), and returns ``(loss, stats)`` — the scalar loss to minimize and a dict of
  0-dim tensors to log (e.g. ``acc1``, ``acc5``), the same keys every step;
* exposes its online encoder as ``encoder_q`` (the kNN monitor's features: the backbone before
  ``fc``, or the whole encoder);
* optionally has a ``momentum_encoder`` (a :class:`moco_fast.MomentumEncoder`) whose momentum is logged;
* with ``Method.needs_indices``, takes ``model(views, indices)`` (the images' training-set indices).

The optimizer trains every parameter with ``requires_grad`` (momentum copies have none).
Adding a method: a module here defining ``METHOD = Method(...)``, imported below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    #: (cfg, in_channels, total_steps) -> the model
    build: Callable[..., nn.Module]
    #: (cfg, global_batch) -> None, raising ConfigError; runs once the world size is known
    check: Callable[..., None] = lambda cfg, global_batch: None
    # --- NT-Xent / MoCo v3 / CMC / memory bank
    #: the model takes ``model(views, indices)`` (each image's training-set index, e.g. a memory bank's
    #: rows) and ``build`` gets ``num_samples=`` (the training-set size)
    needs_indices: bool = False


def _registry() -> dict[str, Method]:
    from . import moco

    methods = [moco.METHOD]
    # --- NT-Xent / MoCo v3 / CMC / memory bank
    from . import instdisc, mocov3, simclr

    methods += [simclr.METHOD, mocov3.METHOD, instdisc.METHOD]
    # --- BYOL / SwAV / DINO
    from . import byol, dino, swav

    methods += [byol.METHOD, swav.METHOD, dino.METHOD]
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()
