// Momentum update t <- t*m + s*(1-m) over a whole list of tensors in one launch.
//
// The grid is the concatenation of every pair's blocks; block b finds its pair by binary search over the
// device table (sorted block0), then handles kItems 16-byte vectors per thread of that pair (scalar when a
// pointer is not 16-byte aligned, scalar tail). Math in fp32 (fp64 for fp64 tensors).
#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace mf {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // 16-byte vectors per thread

template <typename T>
struct Math {
  using F = float;
  __device__ static F to(T x);
  __device__ static T from(F x);
};
template <>
struct Math<float> {
  using F = float;
  __device__ static float to(float x) { return x; }
  __device__ static float from(float x) { return x; }
};
template <>
struct Math<double> {
  using F = double;
  __device__ static double to(double x) { return x; }
  __device__ static double from(double x) { return x; }
};
template <>
struct Math<__half> {
  using F = float;
  __device__ static float to(__half x) { return __half2float(x); }
  __device__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Math<__nv_bfloat16> {
  using F = float;
  __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
constexpr int64_t block_elems() {
  return static_cast<int64_t>(kThreads) * kItems * (16 / sizeof(T));
}

template <typename T>
__device__ __forceinline__ T lerp1(T t, T s, typename Math<T>::F m, typename Math<T>::F om) {
  return Math<T>::from(Math<T>::to(t) * m + Math<T>::to(s) * om);
}

// Elements [chunk*E, min(n, (chunk+1)*E)) of one pair.
template <typename T>
__device__ __forceinline__ void process(T* t, const T* s, int64_t n, int64_t chunk, typename Math<T>::F m,
                                        typename Math<T>::F om) {
  constexpr int V = 16 / sizeof(T);  // elements per vector
  const int64_t begin = chunk * block_elems<T>();
  const int64_t end = min(n, begin + block_elems<T>());
  const bool aligned = ((reinterpret_cast<uintptr_t>(t) | reinterpret_cast<uintptr_t>(s)) & 15) == 0;
  int64_t scalar_from = begin;
  if (aligned) {
    const int64_t nvec = (end - begin) / V;
    uint4* tv = reinterpret_cast<uint4*>(t + begin);
    const uint4* sv = reinterpret_cast<const uint4*>(s + begin);
    uint4 a[kItems], b[kItems];
    // all loads first (t and s may alias: each element is read and written by the same thread)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t v = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      a[i] = b[i] = make_uint4(0u, 0u, 0u, 0u);
      if (v < nvec) {
        a[i] = tv[v];
        b[i] = __ldg(sv + v);
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t v = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      if (v < nvec) {
        T* ta = reinterpret_cast<T*>(&a[i]);
        const T* sb = reinterpret_cast<const T*>(&b[i]);
#pragma unroll
        for (int e = 0; e < V; ++e) ta[e] = lerp1(ta[e], sb[e], m, om);
        tv[v] = a[i];
      }
    }
    scalar_from = begin + nvec * V;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) t[i] = lerp1(t[i], s[i], m, om);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    momentum_flat_kernel(T* t, const T* s, int64_t n, typename Math<T>::F m, typename Math<T>::F om) {
  process<T>(t, s, n, blockIdx.x, m, om);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    momentum_table_kernel(const MomentumSeg* table, int nseg, typename Math<T>::F m, typename Math<T>::F om) {
  const int64_t b = blockIdx.x;
  int lo = 0, hi = nseg - 1;  // last segment with block0 <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].block0 <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const MomentumSeg seg = table[lo];
  process<T>(static_cast<T*>(seg.t), static_cast<const T*>(seg.s), seg.n, b - seg.block0, m, om);
}

template <typename T>
void flat(void* t, const void* s, int64_t n, double m, cudaStream_t stream) {
  using F = typename Math<T>::F;
  const int64_t blocks = (n + block_elems<T>() - 1) / block_elems<T>();
  if (blocks == 0) return;
  momentum_flat_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<T*>(t), static_cast<const T*>(s), n, static_cast<F>(m), static_cast<F>(1.0 - m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void table(const MomentumSeg* tab, int nseg, int64_t nblocks, double m, cudaStream_t stream) {
  using F = typename Math<T>::F;
  if (nblocks == 0) return;
  momentum_table_kernel<T><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
      tab, nseg, static_cast<F>(m), static_cast<F>(1.0 - m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t momentum_block_elems(int dt) {
  switch (dt) {
    case kF16:
    case kBF16:
      return block_elems<__half>();
    case kF64:
      return block_elems<double>();
    default:
      return block_elems<float>();
  }
}

void momentum_flat_launch(int dt, void* t, const void* s, int64_t n, double m, cudaStream_t stream) {
  switch (dt) {
    case kF16:
      return flat<__half>(t, s, n, m, stream);
    case kBF16:
      return flat<__nv_bfloat16>(t, s, n, m, stream);
    case kF64:
      return flat<double>(t, s, n, m, stream);
    default:
      return flat<float>(t, s, n, m, stream);
  }
}

void momentum_table_launch(int dt, const MomentumSeg* tab, int nseg, int64_t nblocks, double m,
                           cudaStream_t stream) {
  switch (dt) {
    case kF16:
      return table<__half>(tab, nseg, nblocks, m, stream);
    case kBF16:
      return table<__nv_bfloat16>(tab, nseg, nblocks, m, stream);
    case kF64:
      return table<double>(tab, nseg, nblocks, m, stream);
    default:
      return table<float>(tab, nseg, nblocks, m, stream);
  }
}

}  // namespace mf
