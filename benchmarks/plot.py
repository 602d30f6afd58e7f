"""PNG plots of benchmark JSON results (matplotlib, Agg backend): time and memory vs K and vs B.

python benchmarks/plot.py benchmarks/results/cpu_infonce_sweep.json [PREFIX]
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {
    "reference": dict(color="black", marker="o"),
    "ref-autocast": dict(color="gray", marker="o", linestyle="--"),
    "lightly": dict(color="tab:purple", marker="s"),
    "sdpa-flash": dict(color="tab:orange", marker="^"),
    "cce-exact": dict(color="tab:brown", marker="v"),
    "moco_fast[torch]": dict(color="tab:blue", marker="D"),
    "moco_fast[triton]": dict(color="tab:green", marker="D"),
    "moco_fast[cuda]": dict(color="tab:red", marker="D"),
}


def _title(payload: dict) -> str:
    m = payload["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m.get('cpu_count')} cores, torch threads={m.get('torch_threads')}"
    load = m.get("loadavg")
    busy = f", load avg {load[0]:.1f} at start" if load else ""
    return f"{where}, torch {m['torch']}, {m['date_utc'][:10]}{busy}"


def _pick(values, preferred):
    values = sorted(set(values))
    return preferred if preferred in values else values[0]


def _series(results, axis, fixed):
    """{row: [(x, time_s, peak_bytes)]} for results matching ``fixed`` (dict of field -> value)."""
    out: dict[str, list] = {}
    for r in results:
        if "fwd_bwd_s" not in r or any(r[f] != v for f, v in fixed.items()):
            continue
        out.setdefault(r["row"], []).append((r[axis], r["fwd_bwd_s"], r.get("peak_extra_bytes")))
    return {row: sorted(points) for row, points in out.items()}


def _line_plot(payload, axis, fixed, path) -> bool:
    series = _series(payload["results"], axis, fixed)
    if not series or max(len(p) for p in series.values()) < 2:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row, points in series.items():
        style = _STYLE.get(row, {})
        xs = [p[0] for p in points]
        ax_t.plot(xs, [p[1] * 1e3 for p in points], label=row, **style)
        mem = [(p[0], p[2]) for p in points if p[2]]
        if mem:
            ax_m.plot([x for x, _ in mem], [m / 2**20 for _, m in mem], label=row, **style)
    fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items())
    for ax, ylabel in ((ax_t, "fwd+bwd median time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"InfoNCE vs {axis} ({fixed_txt})", fontsize=10)
    ax_t.legend(fontsize=8)
    fig.suptitle(_title(payload), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def _bar_plot(payload, path) -> bool:
    results = [r for r in payload["results"] if "fwd_bwd_s" in r]
    if not results:
        return False
    r0 = results[0]
    names = [r["row"] for r in results]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2))
    ax_t.barh(
        names, [r["fwd_bwd_s"] * 1e3 for r in results], color=[_STYLE.get(n, {}).get("color", "gray") for n in names]
    )
    ax_m.barh(
        names,
        [(r.get("peak_extra_bytes") or 0) / 2**20 for r in results],
        color=[_STYLE.get(n, {}).get("color", "gray") for n in names],
    )
    ax_t.set_xlabel("fwd+bwd median time (ms)")
    ax_m.set_xlabel("peak extra memory (MiB)")
    mems = [r["peak_extra_bytes"] / 2**20 for r in results if r.get("peak_extra_bytes")]
    ax_m.set_xscale("log")  # memory spans orders of magnitude; time is linear so bar lengths compare
    if mems:
        ax_m.set_xlim(left=min(mems) / 2)
    for ax in (ax_t, ax_m):
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.3)
    ax_m.set_yticklabels([])
    fig.suptitle(f"InfoNCE B={r0['B']} K={r0['K']} d={r0['d']} {r0['dtype']}; {_title(payload)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def plot_infonce(payload: dict, prefix: str) -> list[str]:
    """vs-K and vs-B line plots when the results vary along them, else a bar chart of the one case."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    results = [r for r in payload["results"] if "fwd_bwd_s" in r]
    if not results:
        print("nothing to plot")
        return []
    b = _pick([r["B"] for r in results], 256)
    k = _pick([r["K"] for r in results], 65536)
    d = _pick([r["d"] for r in results], 128)
    t = _pick([r["dtype"] for r in results], "fp32")
    written = []
    if _line_plot(payload, "K", {"B": b, "d": d, "dtype": t}, prefix + "_vs_K.png"):
        written.append(prefix + "_vs_K.png")
    if _line_plot(payload, "B", {"K": k, "d": d, "dtype": t}, prefix + "_vs_B.png"):
        written.append(prefix + "_vs_B.png")
    if not written and _bar_plot(payload, prefix + ".png"):
        written.append(prefix + ".png")
    return written


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    default = os.path.splitext(sys.argv[1])[0]
    if data.get("benchmark") == "infonce":
        plot_infonce(data, sys.argv[2] if len(sys.argv) > 2 else default)
    else:
        sys.exit(f"no plot for benchmark {data.get('benchmark')!r}")
