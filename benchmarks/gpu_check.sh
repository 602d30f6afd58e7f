#!/usr/bin/env bash
# GPU truth for moco_fast, in one prepared run on a machine with one CUDA GPU (e.g. an H200) that
# has nothing but this repo and its own python3 (torch, triton, nvcc, pytest; no network):
#
#   1. pip install --no-deps --no-build-isolation -e .   (builds moco_fast._C when csrc/ has sources;
#      if that build fails, reinstalls pure-Python so that the triton checks still run)
#   2. the GPU tests: pytest -m "not slow" -k "gpu or cuda or triton" (minus the offline-compile test)
#   3. benchmarks/gpu_bench_kernels.py: ceilings, InfoNCE fwd+bwd per backend, momentum, enqueue
#      -> benchmarks/results/gpu_<date>.json (+ a copy in $OUT when set), one short table
#   3b. the peer benchmarks bench_infonce.py / bench_momentum.py / bench_queue.py with --device cuda
#   4. optionally (GPU_CHECK_AUTOTUNE=1) the triton forward autotuner
#
#   bash benchmarks/gpu_check.sh              # the full check: ~5 min expected, step caps sum to 12 min
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU machine: syntax + the benchmark's code paths
#
# Every step has its own timeout; a failing step is reported and the next one still runs. The exit
# status is non-zero when any step failed. A log goes to benchmarks/results/gpu_check_<date>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP="$(date +%Y%m%d_%H%M%S)"

if [[ "${1:-}" == "--dry-run" ]]; then
    bash -n "$0" || exit 1
    "$PY" -m py_compile benchmarks/gpu_bench_kernels.py || exit 1
    exec env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_bench_kernels.py --dry-run
fi

mkdir -p benchmarks/results
LOG="benchmarks/results/gpu_check_${STAMP}.log"
exec > >(tee -a "$LOG") 2>&1
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" - <<'EOF' || status=1
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
which nvcc && nvcc --version | tail -2 || echo "no nvcc on PATH"

step "install (editable, builds the CUDA extension when possible)"
t0=$SECONDS
if ! timeout 300 "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
    echo "!!! install with the CUDA extension failed; reinstalling pure-Python (MOCO_FAST_BUILD_CUDA=0)"
    status=1
    MOCO_FAST_BUILD_CUDA=0 timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -e . || exit 2
fi
echo "install took $((SECONDS - t0)) s"
"$PY" -c "import moco_fast; print('backends:', moco_fast.available_backends())" || status=1

step "GPU tests"
timeout 200 "$PY" -m pytest -q -m "not slow" tests/ -k "(gpu or cuda or triton) and not offline_compile" \
    --maxfail=20 -p no:cacheprovider || { echo "!!! GPU tests failed (rc=$?)"; status=1; }

step "benchmark"
BENCH_JSON="benchmarks/results/gpu_${STAMP}.json"
timeout 240 "$PY" benchmarks/gpu_bench_kernels.py --out "$BENCH_JSON" || { echo "!!! benchmark rc=$?"; status=1; }

step "peer benchmarks (bench_infonce / bench_momentum / bench_queue on the GPU)"
timeout 100 "$PY" benchmarks/bench_infonce.py --device cuda --dtype bf16 \
    --json "benchmarks/results/gpu_infonce_${STAMP}.json" || { echo "!!! bench_infonce rc=$?"; status=1; }
timeout 50 "$PY" benchmarks/bench_momentum.py --device cuda --quick \
    --json "benchmarks/results/gpu_momentum_${STAMP}.json" || { echo "!!! bench_momentum rc=$?"; status=1; }
timeout 30 "$PY" benchmarks/bench_queue.py --device cuda \
    --json "benchmarks/results/gpu_queue_${STAMP}.json" || { echo "!!! bench_queue rc=$?"; status=1; }

if [[ "${GPU_CHECK_AUTOTUNE:-0}" == "1" ]]; then
    step "triton autotune (bf16 forward)"
    timeout 300 "$PY" benchmarks/gpu_bench_kernels.py --autotune --quick --skip infonce momentum enqueue \
        --out "benchmarks/results/gpu_autotune_${STAMP}.json" || status=1
fi

if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp -f benchmarks/results/gpu_*"${STAMP}"*.json "$OUT"/ 2>/dev/null || true
    cp -f "$LOG" "$OUT"/ 2>/dev/null || true
fi
step "done: status $status"
exit $status
