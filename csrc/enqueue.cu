// Ring-buffer enqueue of B keys into a (K, d) queue in one launch of one block, with no host sync:
//   1. every thread checks its share of the keys for NaN/Inf; __syncthreads_or -> all-or-nothing
//   2. one warp per key: optional L2 normalization (x / max(||x||, 1e-12), fp32), cast, write row
//      (ptr + i) mod K
//   3. thread 0 advances ptr <- (ptr + B) mod K, count <- min(count + B, K) and sets ok.
// A single block keeps the check and the pointer update race-free without a grid-wide barrier; enqueue
// moves B*d elements (64 KiB for 256 x 128 bf16), so one block is launch-latency bound anyway.
#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace mf {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ bool finite_at(const void* base, int dt, int64_t i) {
  if (dt == kF64) return isfinite(static_cast<const double*>(base)[i]);
  return isfinite(ld1(base, dt, i));
}

__global__ void __launch_bounds__(kThreads) enqueue_kernel(const EnqueueParams p) {
  __shared__ int64_t start_s, count_s;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t total = p.B * p.d;
  int bad = 0;
  for (int64_t i = tid; i < total; i += kThreads) bad |= finite_at(p.keys, p.kdt, i) ? 0 : 1;
  if (tid == 0) {
    const int64_t ptr = p.ptr[0];
    start_s = ((ptr % p.K) + p.K) % p.K;
    count_s = p.count[0];
  }
  if (__syncthreads_or(bad)) {  // also publishes start_s / count_s
    if (tid == 0) p.ok[0] = false;
    return;
  }
  const int64_t start = start_s;
  for (int64_t row = warp; row < p.B; row += kThreads / 32) {
    const int64_t src = row * p.d;
    float denom = 1.f;
    if (p.normalize) {
      float ss = 0.f;
      for (int c = lane; c < p.d; c += 32) {
        const float x = ld1(p.keys, p.kdt, src + c);
        ss = fmaf(x, x, ss);
      }
      ss = group_sum<32>(ss);
      denom = fmaxf(sqrtf(ss), 1e-12f);
    }
    const int64_t dst = ((start + row) % p.K) * p.d;
    for (int c = lane; c < p.d; c += 32) {
      const float x = ld1(p.keys, p.kdt, src + c);
      if (p.kdt == kF64 && p.qdt == kF64 && !p.normalize) {
        static_cast<double*>(p.queue)[dst + c] = static_cast<const double*>(p.keys)[src + c];  // exact copy
      } else {
        st1(p.queue, p.qdt, dst + c, p.normalize ? x / denom : x);
      }
    }
  }
  if (tid == 0) {
    p.ptr[0] = (start + p.B) % p.K;
    const int64_t c = count_s + p.B;
    p.count[0] = c < p.K ? c : p.K;
    p.ok[0] = true;
  }
}

}  // namespace

void enqueue_launch(const EnqueueParams& p, cudaStream_t stream) {
  enqueue_kernel<<<1, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mf
