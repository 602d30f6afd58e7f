"""Checkpoints: everything a resumed run needs to continue exactly, written atomically.

A checkpoint holds the MoCo module (query encoder, momentum encoder with its step counter, queue
keys/pointer/count), the optimizer, the lr scheduler, the position (epoch, step in epoch, global
step), the running sums of the current epoch's metrics, the metric history, the config, and the RNG
states of every rank (python ``random``, numpy, torch CPU and, when present, every CUDA device).
The data order needs no RNG state: it is a function of (seed, epoch, step) (see ``data.py``).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
with ``os.replace`` (atomic on POSIX), so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: str) -> None:
    """mkstemp files are 0600: give the file the mode a plain open() would, then rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then os.replace onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporary files a killed writer of ``path`` left beside it; returns their names.

    Only ``<name>.*.tmp`` files from :func:`atomic_save` / :func:`atomic_write_text` are removed. Call it
    before this process writes ``path`` (a concurrent writer of the same folder is not supported).
    """
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder) if f.startswith(name + ".") and f.endswith(".tmp")]
    for f in stale:
        try:
            os.unlink(os.path.join(folder, f))
        except FileNotFoundError:
            pass
    return stale


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path!r}")
    # The checkpoint holds python/numpy RNG states and the config dict: not weights-only.
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise SystemExit(f"--resume: {path!r} is not a moco_fast.train checkpoint (format {FORMAT_VERSION})")
    return ckpt
