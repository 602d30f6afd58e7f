// Momentum update t <- t + (1-m)*(s - t) (a lerp) over a whole list of tensors in one launch.
//
// Math in fp32 (fp64 for fp64 tensors): one fused multiply-add, fma(1-m, s - t, t), then one rounding to
// the storage dtype. (s - t is exact whenever s and t are within a factor of two, as EMA weights are.)
//
// Each pair is cut into 16-byte slots counted from the 16-byte boundary at or below its target's first
// element, so a pair at any offset keeps its vector loads: a slot wholly inside the pair, with the source
// at the same offset within 16 bytes, moves as one 16-byte load/store; the (at most two) partial slots at
// the ends, and every slot of a pair whose source sits at another offset, are masked element by element.
// The grid is the concatenation of every pair's blocks; block b finds its pair by binary search over the
// device table (sorted block0), then handles kItems slots per thread of that pair.
#include <type_traits>

#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace mf {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;                              // 16-byte slots per thread
constexpr int64_t kSlotsPerBlock = kThreads * kItems;  // slots per block

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

// Elements before p within its 16-byte chunk.
template <typename T>
__host__ __device__ __forceinline__ int64_t lead(const void* p) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15) / static_cast<int64_t>(sizeof(T));
}

template <typename T>
__host__ __device__ __forceinline__ int64_t pair_blocks(const void* t, int64_t n) {
  constexpr int64_t V = 16 / sizeof(T);
  const int64_t slots = (lead<T>(t) + n + V - 1) / V;
  return (slots + kSlotsPerBlock - 1) / kSlotsPerBlock;
}

template <typename T>
__device__ __forceinline__ T lerp1(T t, T s, typename Math<T>::F om) {
  using F = typename Math<T>::F;
  const F tf = Math<T>::to(t), sf = Math<T>::to(s);
  if constexpr (std::is_same_v<F, double>) {
    return Math<T>::from(fma(om, sf - tf, tf));
  } else {
    return Math<T>::from(fmaf(om, sf - tf, tf));
  }
}

// Slots [chunk*kSlotsPerBlock, +kSlotsPerBlock) of one pair of n elements.
template <typename T>
__device__ __forceinline__ void process(T* t, const T* s, int64_t n, int64_t chunk, typename Math<T>::F om) {
  constexpr int V = 16 / sizeof(T);  // elements per slot
  const int64_t off = lead<T>(t);    // slot v holds elements v*V - off .. v*V - off + V - 1
  const bool same = lead<T>(s) == off;
  T* tb = t - off;  // 16-byte aligned
  const T* sb = s - off;
  uint4 a[kItems], b[kItems];
  // all loads first (t and s may alias: each element is read and written by the same thread)
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t v = chunk * kSlotsPerBlock + threadIdx.x + static_cast<int64_t>(i) * kThreads;
    const int64_t e0 = v * V - off;  // element index of the slot's first lane
    a[i] = b[i] = make_uint4(0u, 0u, 0u, 0u);
    if (same && e0 >= 0 && e0 + V <= n) {
      a[i] = reinterpret_cast<const uint4*>(tb)[v];
      b[i] = __ldg(reinterpret_cast<const uint4*>(sb) + v);
    } else {
      T* ta = reinterpret_cast<T*>(&a[i]);
      T* sa = reinterpret_cast<T*>(&b[i]);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e0 + e >= 0 && e0 + e < n) {
          ta[e] = t[e0 + e];
          sa[e] = s[e0 + e];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t v = chunk * kSlotsPerBlock + threadIdx.x + static_cast<int64_t>(i) * kThreads;
    const int64_t e0 = v * V - off;
    T* ta = reinterpret_cast<T*>(&a[i]);
    const T* sa = reinterpret_cast<const T*>(&b[i]);
    if (same && e0 >= 0 && e0 + V <= n) {
#pragma unroll
      for (int e = 0; e < V; ++e) ta[e] = lerp1(ta[e], sa[e], om);
      reinterpret_cast<uint4*>(tb)[v] = a[i];
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e0 + e >= 0 && e0 + e < n) t[e0 + e] = lerp1(ta[e], sa[e], om);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    momentum_flat_kernel(T* t, const T* s, int64_t n, typename Math<T>::F om) {
  process<T>(t, s, n, blockIdx.x, om);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    momentum_table_kernel(const MomentumSeg* table, int nseg, typename Math<T>::F om) {
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
  process<T>(static_cast<T*>(seg.t), static_cast<const T*>(seg.s), seg.n, b - seg.block0, om);
}

template <typename T>
void flat(void* t, const void* s, int64_t n, double m, cudaStream_t stream) {
  using F = typename Math<T>::F;
  const int64_t blocks = pair_blocks<T>(t, n);
  if (n == 0) return;
  momentum_flat_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<T*>(t), static_cast<const T*>(s), n, static_cast<F>(1.0 - m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void table(const MomentumSeg* tab, int nseg, int64_t nblocks, double m, cudaStream_t stream) {
  using F = typename Math<T>::F;
  if (nblocks == 0) return;
  momentum_table_kernel<T><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(tab, nseg,
                                                                                      static_cast<F>(1.0 - m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t momentum_blocks(int dt, const void* t, int64_t n) {
  if (n == 0) return 0;
  switch (dt) {
    case kF16:
    case kBF16:
      return pair_blocks<__half>(t, n);
    case kF64:
      return pair_blocks<double>(t, n);
    default:
      return pair_blocks<float>(t, n);
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
