// Host-side interface between bindings.cpp (torch glue) and the .cu files (kernels).
// Kept free of torch headers so the .cu files compile quickly (no ATen in the device passes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mf {

// Element types of raw device buffers.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// What the InfoNCE forward feeds the tensor cores with.
//   kCompBF16 / kCompF16: q and negatives are both bf16 (both fp16): WMMA m16n16k16, fp32 accumulation.
//   kCompTF32: anything else (some operand fp32, or bf16 mixed with fp16) when TF32 is allowed:
//              operands converted to fp32 (exact for bf16/fp16) then rounded to TF32, WMMA m16n16k8.
//   kCompF32:  the same with IEEE fp32 FFMA (torch.get_float32_matmul_precision() == "highest").
enum Compute : int { kCompBF16 = 0, kCompF16 = 1, kCompTF32 = 2, kCompF32 = 3 };

constexpr int kMaxD = 256;  // largest feature dimension the kernels take (d is padded up to 32/64/128/256)

struct FwdParams {
  const void* q;
  const void* k;
  const void* n;
  int qt, kt, nt;  // DType of q, k, negatives
  int compute;     // Compute
  int64_t B, K;
  int d;
  bool vec_q, vec_n;  // 16-byte vector loads allowed (aligned base, d % 8 == 0)
  float scale_log2;   // scale * log2(e)
  int nsplit;         // number of key chunks (0 when K == 0)
  int64_t chunk;      // keys per chunk (multiple of the key tile)
  // workspace (fp32 unless noted): opart (nsplit, B, d), mpart/lpart (nsplit, B), cpart (nsplit, B) int32,
  // pos (B): positive logit in log2 units (written by chunk 0)
  float* opart;
  float* mpart;
  float* lpart;
  int* cpart;
  float* pos;
  // outputs
  float* lse;
  float* out;
  int64_t* rank;
};

// Rows per tile (bm) and keys per tile (bn) of the forward kernel for this compute type and d.
void fwd_tile_shape(int compute, int d, int* bm, int* bn);
// Launches the split kernel (when nsplit > 0) and the combine kernel on `stream`.
void infonce_forward_launch(const FwdParams& p, cudaStream_t stream);

struct BwdParams {
  const float* grad;
  const void* q;
  const void* k;
  int qt, kt;
  const float* lse;
  const float* out;
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
// Elements one block of the momentum kernel handles for this dtype.
int64_t momentum_block_elems(int dt);
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
