"""Crash safety of the training loop: SIGKILL at random moments while it checkpoints every step.

After every kill, the checkpoint on disk loads; ``--resume auto`` continues; and the run that was
killed and resumed several times ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import train_dependency

for _name in ("torchvision", "mlxtend"):
    train_dependency(_name)

from moco_fast.train import checkpoint as ckpt_io  # noqa: E402
from moco_fast.train import resolve, train  # noqa: E402

TINY = dict(
    limit_train=96, held_out=64, epochs=8, batch_size=16, queue_size=48, width=4, dim=16, threads=1,
    quiet=True, plot=False, knn_k=20, save_every=1,
)  # fmt: skip


def cli_args(out: str) -> list[str]:
    args = ["--out", out, "--resume", "auto"]
    for name, value in TINY.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args += ["--no-plot"] if name == "plot" else []
        else:
            args += [flag, str(value)]
    return args


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for name, value in a["model"].items():
        other = b["model"][name]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    untimed = lambda history: [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]  # noqa: E731
    assert untimed(a["history"]) == untimed(b["history"])  # losses, accuracies, kNN: all but wall times


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume_is_bit_identical(tmp_path):
    reference = train(resolve({**TINY, "out": str(tmp_path / "uninterrupted")}))
    assert reference["finished"]
    expected = ckpt_io.load(str(tmp_path / "uninterrupted" / "checkpoint.pt"))

    out = str(tmp_path / "killed")
    ckpt = os.path.join(out, "checkpoint.pt")
    rng = random.Random(int(os.environ.get("MOCO_FAST_RANDOM_SEED", "0") or 0))
    cmd = [sys.executable, "-m", "moco_fast.train", *cli_args(out)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    steps_seen, kills = [], 0
    for _ in range(6):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this process has written at least one new checkpoint (or finished), then kill it
        # at a random moment of the next steps: most kills land inside a save or between two saves.
        start_mtime = os.path.getmtime(ckpt) if os.path.exists(ckpt) else 0.0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(ckpt) and os.path.getmtime(ckpt) > start_mtime:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        state = ckpt_io.load(ckpt)  # the published checkpoint is always whole
        steps_seen.append(state["global_step"])
    else:
        proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert kills >= 2, f"the test killed only {kills} runs: it proves nothing"
    assert steps_seen == sorted(steps_seen), steps_seen  # never went back
    final = ckpt_io.load(ckpt)
    assert_same_state(final, expected)
    leftovers = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert not leftovers, leftovers  # a resumed run removes what a killed writer left behind
