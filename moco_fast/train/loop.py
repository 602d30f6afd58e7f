"""The training loop: a thin layer over the method's model (``--method``, see ``methods/``; MoCo by
default: :class:`moco_fast.MoCo` = MoCoHead + MomentumEncoder + KeyQueue).

``train(config)`` runs one job end to end — in one process, or in each process of
``torchrun --nproc_per_node N`` (DDP: gloo on CPU, nccl on GPU) — and returns a summary dict.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import metrics as metrics_io
from .augment import AugmentConfig
from .config import ConfigError, TrainConfig, config_json, dataset_kind
from .data import Order, cifar10_source, image_folder_source, mnist5k_source
from .knn import extract, knn_accuracy
from .methods import METHODS
from .models import backbone_features, count_parameters

SPLIT_SEED = 0  # the MNIST-5k train/held-out split is fixed, whatever --seed is


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialized the process group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device and process group. Under torchrun (WORLD_SIZE > 1) joins the group: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available")
    if want == "cuda":
        want = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
    device = torch.device(want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return Runtime(rank, world, local_rank, device, owns)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def build_source(cfg: TrainConfig):
    kind = dataset_kind(cfg)
    if kind == "mnist":
        aug = AugmentConfig(
            size=28,
            crop_scale=(cfg.crop_min, 1.0),
            rotation=cfg.rotation,
            shear=cfg.shear,
            blur_prob=cfg.blur_prob,
            blur_sigma=(0.1, max(0.1, cfg.blur_sigma)),
            brightness=cfg.brightness,
            contrast=cfg.contrast,
            erase_prob=cfg.erase_prob,
        )
        if not 0 < cfg.held_out < 5000:
            raise ConfigError(f"held_out must be in (0, 5000) for MNIST-5k, got {cfg.held_out}")
        local = dataclasses.replace(aug, size=local_size(cfg, 28), crop_scale=(cfg.local_crop_min, cfg.local_crop_max))
        return mnist5k_source(
            cfg.held_out, SPLIT_SEED, aug, limit_train=cfg.limit_train, local_augment=local, num_local=cfg.local_crops
        )
    multicrop = dict(local_crops=cfg.local_crops, local_scale=(cfg.local_crop_min, cfg.local_crop_max))
    if kind == "cifar10":
        return cifar10_source(
            cfg.cifar10,
            version=cfg.aug,
            crop_min=cfg.crop_min,
            blur_prob=cfg.blur_prob,
            workers=cfg.workers,
            local_size=local_size(cfg, 32),
            **multicrop,
        )
    size = 224 if cfg.model == "resnet50" else 32 if cfg.model == "resnet18" else 28
    return image_folder_source(
        cfg.data,
        version=cfg.aug,
        size=size,
        crop_min=cfg.crop_min,
        blur_prob=cfg.blur_prob,
        held_out_fraction=cfg.held_out_fraction,
        seed=SPLIT_SEED,
        workers=cfg.workers,
        local_size=local_size(cfg, size),
        **multicrop,
    )


def local_size(cfg: TrainConfig, size: int) -> int:
    """Multi-crop: the side of the local crops (--local-size, or 3/7 of the global side: 96 for 224)."""
    return cfg.local_size or max(8, round(size * 3 / 7))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """lr multiplier per optimizer step: linear warm-up, then cosine / step / constant."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = [int(round(f * total_steps)) for f in cfg.lr_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            t = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if cfg.lr_schedule == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 1.0

    return factor


class _Meters:
    """Running sums of the current epoch's loss and stats (part of the checkpoint, so a resumed epoch
    logs the same means). Keys: "loss" and the method's stats, in the order first seen."""

    def __init__(self, state: dict | None = None):
        self.sums = dict(state["sums"]) if state else {}
        self.count = int(state["count"]) if state else 0
        self.seconds = float(state["seconds"]) if state else 0.0

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict:
        n = max(self.count, 1)
        return {k: v / n for k, v in self.sums.items()}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count, "seconds": self.seconds}


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.rt = setup_runtime(cfg)
        rt = self.rt
        self.t_start = time.perf_counter()
        self.source = build_source(cfg)
        self.order = Order(self.source.num_train, cfg.batch_size, rt.world, rt.rank, cfg.seed)
        global_batch = self.order.global_batch
        self.method = METHODS[cfg.method]
        self.method.check(cfg, global_batch)
        if self.order.steps_per_epoch < 1:
            raise ConfigError(
                f"the global batch {global_batch} is larger than the training set ({self.source.num_train})"
            )
        if cfg.method == "moco" and cfg.queue_size > self.source.num_train and rt.main and not cfg.quiet:
            print(
                f"note: queue_size {cfg.queue_size} > {self.source.num_train} training images: the queue will hold "
                "several keys of the same image",
                file=sys.stderr,
            )
        self.steps_per_epoch = self.order.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        build_kw = {"num_samples": self.source.num_train} if self.method.needs_indices else {}
        self.model = self.method.build(cfg, self.source.in_channels, self.total_steps, **build_kw).to(rt.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if rt.distributed:
            # Buffers are not broadcast: every rank's queue is built by its own all-gather (and the
            # test checks that they agree), so re-sending K x dim keys every step would hide bugs.
            ddp = torch.nn.parallel.DistributedDataParallel
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else {"broadcast_buffers": False}
            )
            self.net = ddp(self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, **no_sync)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # momentum copies have none
        self.optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg, self.steps_per_epoch, self.total_steps)
        )
        self.autocast = (lambda: torch.autocast(rt.device.type, dtype=torch.bfloat16)) if cfg.amp else nullcontext
        self.out = cfg.out
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.meters = _Meters()
        self.history: list[dict] = []
        self.baselines: dict = {}
        self.elapsed_before = 0.0  # wall time of the run before a resume
        self.resumed_from = None
        if rt.main:  # a run killed mid-write leaves temporary files: the published checkpoint is intact
            for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "config.json"):
                ckpt_io.remove_stale_temporaries(os.path.join(cfg.out, name))
        if cfg.resume:
            self._resume(cfg.resume)

    # -------------------------------------------------------------- checkpoints

    def _gather_rng(self) -> list:
        state = ckpt_io.rng_state()
        if not self.rt.distributed:
            return [state]
        states = [None] * self.rt.world
        dist.all_gather_object(states, state)
        return states

    def save(self) -> None:
        rng = self._gather_rng()  # collective: every rank takes part
        if self.rt.main:
            ckpt_io.atomic_save(
                {
                    "format": ckpt_io.FORMAT_VERSION,
                    "config": self.cfg.to_dict(),
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "epoch": self.epoch,
                    "step_in_epoch": self.step_in_epoch,
                    "global_step": self.global_step,
                    "meters": self.meters.state(),
                    "history": self.history,
                    "baselines": self.baselines,
                    "elapsed": self.elapsed(),
                    "world_size": self.rt.world,
                    "rng": rng,
                },
                self.ckpt_path,
            )
        if self.rt.distributed:
            dist.barrier()

    def _resume(self, path: str) -> None:
        if path == "auto":
            path = self.ckpt_path
            if not os.path.isfile(path):
                return  # nothing to resume: start fresh
        state = ckpt_io.load(path, map_location=self.rt.device)
        if state["world_size"] != self.rt.world:
            raise ConfigError(
                f"{path} was written by {state['world_size']} process(es); resume with as many "
                f"(now {self.rt.world}) to continue exactly"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"{path} does not match this configuration (model, queue or optimizer differ): "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.meters = _Meters(state["meters"])
        self.history, self.baselines = state["history"], state["baselines"]
        self.elapsed_before = state["elapsed"]
        ckpt_io.set_rng_state(state["rng"][self.rt.rank])
        self.resumed_from = path

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def knn(self) -> float:
        cfg, model, dev = self.cfg, self.model, self.rt.device
        encoder = model.encoder_q
        was_training = model.training
        model.eval()

        def features(x):
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                return backbone_features(encoder, x) if cfg.knn_features == "backbone" else encoder(x)

        bank = extract(features, self.source.eval_batches("train", dev), dev)
        test = extract(features, self.source.eval_batches("test", dev), dev)
        model.train(was_training)
        return knn_accuracy(*bank, *test, self.source.num_classes, cfg.knn_k, cfg.knn_t)

    def raw_pixel_knn(self) -> float | None:
        try:
            bank, test = self.source.raw("train"), self.source.raw("test")
        except NotImplementedError:
            return None
        return knn_accuracy(*bank, *test, self.source.num_classes, self.cfg.knn_k, self.cfg.knn_t)

    # -------------------------------------------------------------- logging

    def _show_bars(self) -> bool:
        return self.rt.main and not self.cfg.quiet and sys.stderr.isatty()

    def _log(self, msg: str) -> None:
        if self.rt.main and not self.cfg.quiet:
            print(msg, flush=True)

    def _write_logs(self) -> None:
        if not self.rt.main:
            return
        metrics_io.write_csv(self.history, os.path.join(self.out, "metrics.csv"))
        metrics_io.write_json(self.summary(), os.path.join(self.out, "metrics.json"))
        if self.cfg.plot:
            cfg = self.cfg
            title = f"{cfg.preset} ({cfg.method}) on {self.source.name}: {cfg.model}, T={cfg.temperature}"
            if cfg.method == "moco":
                title += f", K={cfg.queue_size}, m={cfg.momentum}"
            base = {
                "random init": self.baselines.get("knn_random_init"),
                "raw pixels": self.baselines.get("knn_raw_pixels"),
            }
            metrics_io.plot(self.history, os.path.join(self.out, "plot.png"), title, base)

    def summary(self) -> dict:
        knn_rows = [r for r in self.history if r.get("knn") is not None and math.isfinite(r["knn"])]
        return {
            "config": self.cfg.to_dict(),
            "dataset": self.source.name,
            "num_train": self.source.num_train,
            "world_size": self.rt.world,
            "device": str(self.rt.device),
            "threads": torch.get_num_threads(),
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.global_step,
            "epochs_done": self.epoch,
            "finished": self.epoch >= self.cfg.epochs,
            "baselines": self.baselines,
            "final_knn": knn_rows[-1]["knn"] if knn_rows else None,
            "best_knn": max((r["knn"] for r in knn_rows), default=None),
            "elapsed_s": self.elapsed(),
            "resumed_from": self.resumed_from,
            "history": self.history,
        }

    # -------------------------------------------------------------- training

    def _epoch_end(self, epoch_seconds: float) -> None:
        cfg = self.cfg
        means = self.meters.means()
        if self.rt.distributed:  # average the epoch means over ranks (every rank logs the same keys)
            names = list(means)
            t = torch.tensor([means[n] for n in names], dtype=torch.float64, device=self.rt.device)
            dist.all_reduce(t)
            means = dict(zip(names, (t / self.rt.world).tolist()))
        self.epoch += 1
        self.step_in_epoch = 0
        knn = float("nan")
        if self.epoch % cfg.knn_every == 0 or self.epoch == cfg.epochs:
            if self.rt.main:
                knn = self.knn()
            if self.rt.distributed:
                dist.barrier()
        row = {
            "epoch": self.epoch,
            "step": self.global_step,
            **means,
            "lr": self.optimizer.param_groups[0]["lr"],
            "momentum": _momentum(self.model),
            "knn": knn,
            "epoch_s": epoch_seconds,
            "elapsed_s": self.elapsed(),
        }
        self.history.append(row)
        self.meters = _Meters()
        knn_text = f"  knn {knn:.4f}" if math.isfinite(knn) else ""
        acc_text = f"  acc@1 {means['acc1']:.3f}" if "acc1" in means else ""
        self._log(
            f"epoch {self.epoch}/{cfg.epochs}  loss {means['loss']:.4f}{acc_text}  "
            f"lr {row['lr']:.4g}{knn_text}  ({epoch_seconds:.1f} s, total {row['elapsed_s']:.0f} s)"
        )

    def _train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; False if stopped by max_steps."""
        cfg = self.cfg
        start = self.step_in_epoch
        bar = None
        if self._show_bars():
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                initial=start,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        seconds_before = self.meters.seconds
        try:
            indexed = self.method.needs_indices
            for step, *views in self.source.views(self.order, self.epoch, start, self.rt.device, with_indices=indexed):
                extra = [views.pop(0)] if indexed else []  # the images' training-set indices
                if cfg.channels_last:
                    views = [x.contiguous(memory_format=torch.channels_last) for x in views]
                with self.autocast():
                    loss, stats = self.net(views, *extra)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                loss_v = loss.item()
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"the loss is {loss_v} at step {self.global_step}; lower --lr or use fp32")
                self.meters.add({"loss": loss_v, **{name: float(v) for name, v in stats.items()}})
                self.global_step += 1
                self.step_in_epoch = step + 1
                self.meters.seconds = seconds_before + time.perf_counter() - t0
                if bar is not None:
                    shown = {name: f"{float(v):.3f}" for name, v in stats.items() if name == "acc1"}
                    bar.set_postfix(loss=f"{loss_v:.3f}", **shown, lr=f"{lr:.3g}", refresh=False)
                    bar.update(1)
                last_of_epoch = self.step_in_epoch == self.steps_per_epoch
                if cfg.save_every and self.global_step % cfg.save_every == 0 and not last_of_epoch:
                    self.save()
                if cfg.max_steps and self.global_step >= cfg.max_steps and not last_of_epoch:
                    self.save()
                    return False
        finally:
            if bar is not None:
                bar.close()
        self._epoch_end(self.meters.seconds)
        return True

    def run(self) -> dict:
        cfg, rt = self.cfg, self.rt
        if rt.main and not cfg.quiet:
            where = f"{rt.world} processes" if rt.distributed else f"1 process, {torch.get_num_threads()} threads"
            print(
                f"moco_fast.train: {cfg.method}, preset {cfg.preset}, {self.source.name} ({self.source.num_train} "
                f"train), {cfg.model} ({count_parameters(self.model.encoder_q) / 1e6:.2f} M params), {cfg.epochs} "
                f"epochs x {self.steps_per_epoch} steps, global batch {self.order.global_batch}, "
                + (f"K {cfg.queue_size}, m {cfg.momentum}, " if cfg.method == "moco" else "")
                + f"T {cfg.temperature}, on {rt.device} ({where})"
                + (f", resumed from {self.resumed_from} at step {self.global_step}" if self.resumed_from else ""),
                flush=True,
            )
        if rt.main:
            os.makedirs(self.out, exist_ok=True)
            ckpt_io.atomic_write_text(config_json(cfg) + "\n", os.path.join(self.out, "config.json"))
        if not self.history:  # a fresh run: the baselines and the random-init encoder's kNN (epoch 0)
            if rt.main:
                self.baselines["knn_raw_pixels"] = self.raw_pixel_knn()
                self.baselines["knn_random_init"] = self.knn()
                self._log(
                    f"kNN (k={cfg.knn_k}, t={cfg.knn_t}) on held-out: random-init encoder "
                    f"{self.baselines['knn_random_init']:.4f}"
                    + (
                        f", raw pixels {self.baselines['knn_raw_pixels']:.4f}"
                        if self.baselines["knn_raw_pixels"] is not None
                        else ""
                    )
                )
            if rt.distributed:
                dist.barrier()
            self.history.append(
                {
                    "epoch": 0,
                    "step": 0,
                    "knn": self.baselines.get("knn_random_init", float("nan")),
                    "elapsed_s": self.elapsed(),
                }
            )
        self.model.train()
        stopped = bool(cfg.max_steps and self.global_step >= cfg.max_steps and self.epoch < cfg.epochs)
        while self.epoch < cfg.epochs and not stopped:
            if not self._train_epoch():
                stopped = True
                break
            self._write_logs()
            self.save()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                stopped = self.epoch < cfg.epochs
                break
        self._write_logs()
        result = self.summary()
        if rt.main and not cfg.quiet:
            if stopped:
                print(f"stopped at step {self.global_step} (--max-steps); continue with --resume {self.ckpt_path}")
            else:
                b = self.baselines
                print(
                    f"done in {result['elapsed_s']:.0f} s: held-out kNN top-1 {result['final_knn']:.4f} "
                    f"(random init {b.get('knn_random_init', float('nan')):.4f}"
                    + (f", raw pixels {b['knn_raw_pixels']:.4f}" if b.get("knn_raw_pixels") is not None else "")
                    + f"); logs in {self.out}"
                )
        return result

    def close(self) -> None:
        if self.rt.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _momentum(model) -> float | None:
    encoder = getattr(model, "momentum_encoder", None)
    return None if encoder is None else encoder.momentum


def train(cfg: TrainConfig) -> dict:
    """Run one training job described by ``cfg``; returns the summary written to OUT/metrics.json."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
