"""Per-epoch metrics: a CSV and a JSON log, and a PNG plot of the loss and the kNN accuracy."""

from __future__ import annotations

import csv
import io
import json
import math
import os

from .checkpoint import atomic_write_text

COLUMNS = ("epoch", "step", "loss", "acc1", "acc5", "lr", "momentum", "knn", "epoch_s", "elapsed_s")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(history: list[dict], path: str) -> None:
    """One row per epoch: the standard COLUMNS, then any other stats a method logs (in first-seen order)."""
    extra = [k for row in history for k in row if k not in COLUMNS]
    columns = list(COLUMNS) + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in columns})
    atomic_write_text(buf.getvalue(), path)


def write_json(payload: dict, path: str) -> None:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return _clean(obj)

    atomic_write_text(json.dumps(clean(payload), indent=2, sort_keys=False) + "\n", path)


def plot(history: list[dict], path: str, title: str = "", baselines: dict | None = None) -> None:
    """Loss (left axis) and held-out kNN accuracy (right axis) per epoch, via matplotlib's Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional extra
        return
    train_rows = [r for r in history if r.get("loss") is not None and math.isfinite(r["loss"])]
    knn_rows = [r for r in history if r.get("knn") is not None and math.isfinite(r["knn"])]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(
        [r["epoch"] for r in train_rows],
        [r["loss"] for r in train_rows],
        "o-",
        color="tab:blue",
        ms=3,
        label="loss (train)",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        [r["epoch"] for r in knn_rows],
        [r["knn"] for r in knn_rows],
        "s-",
        color="tab:red",
        ms=3,
        label="kNN top-1 (held-out)",
    )
    for (name, value), style in zip((baselines or {}).items(), (":", "--", "-.")):
        if value is not None:
            ax2.axhline(value, color="gray", ls=style, lw=1, label=f"{name} {value:.3f}")
    ax2.set_ylabel("kNN accuracy", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax2.legend(lines, labels, loc="center right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
