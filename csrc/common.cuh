// Device helpers shared by the kernels: typed loads/stores of raw buffers with a runtime dtype.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moco_fast.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moco_fast._C needs sm_80 or newer (bf16/TF32 tensor cores, cp.async): set TORCH_CUDA_ARCH_LIST, e.g. 8.0;9.0+PTX"
#endif

namespace mf {

// The package's two numeric constants, named once for the C++ side (moco_fast/numerics.py for Python).
constexpr double kLog2eD = 1.4426950408889634;  // log2(e): exp(x) == exp2(x * log2(e))
constexpr double kLn2D = 0.6931471805599453;    // ln(2):   log(x) == log2(x) * ln(2)
constexpr float kLog2e = static_cast<float>(kLog2eD);
constexpr float kLn2 = static_cast<float>(kLn2D);

// Element i of a buffer of dtype dt, as fp32.
__device__ __forceinline__ float ld1(const void* base, int dt, int64_t i) {
  switch (dt) {
    case kF16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case kF64:
      return static_cast<float>(static_cast<const double*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

// Store v (rounded to nearest) as element i of a buffer of dtype dt.
__device__ __forceinline__ void st1(void* base, int dt, int64_t i, float v) {
  switch (dt) {
    case kF16:
      static_cast<__half*>(base)[i] = __float2half_rn(v);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
      break;
    case kF64:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

// Elements i..i+7 as fp32 with 16-byte vector loads. The caller guarantees the address of element i is
// 16-byte aligned (fp32: both 16-byte halves are then aligned too). fp64 falls back to scalar loads.
__device__ __forceinline__ void ld8(const void* base, int dt, int64_t i, float (&v)[8]) {
  switch (dt) {
    case kF16: {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const __half*>(base) + i));
      const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(h[e]);
        v[2 * e] = f.x;
        v[2 * e + 1] = f.y;
      }
      break;
    }
    case kBF16: {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(base) + i));
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(h[e]);
        v[2 * e] = f.x;
        v[2 * e + 1] = f.y;
      }
      break;
    }
    case kF32: {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
      const float4 a = __ldg(p), b = __ldg(p + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
      break;
    }
    default:
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = ld1(base, dt, i + e);
  }
}

// Sum / max over the G consecutive lanes of a group (G a power of two <= 32, all lanes active).
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int G>
__device__ __forceinline__ int group_sum(int v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace mf
