"""``python -m moco_fast.train.ablations``: a study and the dictionary comparison run end to end on a tiny
configuration and write their tables (the figures in the README come from full-size runs of the same code)."""

from __future__ import annotations

import csv
import json

from conftest import train_dependency

train_dependency("torchvision")
train_dependency("mlxtend")

from moco_fast.train import ablations  # noqa: E402

TINY = [
    "--set", "limit_train=96", "--set", "held_out=64", "--set", "width=4", "--set", "dim=16",
    "--set", "threads=1", "--set", "knn_k=20", "--set", "warmup_epochs=0",
]  # fmt: skip


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_queue_study_writes_one_row_per_value_with_every_seed(tmp_path):
    argv = ["queue", "--values", "32,64", "--seeds", "0,1", "--epochs", "1", "--out", str(tmp_path)]
    assert ablations.main([*argv, "--runs-dir", str(tmp_path / "runs"), "--set", "batch_size=16", *TINY]) == 0
    rows = _rows(tmp_path / "train_ablation_queue.csv")
    assert [r["queue_size"] for r in rows] == ["32", "64"]
    assert all(len(r["knn_per_seed"].split()) == 2 and 0 < float(r["knn_mean"]) <= 1 for r in rows)
    result = json.loads((tmp_path / "train_ablation_queue.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["baselines"]) >= {"knn_raw_pixels", "knn_random_init"}


def test_dictionary_comparison_runs_the_three_dictionaries(tmp_path):
    argv = ["dictionary", "--values", "66", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)]
    assert ablations.main([*argv, "--runs-dir", str(tmp_path / "runs"), *TINY]) == 0
    rows = _rows(tmp_path / "train_ablation_dictionary.csv")
    assert [(r["method"], r["K"]) for r in rows] == [("end-to-end", "66"), ("memory bank", "66"), ("moco", "66")]
    assert rows[0]["batch_size"] == "34"  # end-to-end: K = 2B − 2 negatives
