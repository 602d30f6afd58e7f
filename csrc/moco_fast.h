// Host-side interface between bindings.cpp (torch glue) and the .cu files (kernels).
// Kept free of torch headers so the .cu files compile quickly (no ATen in the device passes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mf {

// Element types of raw device buffers.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// What the InfoNCE forward feeds its dots with. The caller chooses (moco_fast/cuda_ext.py, through
// kernels/heuristics.py cuda_fwd_compute); the op only checks that the kernel can read the operands:
//   kCompBF16 / kCompF16 ("bfloat16" / "float16"): q and negatives both bf16 (both fp16): WMMA m16n16k16,
//              fp32 accumulation.
//   kCompTF32 ("tf32"): any dtypes, converted to fp32 (exact for bf16/fp16) then rounded to TF32,
//              WMMA m16n16k8.
//   kCompF32 ("ieee"): any dtypes, converted to fp32, IEEE fp32 FFMA.
enum Compute : int { kCompBF16 = 0, kCompF16 = 1, kCompTF32 = 2, kCompF32 = 3 };

constexpr int kMaxD = 256;         // largest feature dimension the kernels take (d is padded up to 32/64/128/256)
constexpr int kMaxSplits = 1024;   // most key chunks of one forward (the combine keeps a weight per chunk)

// Compile-time facts of the forward kernel for (compute, d): its tile and launch shape.
struct FwdTile {
  int bm;       // query rows per block
  int bn;       // keys per tile (a chunk is a multiple of it)
  int threads;  // threads per block
  int smem;     // dynamic shared memory per block, bytes
};
FwdTile fwd_tile(int compute, int d);
// Resident blocks per SM of that kernel on the current device (cudaOccupancyMaxActiveBlocksPerMultiprocessor).
int fwd_ctas_per_sm(int compute, int d);

struct FwdParams {
  const void* q;
  const void* k;
  const void* n;
  int qt, kt, nt;  // DType of q, k, negatives
  int compute;     // Compute
  int64_t B, K;
  int d;
  bool vec_q, vec_n;  // 16-byte vector loads allowed (aligned base, d % 8 == 0)
  double scale;       // 1 / temperature (infonce_forward_launch derives scale_log2)
  float scale_log2;   // scale * log2(e)
  int nsplit;         // number of key chunks (0 when K == 0), as planned by the caller
  int64_t chunk;      // keys per chunk (multiple of the key tile; no chunk empty)
  // workspace (fp32 unless noted): opart (nsplit, B, d), mpart/lpart (nsplit, B), cpart (nsplit, B) int32,
  // pos (B): positive logit in log2 units (written by chunk 0)
  float* opart;
  float* mpart;
  float* lpart;
  int* cpart;
  float* pos;
  // outputs
  float* loss;   // lse - scale * q_i.k_i, the positive kept apart from the negatives (0 exactly when K == 0)
  float* lse;
  float* delta;  // O - k = sum_j softmax_ij (n_j - k_i), (B, d) (0 exactly when K == 0)
  int64_t* rank;
};

// Launches the split kernel (when nsplit > 0) and the combine kernel on `stream`.
void infonce_forward_launch(const FwdParams& p, cudaStream_t stream);

struct BwdParams {
  const float* grad;
  const void* q;
  int qt, kt;          // dtypes of q and k (dk is written in k's dtype; k itself is not read)
  const float* loss;   // (B,) the forward's per-row loss
  const float* delta;  // (B, d) the forward's O - k
  int64_t B;
  int d;
  float scale;
  void* dq;  // q dtype
  void* dk;  // k dtype
};
void infonce_backward_launch(const BwdParams& p, cudaStream_t stream);

struct DnParams {
  const float* grad;
  const void* q;
  const void* n;
  int qt, nt;
  const float* lse;
  int64_t B, K;
  int d;
  bool vec_q, vec_n;
  float scale;
  void* dn;  // negatives dtype
};
void infonce_backward_negatives_launch(const DnParams& p, cudaStream_t stream);

// One (target, source) pair of the momentum update; `block0` = first block of the pair in the grid.
struct MomentumSeg {
  void* t;
  const void* s;
  int64_t n;
  int64_t block0;
};
// Blocks the momentum kernels use for a pair of n elements whose target starts at t (16-byte vectors are
// counted from t's 16-byte boundary, so the count depends on t's alignment).
int64_t momentum_blocks(int dt, const void* t, int64_t n);
// Single pair, pointers as kernel arguments (flat-buffer fast path).
void momentum_flat_launch(int dt, void* t, const void* s, int64_t n, double m, cudaStream_t stream);
// Any number of pairs: `table` is a device array of nseg segments, `nblocks` the total grid size.
void momentum_table_launch(int dt, const MomentumSeg* table, int nseg, int64_t nblocks, double m,
                           cudaStream_t stream);

struct EnqueueParams {
  void* queue;
  int qdt;
  int64_t K;
  int d;
  int64_t* ptr;
  int64_t* count;
  const void* keys;
  int kdt;
  int64_t B;
  bool normalize;
  bool* ok;
};
void enqueue_launch(const EnqueueParams& p, cudaStream_t stream);

}  // namespace mf
