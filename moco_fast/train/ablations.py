"""Small-scale reproductions of MoCo claims on MNIST-5k: ``python -m moco_fast.train.ablations``.

* ``momentum`` — consistency (MoCo §4.1, Table 4): m = 0 (the key encoder is the query encoder, keys
  still without gradient) against 0.9, 0.99 and 0.999.
* ``queue`` — dictionary size (MoCo Fig. 3): K from one global batch up to the training-set size.
* ``dictionary`` — MoCo Fig. 3 itself: kNN top-1 against the number of negatives K for the three
  dictionaries — end-to-end (SimCLR's NT-Xent over the batch: K = 2B − 2, so the batch is K/2 + 1 and
  K is bounded by the batch that fits the step budget), memory bank (InstDisc with K rows sampled from
  the bank) and MoCo (a queue of K keys). See :data:`DICTIONARY`.

Each variant is one ``moco_fast.train`` run of the default (mnist) preset with a shorter schedule and
one overridden value, repeated over ``--seeds``; the table (held-out kNN top-1, mean and per seed) goes
to ``OUT/train_ablation_<name>.{json,csv}`` with a plot. Extra flags after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import time

from .checkpoint import atomic_write_text
from .config import resolve
from .loop import train

STUDIES = {
    "momentum": ("momentum", [0.0, 0.9, 0.99, 0.999]),
    "queue": ("queue_size", [128, 256, 512, 1024, 2048, 3968]),
}


def _over_seeds(cfg: dict, seeds: list[int], epochs: int, out: str, label: str) -> tuple[dict, dict]:
    """Train ``cfg`` (a config dict) once per seed for ``epochs`` (kNN at the end only), each run in
    ``out``_s<seed>; returns (the kNN columns of a table row, the last run's summary)."""
    accs, times, summary = [], [], None
    for seed in seeds:
        run = {**cfg, "seed": seed, "epochs": epochs, "quiet": True, "plot": False, "knn_every": epochs}
        t0 = time.perf_counter()
        summary = train(resolve({**run, "out": f"{out}_s{seed}"}))
        times.append(time.perf_counter() - t0)
        accs.append(summary["final_knn"])
        print(f"{label} seed={seed}: kNN {accs[-1]:.4f} ({times[-1]:.0f} s)", flush=True)
    columns = {
        "knn_mean": statistics.fmean(accs),
        "knn_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "knn_per_seed": accs,
        "seconds_per_run": statistics.fmean(times),
    }
    return columns, summary


def run_study(name: str, values: list, seeds: list[int], epochs: int, runs_dir: str, extra: dict) -> dict:
    field, _ = STUDIES[name]
    rows = []
    for value in values:
        out = os.path.join(runs_dir, f"{name}_{value}")
        columns, summary = _over_seeds({**extra, field: value}, seeds, epochs, out, f"{field}={value}")
        rows.append({field: value, **columns})
    return {
        "study": name,
        "field": field,
        "epochs": epochs,
        "seeds": seeds,
        "extra": extra,
        "rows": rows,
        "baselines": summary["baselines"],
        "preset": summary["config"]["preset"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# --- NT-Xent / MoCo v3 / CMC / memory bank: the "dictionary" study (MoCo Fig. 3 at small scale)

#: method -> (label, preset, overrides for K negatives). End-to-end scales the lr linearly with the batch
#: (from the simclr-mnist preset's 0.25 at 128), as SimCLR does; the other two keep batch 64.
DICTIONARY = {
    "end-to-end": (
        "end-to-end (SimCLR NT-Xent, B = K/2 + 1)",
        "simclr-mnist",
        lambda k: {"batch_size": k // 2 + 1, "lr": 0.25 * (k // 2 + 1) / 128},
    ),
    "memory bank": ("memory bank (InstDisc, K sampled rows)", "instdisc-mnist", lambda k: {"num_negatives": k}),
    "moco": ("MoCo (queue of K keys)", "mnist", lambda k: {"queue_size": k}),
}
DICTIONARY_K = [128, 256, 512, 1024, 2048, 3968]
END_TO_END_MAX_K = 2048  # batch 1025: 3 steps per epoch of the 4000 training images, already few


def run_dictionary(
    ks: list[int], seeds: list[int], epochs: int, runs_dir: str, extra: dict, methods: list[str] | None = None
) -> dict:
    rows = []
    summary = None
    for method in methods or list(DICTIONARY):
        label, preset, overrides = DICTIONARY[method]
        for k in ks:
            if method == "end-to-end" and k > END_TO_END_MAX_K:
                continue
            out = os.path.join(runs_dir, f"dictionary_{method.replace(' ', '_')}_{k}")
            cfg = {"preset": preset, **overrides(k), **extra}
            columns, summary = _over_seeds(cfg, seeds, epochs, out, f"{method} K={k}")
            batch = overrides(k).get("batch_size", resolve({"preset": preset}).batch_size)
            rows.append({"method": method, "label": label, "K": k, "batch_size": batch, **columns})
    return {
        "study": "dictionary",
        "field": "K",
        "epochs": epochs,
        "seeds": seeds,
        "extra": extra,
        "rows": rows,
        "baselines": summary["baselines"] if summary else {},
        "preset": "simclr-mnist / instdisc-mnist / mnist",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _write_table(result: dict, base: str, keys: list[str]) -> None:
    """BASE.json (the whole result) and BASE.csv: one line per row, the ``keys`` columns then the kNN ones."""
    atomic_write_text(json.dumps(result, indent=2) + "\n", base + ".json")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*keys, "knn_mean", "knn_std", "knn_per_seed", "seconds_per_run"])
    for r in result["rows"]:
        knn = [f"{r['knn_mean']:.4f}", f"{r['knn_std']:.4f}", " ".join(f"{a:.4f}" for a in r["knn_per_seed"])]
        w.writerow([*(r[k] for k in keys), *knn, f"{r['seconds_per_run']:.0f}"])
    atomic_write_text(buf.getvalue(), base + ".csv")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (the tables are written anyway)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _baselines(ax, result: dict) -> None:
    """The random-init and raw-pixel kNN as horizontal lines."""
    for (label, key), style in zip((("random init", "knn_random_init"), ("raw pixels", "knn_raw_pixels")), (":", "--")):
        if result["baselines"].get(key) is not None:
            ax.axhline(result["baselines"][key], color="gray", ls=style, lw=1, label=label)


def write_dictionary(result: dict, out: str, filename: str | None = None) -> None:
    base = os.path.join(out, filename or "train_ablation_dictionary")
    _write_table(result, base, ["method", "K", "batch_size"])
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for method, style in zip(DICTIONARY, ("s-", "^-", "o-")):
        rows = [r for r in result["rows"] if r["method"] == method]
        if rows:
            ax.errorbar(
                [r["K"] for r in rows],
                [r["knn_mean"] for r in rows],
                yerr=[r["knn_std"] for r in rows],
                fmt=style,
                capsize=3,
                label=rows[0]["label"],
            )
    _baselines(ax, result)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K, negatives per query")
    ax.set_ylabel("held-out kNN top-1")
    ax.set_title(
        f"MNIST-5k, three dictionaries (MoCo Fig. 3 at small scale), {result['epochs']} epochs, "
        f"{len(result['seeds'])} seeds",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + ".png")
    plt.close(fig)


def write(result: dict, out: str, filename: str | None = None) -> None:
    name, field = result["study"], result["field"]
    base = os.path.join(out, filename or f"train_ablation_{name}")
    _write_table(result, base, [field])
    plt = _pyplot()
    if plt is None:
        return
    xs = [str(r[field]) for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    ax.errorbar(
        range(len(xs)),
        [r["knn_mean"] for r in result["rows"]],
        yerr=[r["knn_std"] for r in result["rows"]],
        fmt="o-",
        capsize=3,
        label=f"MoCo, {result['epochs']} epochs",
    )
    _baselines(ax, result)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(field)
    ax.set_ylabel("held-out kNN top-1")
    extra = ", ".join(f"{k}={v}" for k, v in result["extra"].items())
    ax.set_title(
        f"MNIST-5k, {name} ablation, preset {result['preset']}{', ' + extra if extra else ''} "
        f"({len(result['seeds'])} seeds)",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(base + ".png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moco_fast.train.ablations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", choices=sorted(STUDIES) + ["dictionary"])
    p.add_argument("--values", type=str, default=None, help="comma-separated values (default: the study's list)")
    p.add_argument("--seeds", type=str, default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--out", default="benchmarks/results", help="folder of the table and plot")
    p.add_argument("--runs-dir", default="runs/ablations", help="folder of the individual runs' logs")
    p.add_argument("--name", default=None, help="file name of the table and plot (default train_ablation_STUDY)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field of every run (repeatable), e.g. --set batch_size=64",
    )
    p.add_argument("--methods", type=str, default=None, help="dictionary: comma-separated subset of the methods")
    args = p.parse_args(argv)
    if args.study == "dictionary":
        return _main_dictionary(args)
    field, default_values = STUDIES[args.study]
    cast = float if field == "momentum" else int
    values = [cast(v) for v in args.values.split(",")] if args.values else default_values
    seeds = [int(s) for s in args.seeds.split(",")]
    result = run_study(args.study, values, seeds, args.epochs, args.runs_dir, _parse_sets(args.set))
    write(result, args.out, args.name)
    for r in result["rows"]:
        print(f"{field}={r[field]}: kNN {r['knn_mean']:.4f} ± {r['knn_std']:.4f}")
    return 0


def _parse_sets(items: list[str]) -> dict:
    extra = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            extra[key] = json.loads(raw)
        except json.JSONDecodeError:
            extra[key] = raw
    return extra


def _main_dictionary(args) -> int:
    ks = [int(v) for v in args.values.split(",")] if args.values else DICTIONARY_K
    methods = args.methods.split(",") if args.methods else None
    seeds = [int(s) for s in args.seeds.split(",")]
    result = run_dictionary(ks, seeds, args.epochs, args.runs_dir, _parse_sets(args.set), methods)
    write_dictionary(result, args.out, args.name)
    for r in result["rows"]:
        print(
            f"{r['method']:12s} K={r['K']:5d} (batch {r['batch_size']}): kNN {r['knn_mean']:.4f} ± {r['knn_std']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
