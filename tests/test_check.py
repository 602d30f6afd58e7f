"""python -m moco_fast.check, the benchmark harness's shape tables, and benchmarks/gpu_check.sh.

The check must run on a bare machine (torch, triton, numpy: no torchvision, mlxtend, matplotlib,
lightly, tqdm), write parseable JSON Lines, and FAIL when a backend returns wrong numbers.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import moco_fast
from moco_fast import benchmarking as mb
from moco_fast import check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "benchmarks", "gpu_check.sh")
OPTIONAL = ("torchvision", "mlxtend", "matplotlib", "lightly", "tqdm")
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m moco_fast.check --quick --out DIR` in a subprocess where the optional packages cannot be imported."""
    out = tmp_path_factory.mktemp("check")
    wrapper = (
        "import runpy, sys\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None  # import name -> ImportError\n"
        f"sys.argv = ['moco_fast.check', '--quick', '--out', {str(out)!r}]\n"
        "runpy.run_module('moco_fast.check', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=600, cwd=REPO)
    files = glob.glob(os.path.join(out, "*.jsonl"))
    records = [json.loads(line) for path in files for line in open(path)]
    return proc, files, records


@pytest.mark.slow
def test_quick_check_passes_without_optional_packages(quick_run):
    proc, files, records = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(files) == 1
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "environment" and kinds[-1] == "summary"
    assert {"correctness", "speed"} <= set(kinds)
    env, summary = records[0], records[-1]
    assert summary["result"] == "PASS" and summary["correctness_failed"] == 0
    assert env["backends"]["torch"] == "ok" and env["torch"] == torch.__version__
    correctness = [r for r in records if r["kind"] == "correctness"]
    assert {r["op"] for r in correctness} == {
        "info_nce",
        "momentum_update",
        "MomentumEncoder.update",
        "KeyQueue.enqueue",
    }
    assert all(r["status"] == "PASS" and r["metrics"] for r in correctness)
    speed = [r for r in records if r["kind"] == "speed"]
    rows = {r["row"] for r in speed}
    assert {"flat lerp_", "official loop", "MomentumEncoder.update[torch]", "info_nce[torch]"} <= rows
    assert all(r["time_s"] and r["time_s"] > 0 for r in speed if r["status"] == "ok")
    if not torch.cuda.is_available():
        assert "GPU: none" in proc.stdout
        if env["backends"]["cuda"] != "ok" and moco_fast.backends.is_available("cuda"):
            assert env["backends"]["cuda"] == "built, no CUDA device"


def test_recorder_flushes_each_record(tmp_path):
    rec = check.Recorder(str(tmp_path))
    rec.write("environment", {"a": 1})
    # Before close: a killed run keeps what it wrote.
    assert [json.loads(line) for line in open(rec.path)] == [{"kind": "environment", "a": 1}]
    rec.close()


# ---------------------------------------------------------------------------------------------- poisoned backends


def _scaled(fn, factor=1.0 + 1e-3, *, nan=False, rank_offset=0):
    """fn with every floating tensor it returns scaled (or its first element NaN), int tensors offset."""

    def poisoned(*args, **kwargs):
        result = fn(*args, **kwargs)
        items = result if isinstance(result, tuple) else (result,)
        out = []
        for t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t * factor
                if nan:
                    t.view(-1)[:1] = math.nan
            elif isinstance(t, torch.Tensor) and rank_offset:
                t = t + rank_offset
            out.append(t)
        return tuple(out) if isinstance(result, tuple) else out[0]

    return poisoned


def _run_plan(ops, dtypes="fp32"):
    """The correctness cases of the torch backend for ``ops`` in ``dtypes``: (outcome, passed) pairs."""
    plan = check.correctness_plan(check.Backend("torch", None), CPU, ops, seed=11)
    return [check._run_case(o, fn) for o, fn in plan if o.dtypes == dtypes]


INFONCE_POISONS = {
    "none": None,
    "forward x(1+1e-3)": ("infonce_forward", dict()),
    "forward NaN": ("infonce_forward", dict(factor=1.0, nan=True)),
    "rank + 1": ("infonce_forward", dict(factor=1.0, rank_offset=1)),
    "backward x(1+1e-3)": ("infonce_backward", dict()),
    "negatives gradient x(1+1e-3)": ("infonce_backward_negatives", dict()),
}


@pytest.mark.parametrize("poison", list(INFONCE_POISONS))
def test_poisoned_info_nce_fails(poison, monkeypatch):
    from moco_fast import torch_backend as chunked

    if INFONCE_POISONS[poison]:
        name, kwargs = INFONCE_POISONS[poison]
        monkeypatch.setattr(chunked, name, _scaled(getattr(chunked, name), **kwargs))
    outcomes = _run_plan(["info_nce"])
    failed = [o for o in outcomes if not o.passed]
    if poison == "none":
        assert not failed, [o.failures() for o in failed]
        return
    assert failed, f"a check that cannot fail: {poison} passed every case"
    if poison.startswith("negatives"):  # only the negatives-gradient path reads it
        assert {o.case.endswith("negatives.requires_grad") for o in failed} == {True}
        assert all("dn" in o.failures() for o in failed)
    if poison == "rank + 1":
        assert all("rank" in o.failures() for o in failed)


def test_poisoned_momentum_fails_the_command(monkeypatch, capsys):
    from moco_fast import torch_backend as chunked

    original = chunked.momentum_update_

    def one_element_off(targets, sources, momentum):
        original(targets, sources, momentum)
        targets[-1].view(-1)[-1] += 0.5

    argv = ["--sections", "correctness", "--backends", "torch", "--ops", "momentum", "--seed", "3"]
    assert check.main(argv) == 0
    monkeypatch.setattr(chunked, "momentum_update_", one_element_off)
    assert check.main(argv) == 1
    assert "FAIL" in capsys.readouterr().out


def test_poisoned_enqueue_fails(monkeypatch):
    from moco_fast import torch_backend as chunked

    original = chunked.enqueue_

    def first_row_off(queue, ptr, count, keys, normalize):
        flipped = keys.clone()
        flipped[0] = -flipped[0]
        return original(queue, ptr, count, flipped, normalize)

    monkeypatch.setattr(chunked, "enqueue_", first_row_off)
    failed = [o for o in _run_plan(["queue"]) if not o.passed]
    assert any("keys" in o.failures() for o in failed)


def test_enqueue_that_accepts_nan_fails(monkeypatch):
    from moco_fast import torch_backend as chunked

    original = chunked.enqueue_

    def accepts_nonfinite(queue, ptr, count, keys, normalize):
        return original(queue, ptr, count, torch.nan_to_num(keys, nan=0.0, posinf=1.0), normalize)

    monkeypatch.setattr(chunked, "enqueue_", accepts_nonfinite)
    failed = [o for o in _run_plan(["queue"]) if not o.passed]
    assert failed and all(o.case.startswith("NaN/Inf") for o in failed)


# ---------------------------------------------------------------------------------------------- metrics


def test_errors_and_tolerances():
    ref = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert check.rel_error(ref.float(), ref) < 1e-7
    assert check.rel_error(torch.tensor([1.0, math.nan, 3.0]), ref) == math.inf
    assert check.rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert check.rel_error(torch.ones(2), torch.zeros(3)) == math.inf
    # One wrong element of many: small in the 2-norm, caught by the elementwise part.
    big = torch.linspace(1.0, 2.0, 10000, dtype=torch.float64)
    wrong = big.clone()
    wrong[7] += 0.05
    assert check.rel_error(wrong, big) < 1e-3 < check.elementwise_error(wrong, big)
    assert check.tolerance([torch.float32] * 3, CPU) == 1e-5
    assert check.tolerance([torch.float32, torch.bfloat16], CPU) == 1e-2
    outcome = check.Outcome("op", "torch", "fp32", "case")
    assert not outcome.passed  # no metrics: nothing was checked
    outcome.metrics["x"] = (math.nan, 1.0)
    assert not outcome.passed


def test_gpu_floors_by_name():
    assert mb.gpu_floors("NVIDIA H200").bf16_tflops == 990 and mb.gpu_floors("NVIDIA H200").memory_tbps == 4.8
    assert mb.gpu_floors("NVIDIA H200 NVL").label == "H200 NVL"
    assert mb.gpu_floors("NVIDIA H100 80GB HBM3").label == "H100 SXM"
    assert mb.gpu_floors("NVIDIA L40S").label == "L40S" and mb.gpu_floors("NVIDIA L4").label == "L4"
    assert mb.gpu_floors("NVIDIA GeForce RTX 4090") is None and mb.gpu_floors(None) is None


def test_parameter_set_tables_match_torchvision():
    torchvision = pytest.importorskip("torchvision")
    assert len(mb.PARAMETER_SETS["resnet50"]()) == 161
    assert sum(math.prod(s) for s in mb.PARAMETER_SETS["resnet50"]()) == 25_557_032
    for name, shapes in mb.PARAMETER_SETS.items():
        model = getattr(torchvision.models, name)(weights=None)
        assert shapes() == [tuple(p.shape) for p in model.parameters()], name


# ---------------------------------------------------------------------------------------------- gpu_check.sh


def _phase_limits(text: str) -> dict[str, list[int]]:
    return {
        phase: [int(x) for x in re.findall(r"\bstep (\d+) ", body)]
        for phase, body in re.findall(r"^phase(\d)\(\) \{\n(.*?)^\}", text, re.S | re.M)
    }


def test_gpu_check_phase_budgets():
    """Each phase's step limits + 5 s of kill grace per step fit in 5 minutes, as its header says."""
    text = open(GPU_CHECK).read()
    limits = _phase_limits(text)
    assert set(limits) == {"1", "2"}
    for phase, steps in limits.items():
        total = sum(steps) + 5 * len(steps)
        assert total <= 300, (phase, steps)
        header = re.search(rf"^# BUDGET phase {phase}: (.*)$", text, re.M).group(1)
        assert header.endswith(f"= {sum(steps)} (+{5 * len(steps)} grace) = {total}"), header
    proc = subprocess.run(
        ["bash", GPU_CHECK, "--budgets"], capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable)
    )
    assert proc.returncode == 0 and proc.stdout.count(": ok") == 2, proc.stdout + proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run():
    """--dry-run on a CPU: syntax, budgets, and each script's code path at tiny sizes (TRITON_INTERPRET=1)."""
    proc = subprocess.run(
        ["bash", GPU_CHECK, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "every step passed" in proc.stdout
