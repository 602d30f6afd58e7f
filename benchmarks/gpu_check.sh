#!/usr/bin/env bash
# GPU truth for moco_fast on a machine with one CUDA GPU (e.g. the H200 machine: its python3 has torch,
# triton, nvcc and pytest; no network), in two phases, each under 5 minutes of wall time:
#
#   bash benchmarks/gpu_check.sh 1          # install (builds moco_fast._C; if that fails, pure Python), GPU tests
#   bash benchmarks/gpu_check.sh 2          # python -m moco_fast.check --out $OUT, then the benchmarks on cuda
#   bash benchmarks/gpu_check.sh            # phase 1, then phase 2
#   bash benchmarks/gpu_check.sh --dry-run  # on a CPU: syntax, the budgets below, the code paths (TRITON_INTERPRET=1)
#
# Phase 2 needs nothing from phase 1 but the installed package: on a fresh machine it installs this
# checkout pure-Python (seconds; the "cuda" backend then reports "not built").
#
# Each step has a time limit: at the limit it gets SIGINT (pytest and the check then write what they
# have), 5 s later SIGKILL; a failed step is reported and the next one still runs; the exit status is
# non-zero when a step failed. Limits in seconds, each phase's sum + 5 s of grace per step <= 300:
# BUDGET phase 1: machine 10 + install 150 + install-pure 30 + import 10 + gpu-tests 70 = 270 (+25 grace) = 295
# BUDGET phase 2: machine 10 + ensure-installed 35 + check 130 + bench-infonce 45 + bench-momentum 25 + bench-queue 15 = 260 (+30 grace) = 290
#
# Everything is written into $OUT as it goes (default benchmarks/results/gpu_<date>/), flat, at most
# 6 files: gpu_check.log (both phases append), gpu_tests.xml (phase 1); check_<date>.jsonl,
# bench_infonce.json, bench_momentum.json, bench_queue.json (phase 2).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GRACE=5
PHASE_CAP=300
export PYTHONUNBUFFERED=1

failed=()
step() {  # step LIMIT NAME COMMAND...: run COMMAND under its time limit; log rc and time
    local limit=$1 name=$2 t0=$SECONDS rc
    shift 2
    echo
    echo "=== [$name] limit ${limit} s ($(date +%H:%M:%S))"
    timeout -s INT -k "$GRACE" "$limit" "$@"
    rc=$?
    echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || failed+=("$name (rc $rc)")
    return "$rc"
}

machine() {  # what runs here: GPU, driver, python, torch, triton, nvcc
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null ||
        echo "no nvidia-smi"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"cuda", torch.version.cuda, "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    "$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
    { command -v nvcc && nvcc --version | tail -2; } || echo "no nvcc on PATH"
}

installed_here() {  # moco_fast (with moco_fast.kernels) imports from this checkout, from any folder
    local repo=$PWD
    (cd / && "$PY" -c 'import os, sys, moco_fast, moco_fast.kernels
sys.exit(0 if os.path.realpath(moco_fast.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)' "$repo")
}

ensure_installed() {  # phase 2 on a fresh machine: the pure-Python install of this checkout
    if installed_here; then
        echo "moco_fast is installed from this checkout"
    elif [[ "${1:-}" == "--dry-run" ]]; then
        echo "moco_fast is not installed from this checkout: phase 2 would install it (MOCO_FAST_BUILD_CUDA=0)"
    else
        echo "moco_fast is not installed from this checkout: installing it pure-Python (MOCO_FAST_BUILD_CUDA=0)"
        MOCO_FAST_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    fi
}

check_budgets() {  # each phase's step limits must be its BUDGET line's, and sum + grace per step <= the cap
    "$PY" - "$0" "$GRACE" "$PHASE_CAP" <<'EOF'
import re, sys

text, grace, cap = open(sys.argv[1]).read(), int(sys.argv[2]), int(sys.argv[3])
ok = True
for phase in ("1", "2"):
    body = re.search(rf"^phase{phase}\(\) {{\n(.*?)^}}", text, re.S | re.M).group(1)
    limits = [int(x) for x in re.findall(r"\bstep (\d+) ", body)]
    header = re.search(rf"^# BUDGET phase {phase}: (.*)$", text, re.M).group(1)
    terms, declared_sum, declared_grace, declared_total = re.fullmatch(r"(.*) = (\d+) \(\+(\d+) grace\) = (\d+)", header).groups()
    declared = [int(x) for x in re.findall(r"(\d+)", terms)]
    total = sum(limits) + grace * len(limits)
    good = declared == limits and int(declared_sum) == sum(limits) and int(declared_grace) == grace * len(limits)
    good = good and int(declared_total) == total <= cap
    ok &= good
    print(f"phase {phase}: step limits {limits} = {sum(limits)} s + {grace} s grace x {len(limits)} = {total} s "
          f"(cap {cap} s; header says {declared_total}): {'ok' if good else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF
}

phase1() {
    step 10 machine bash "$0" --machine
    if ! step 150 install env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-deps --no-build-isolation -e .; then
        echo "!!! the install with the CUDA extension failed: reinstalling pure-Python (MOCO_FAST_BUILD_CUDA=0)"
        step 30 install-pure env MOCO_FAST_BUILD_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation -e .
    fi
    step 10 import "$PY" -c "import moco_fast.backends as b; print('backends:', b.availability())"
    local parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)  # Triton JIT compiles in parallel
    step 70 gpu-tests "$PY" -m pytest -q -m "not slow" tests/ -k "(gpu or cuda or triton) and not offline_compile" \
        ${parallel[@]+"${parallel[@]}"} --maxfail=20 -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
}

phase2() {
    step 10 machine bash "$0" --machine
    step 35 ensure-installed bash "$0" --ensure-installed
    step 130 check "$PY" -m moco_fast.check --out "$OUT"
    step 45 bench-infonce "$PY" benchmarks/bench_infonce.py --device cuda --dtype bf16 fp32 --quick \
        --json "$OUT/bench_infonce.json"
    step 25 bench-momentum "$PY" benchmarks/bench_momentum.py --device cuda --quick --json "$OUT/bench_momentum.json"
    step 15 bench-queue "$PY" benchmarks/bench_queue.py --device cuda --quick --json "$OUT/bench_queue.json"
}

dry_run() {  # on a CPU: syntax, budgets, and every script's code path at tiny sizes in the Triton interpreter
    local tmp
    tmp="$(mktemp -d)"
    export TRITON_INTERPRET=1
    step 5 syntax bash -n "$0"
    step 10 budgets bash "$0" --budgets
    step 20 compile "$PY" -m py_compile benchmarks/*.py moco_fast/check.py moco_fast/benchmarking.py
    step 20 machine bash "$0" --machine
    step 20 ensure-installed bash "$0" --ensure-installed --dry-run
    step 120 check "$PY" -m moco_fast.check --quick --ops queue --out "$tmp"
    step 120 bench-infonce "$PY" benchmarks/bench_infonce.py -B 8 -K 512 -d 16 --quick --no-memory \
        --backends reference torch --json "$tmp/bench_infonce.json"
    step 120 bench-momentum "$PY" benchmarks/bench_momentum.py --models resnet18 --backends official flat_lerp encoder --quick --repeats 2 \
        --json "$tmp/bench_momentum.json"
    step 120 bench-queue "$PY" benchmarks/bench_queue.py -K 4096 --quick --repeats 5 --json "$tmp/bench_queue.json"
    step 120 bench-kernels "$PY" benchmarks/bench_kernels.py --dry-run --json "$tmp/bench_kernels.json"
    ls "$tmp"
    rm -rf "$tmp"
}

case "${1:-all}" in
--machine) machine; exit ;;
--ensure-installed) ensure_installed "${2:-}"; exit ;;
--budgets) check_budgets; exit ;;
--dry-run) dry_run ;;
1 | 2 | all)
    OUT="${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)}"
    mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    echo "=== moco_fast gpu_check phase ${1:-1 and 2}, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null), OUT=$OUT"
    [[ "${1:-all}" == 2 ]] || phase1
    [[ "${1:-all}" == 1 ]] || phase2
    ;;
*) echo "usage: bash benchmarks/gpu_check.sh [1|2|--dry-run]" >&2; exit 2 ;;
esac

echo
if [[ ${#failed[@]} -eq 0 ]]; then
    echo "=== done: every step passed"
else
    echo "=== done: failed steps: ${failed[*]}"
fi
[[ ${#failed[@]} -eq 0 ]]
