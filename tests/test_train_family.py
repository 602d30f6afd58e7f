"""The trainer's BYOL, SwAV and DINO methods: presets, multi-crop views, tiny runs, exact resume, DDP.

Every run is tiny (96 MNIST-5k images, a 4-channel CNN, 1 thread), as in test_train.py.
"""

import os

import pytest
import torch
from conftest import train_dependency

for _name in ("torchvision", "mlxtend", "matplotlib", "tqdm"):
    train_dependency(_name)

from conftest import free_port  # noqa: E402
from test_train import TINY, _assert_same_run, _final_state  # noqa: E402

from moco_fast.train import PRESETS, ConfigError, resolve, train  # noqa: E402
from moco_fast.train.augment import AugmentConfig  # noqa: E402
from moco_fast.train.data import Order, mnist5k_source  # noqa: E402

FAMILY = dict(TINY, hidden_dim=32, prototypes=24, bottleneck_dim=8, dim=16, local_size=14, local_crops=2)


def tiny(tmp_path, name, **kw):
    return resolve({**FAMILY, "out": str(tmp_path / name), **kw})


def test_presets_name_their_methods():
    for method in ("byol", "swav", "dino"):
        cfg = resolve({"method": method})
        assert cfg.preset == f"{method}-mnist" and cfg.method == method and PRESETS[cfg.preset]["method"] == method
    assert resolve({"method": "swav"}).local_crops == 4 and resolve({"method": "dino"}).local_size == 14
    assert resolve({"method": "byol"}).momentum_schedule == "cosine"
    with pytest.raises(ConfigError, match="is for method 'swav'"):
        resolve({"preset": "swav-mnist", "method": "dino"})
    with pytest.raises(ConfigError, match="local_crop_min"):
        resolve({"method": "swav", "local_crop_min": 0.7, "local_crop_max": 0.5})
    with pytest.raises(ConfigError, match="prototypes must be a positive int"):
        resolve({"method": "dino", "prototypes": 0})


def test_multicrop_views_extend_the_two_view_source():
    """2 global views + N local crops per step; the global views are those of the two-view source (MoCo's)."""
    aug = AugmentConfig(size=28)
    local = AugmentConfig(size=14, crop_scale=(0.2, 0.6))
    two = mnist5k_source(100, 0, aug, limit_train=64)
    multi = mnist5k_source(100, 0, aug, limit_train=64, local_augment=local, num_local=3)
    order = Order(64, 8)
    (s2, *v2), (s6, *v6) = (
        next(two.views(order, 0, 0, torch.device("cpu"))),
        next(multi.views(order, 0, 0, torch.device("cpu"))),
    )
    assert s2 == s6 == 0 and len(v2) == 2 and len(v6) == 5
    assert all(torch.equal(a, b) for a, b in zip(v2, v6[:2]))
    assert [tuple(v.shape) for v in v6] == [(8, 1, 28, 28)] * 2 + [(8, 1, 14, 14)] * 3


@pytest.mark.parametrize(
    "method,kw",
    [
        ("byol", {}),
        ("swav", dict(swav_queue_size=32, swav_queue_start_epoch=1, freeze_prototypes_steps=3)),
        ("dino", dict(warmup_teacher_temp_epochs=2, warmup_teacher_temp=0.02, freeze_last_layer=1)),
    ],
)
def test_tiny_runs(tmp_path, method, kw):
    summary = train(tiny(tmp_path, method, method=method, **kw))
    assert summary["finished"] and summary["global_step"] == 12
    rows = summary["history"]
    assert all(r["loss"] > 0 for r in rows[1:]) and 0.0 <= rows[-1]["knn"] <= 1.0
    if method == "swav":
        assert rows[1]["queue"] == 0.0 and rows[2]["queue"] > 0.0  # the queue joins in epoch 2, once full


def test_dino_fused_trains_like_the_logits_path(tmp_path):
    """--dino-fused true/false: the same model, loss and updates up to rounding."""
    a = train(tiny(tmp_path, "fused", method="dino", epochs=1, dino_fused=True))
    b = train(tiny(tmp_path, "plain", method="dino", epochs=1, dino_fused=False))
    la, lb = a["history"][-1]["loss"], b["history"][-1]["loss"]
    assert abs(la - lb) < 1e-4 * abs(lb)
    ca = _final_state(tmp_path / "fused" / "checkpoint.pt")["model"]
    cb = _final_state(tmp_path / "plain" / "checkpoint.pt")["model"]
    assert torch.allclose(ca["criterion.center"], cb["criterion.center"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["swav", "dino"])
def test_resume_continues_exactly(tmp_path, method):
    """The step counter, the SwAV queue and the DINO center are in the checkpoint: a run stopped mid-epoch
    and resumed ends bit-identical to an uninterrupted one."""
    kw = dict(method=method, save_every=2, swav_queue_size=32, swav_queue_start_epoch=1, freeze_last_layer=1)
    train(tiny(tmp_path, "full", **kw))
    first = train(tiny(tmp_path, "parts", max_steps=8, **kw))
    assert not first["finished"]
    train(tiny(tmp_path, "parts", resume="auto", **kw))
    full, parts = _final_state(tmp_path / "full" / "checkpoint.pt"), _final_state(tmp_path / "parts" / "checkpoint.pt")
    _assert_same_run(full, parts)
    assert full["model"]["_extra_state"] == {"step": 12}
    if method == "swav":
        assert int(full["model"]["queue.queues.0.count"]) == 32
    else:
        assert full["model"]["criterion.center"].abs().sum() > 0


def _ddp_worker(rank, world, port, out, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    from moco_fast.train.config import resolve as resolve_
    from moco_fast.train.loop import Trainer

    trainer = Trainer(resolve_(overrides))
    try:
        trainer.run()
        m = trainer.model
        torch.save(
            {"center": m.criterion.center.clone(), "params": [p.detach().clone() for p in m.parameters()]},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        trainer.close()


def test_dino_two_processes_share_the_center(tmp_path):
    import torch.multiprocessing as mp

    overrides = {**FAMILY, "method": "dino", "out": str(tmp_path / "ddp"), "batch_size": 8, "max_steps": 3, "epochs": 1}
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["center"], r1["center"]) and r0["center"].abs().sum() > 0  # all-reduced
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_image_folder_multicrop(tmp_path):
    """--data DIR with multi-crop: the torchvision pipeline gives 2 global + N local crops per image."""
    from PIL import Image

    from moco_fast.train.data import image_folder_source

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            arr = (torch.rand(30, 30, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    source = image_folder_source(str(tmp_path / "imgs"), version="v2", size=28, crop_min=0.3, blur_prob=0.5,
                                 held_out_fraction=0.25, seed=0, workers=0, local_crops=3, local_size=12)  # fmt: skip
    step, *views = next(source.views(Order(source.num_train, 4), 0, 0, torch.device("cpu")))
    assert [tuple(v.shape) for v in views] == [(4, 3, 28, 28)] * 2 + [(4, 3, 12, 12)] * 3
    kw = dict(
        data=str(tmp_path / "imgs"), preset="dino-mnist", epochs=1, batch_size=4, workers=0, held_out_fraction=0.25
    )
    summary = train(tiny(tmp_path, "folder", **kw))
    assert summary["finished"] and summary["global_step"] == 3
