// InfoNCE over a key queue without materializing the logits.
//
// Forward (flash-decoding): grid (row tiles, key chunks). A block owns BM query rows and one chunk of
// negatives; it sweeps the chunk in tiles of BN keys:
//   S = Q N^T (tensor cores: WMMA bf16/fp16 m16n16k16 or TF32 m16n16k8; FFMA for IEEE fp32)
//   -> fp32 in shared memory -> per row: logits in log2 units t = S*scale*log2(e), running max, rank count,
//   p = exp2(t - m), running sum l, P in shared memory -> O += P N (tensor cores, fp32 accumulators).
// The running max is rescaled lazily: O and l are only rescaled when a row's max grows by more than
// kRescaleThreshold (log2 units), so p <= 2^8 and the O round trip through shared memory is rare.
// Each block writes its partial (m, l, O, count) of the negatives for its rows; the combine kernel merges
// the chunks and then the positive logit t0, kept apart from the negatives' sums so that nothing cancels
// when it dominates (docs/design.md "Numerics"): with M = max(t0, m_s), L = sum_s l_s 2^(m_s - M) and
// w0 = 2^(t0 - M), loss = ln2 (M - t0) + log1p(L + w0 - 1) (= log1p(L) when the positive is the max),
// lse = ln2 t0 + loss and delta = O - k = (sum_s 2^(m_s - M) O_s - L k) / (w0 + L), plus the rank.
// The chunking (nsplit, chunk) is the caller's plan (kernels/heuristics.py cuda_fwd_plan), checked by
// bindings.cpp against fwd_tile().
//
// Backward: dq = g scale delta and dk = g scale expm1(-loss) q are O(B*d) (one warp per row); dn (negatives
// with grad, rare) recomputes the probabilities column-parallel with FFMA (one block per 32 keys, loop over
// all rows, no atomics).
#include <mma.h>

#include <type_traits>

#include <c10/cuda/CUDAException.h>

#include "common.cuh"

namespace mf {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Forward blocks per SM the registers are capped for (__launch_bounds__: 65536 / (2 * 256) = 128 per
// thread); every tile's shared memory fits twice on sm_80 and sm_90 (tests/machine_code/test_cuda_sass.py).
constexpr int kFwdMinCtas = 2;
constexpr float kRescaleThreshold = 8.f;

constexpr int align128(long x) { return static_cast<int>((x + 127) / 128 * 128); }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Shared-memory element type of the operands for each compute type.
template <int C>
struct Storage {
  using T = float;
};
template <>
struct Storage<kCompBF16> {
  using T = __nv_bfloat16;
};
template <>
struct Storage<kCompF16> {
  using T = __half;
};

// 16-byte asynchronous global -> shared copies (sm_80+). src_bytes = 0 writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void st8_smem(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8_smem(__half* dst, const float (&v)[8]) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
  *reinterpret_cast<uint4*>(dst) = u;
}
__device__ __forceinline__ void st8_smem(__nv_bfloat16* dst, const float (&v)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
  *reinterpret_cast<uint4*>(dst) = u;
}
__device__ __forceinline__ void st1_smem(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void st1_smem(__half* dst, float v) { *dst = __float2half_rn(v); }
__device__ __forceinline__ void st1_smem(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16_rn(v); }

// Rows [row0, row0 + ROWS) x columns [0, D) of a row-major (*, d) global matrix of dtype dt into shared
// memory of element type T (leading dimension LD). Rows >= row_end and columns >= d become zeros.
//   raw:  dt is T's dtype, d % 8 == 0 and the base is 16-byte aligned: cp.async 16-byte copies (no
//         registers; the caller commits and waits).
//   else: converting loads through registers (vectorized when `vec`), visible after the next barrier.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void load_tile(T* dst, const void* src, int dt, int64_t row0, int64_t row_end, int d,
                                          bool vec, bool raw) {
  if (raw) {
    constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int CPR = D / EPC;
    const T* g = static_cast<const T*>(src);
#pragma unroll 4
    for (int idx = threadIdx.x; idx < ROWS * CPR; idx += kThreads) {
      const int r = idx / CPR;
      const int c = (idx % CPR) * EPC;
      const int64_t grow = row0 + r;
      const bool in = grow < row_end && c < d;
      cp_async16(dst + r * LD + c, in ? g + grow * d + c : g, in);
    }
    return;
  }
  constexpr int kChunks = D / 8;  // 8-element chunks per row
  // Two converting loads in flight per thread; one at d = 256, whose 64 accumulator registers per
  // thread leave no room for more under the 128-register cap (kFwdMinCtas).
  constexpr int kUnroll = D >= 256 ? 1 : 2;
#pragma unroll kUnroll
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const int64_t grow = row0 + r;
    float v[8];
    if (grow < row_end && c < d) {
      const int64_t off = grow * d + c;
      if (vec) {
        ld8(src, dt, off, v);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (c + e < d) ? ld1(src, dt, off + e) : 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = 0.f;
    }
    st8_smem(dst + r * LD + c, v);
  }
}

// Tile shapes and shared-memory layout of the forward kernel.
template <int C, int D>
struct FwdCfg {
  static constexpr bool kIsF32 = (C == kCompTF32 || C == kCompF32);
  static constexpr int BM = (kIsF32 && D == 256) ? 32 : 64;      // query rows per block
  static constexpr int BN = (kIsF32 || D == 256) ? 32 : 64;      // keys per tile
  static constexpr int NBUF = (kIsF32 && D == 256) ? 1 : 2;      // key tiles in flight (cp.async double buffer)
  using T = typename Storage<C>::T;
  static constexpr int kStorage = kIsF32 ? mf::kF32 : (C == kCompBF16 ? kBF16 : kF16);  // DType of T
  static constexpr int PAD = kIsF32 ? 4 : 8;  // 16 bytes: WMMA ldm rule, fewer bank conflicts
  static constexpr int LDQ = D + PAD;
  static constexpr int LDN = D + PAD;
  static constexpr int LDP = BN + PAD;
  static constexpr int LDS = BN + 4;
  static constexpr int RT = kThreads / BM;  // threads per row in the softmax step
  static constexpr int NV = BN / RT;        // scores per thread in the softmax step
  static constexpr int Q_OFF = 0;
  static constexpr int N_OFF = align128(Q_OFF + long(BM) * LDQ * sizeof(T));
  static constexpr int N_ELEMS = BN * LDN;  // one key buffer
  static constexpr int P_OFF = align128(N_OFF + long(NBUF) * N_ELEMS * sizeof(T));
  static constexpr int S_OFF = align128(P_OFF + long(BM) * LDP * sizeof(T));
  // S (fp32 scores) doubles as the per-warp 16x16 scratch of the WMMA accumulators once S is consumed.
  static constexpr int S_BYTES = cmax(BM * LDS * 4, kWarps * 256 * 4);
  static constexpr int A_OFF = align128(S_OFF + S_BYTES);
  static constexpr int SMEM = A_OFF + BM * 4;  // + alpha (per-row rescale factor)
  static_assert(BM * RT == kThreads && RT <= 32 && BN % RT == 0, "softmax mapping");
  static_assert((N_ELEMS * sizeof(T)) % 128 == 0, "second key buffer stays aligned");
  static_assert(SMEM <= 99 * 1024, "must fit the 99 KiB of sm_86/89 as well");
};

// Tensor-core policy (WMMA). Warp w owns PER accumulator fragments of O = rows fm*16.., columns fd0*16..
template <int C, int D>
struct WmmaPolicy {
  using Cfg = FwdCfg<C, D>;
  using T = typename Cfg::T;
  using E = std::conditional_t<C == kCompTF32, wmma::precision::tf32, T>;
  static constexpr int KS = (C == kCompTF32) ? 8 : 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, E, wmma::row_major>;
  using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, KS, E, wmma::col_major>;  // N^T from row-major N
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, E, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  static constexpr int FM = Cfg::BM / 16, FN = Cfg::BN / 16, FD = D / 16;
  static constexpr int SPER = (FM * FN >= kWarps) ? FM * FN / kWarps : 1;  // S fragments per warp
  static constexpr int SWARPS = FM * FN / SPER;                            // warps computing S
  static constexpr int PER = FM * FD / kWarps;                             // O fragments per warp
  static_assert(FN % SPER == 0 && SWARPS <= kWarps, "S mapping");
  static_assert(PER >= 1 && (FM * FD) % kWarps == 0 && FD % PER == 0, "O mapping");

  struct Acc {
    FragC o[PER];
  };

  // Operands sit in shared memory as raw fp32 for TF32: round them (to nearest) as the WMMA API asks.
  template <class Frag>
  __device__ static void load(Frag& f, const T* ptr, int ld) {
    wmma::load_matrix_sync(f, ptr, ld);
    if constexpr (C == kCompTF32) {
#pragma unroll
      for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < PER; ++i) wmma::fill_fragment(acc.o[i], 0.f);
  }

  // S[BM][BN] (fp32, ld LDS) = Q[BM][D] * N[BN][D]^T
  __device__ static void scores(const T* Qs, const T* Ns, float* Ss, int warp, int /*lane*/) {
    if (warp >= SWARPS) return;
    const int f0 = warp * SPER, fm = f0 / FN, fn0 = f0 % FN;
    FragC c[SPER];
#pragma unroll
    for (int s = 0; s < SPER; ++s) wmma::fill_fragment(c[s], 0.f);
#pragma unroll 1
    for (int k = 0; k < D; k += KS) {
      FragA a;
      load(a, Qs + fm * 16 * Cfg::LDQ + k, Cfg::LDQ);
#pragma unroll
      for (int s = 0; s < SPER; ++s) {
        FragBt b;
        load(b, Ns + (fn0 + s) * 16 * Cfg::LDN + k, Cfg::LDN);
        wmma::mma_sync(c[s], a, b, c[s]);
      }
    }
#pragma unroll
    for (int s = 0; s < SPER; ++s)
      wmma::store_matrix_sync(Ss + fm * 16 * Cfg::LDS + (fn0 + s) * 16, c[s], Cfg::LDS, wmma::mem_row_major);
  }

  // O[BM][D] += P[BM][BN] * N[BN][D]
  __device__ static void accumulate(Acc& acc, const T* Ps, const T* Ns, int warp, int /*lane*/) {
    const int f0 = warp * PER, fm = f0 / FD, fd0 = f0 % FD;
#pragma unroll 1
    for (int kk = 0; kk < Cfg::BN; kk += KS) {
      FragA a;
      load(a, Ps + fm * 16 * Cfg::LDP + kk, Cfg::LDP);
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        FragB b;
        load(b, Ns + kk * Cfg::LDN + (fd0 + i) * 16, Cfg::LDN);
        wmma::mma_sync(acc.o[i], a, b, acc.o[i]);
      }
    }
  }

  // O[r][:] *= alpha[r], through the warp's own 16x16 scratch (accumulator layouts are opaque).
  __device__ static void rescale(Acc& acc, const float* alpha, float* scratch, int warp, int lane) {
    float* w = scratch + warp * 256;
    const int fm = (warp * PER) / FD;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      wmma::store_matrix_sync(w, acc.o[i], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32) w[e] *= alpha[fm * 16 + e / 16];
      __syncwarp();
      wmma::load_matrix_sync(acc.o[i], w, 16, wmma::mem_row_major);
      __syncwarp();
    }
  }

  // out[row0 + r][c] = O[r][c] for rows < B, columns < d.
  __device__ static void write(const Acc& acc, float* scratch, float* out, int64_t row0, int64_t B, int d,
                               int warp, int lane) {
    float* w = scratch + warp * 256;
    const int f0 = warp * PER, fm = f0 / FD, fd0 = f0 % FD;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      wmma::store_matrix_sync(w, acc.o[i], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32) {
        const int64_t grow = row0 + fm * 16 + e / 16;
        const int c = (fd0 + i) * 16 + e % 16;
        if (grow < B && c < d) out[grow * d + c] = w[e];
      }
      __syncwarp();
    }
  }
};

// IEEE fp32 policy (FFMA). Thread (warp, lane) owns O rows warp + 8i, columns lane + 32cc.
template <int D>
struct FfmaPolicy {
  using Cfg = FwdCfg<kCompF32, D>;
  static constexpr int RI = Cfg::BM / kWarps;
  static constexpr int CC = D / 32;
  static_assert(Cfg::BN == 32, "one score column per lane");

  struct Acc {
    float o[RI][CC];
  };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int c = 0; c < CC; ++c) acc.o[i][c] = 0.f;
  }

  __device__ static void scores(const float* Qs, const float* Ns, float* Ss, int warp, int lane) {
    float s[RI];
#pragma unroll
    for (int i = 0; i < RI; ++i) s[i] = 0.f;
#pragma unroll 1
    for (int k = 0; k < D; k += 4) {
      const float4 nv = *reinterpret_cast<const float4*>(Ns + lane * Cfg::LDN + k);
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        const float4 qv = *reinterpret_cast<const float4*>(Qs + (warp + kWarps * i) * Cfg::LDQ + k);
        s[i] = fmaf(qv.x, nv.x, s[i]);
        s[i] = fmaf(qv.y, nv.y, s[i]);
        s[i] = fmaf(qv.z, nv.z, s[i]);
        s[i] = fmaf(qv.w, nv.w, s[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) Ss[(warp + kWarps * i) * Cfg::LDS + lane] = s[i];
  }

  __device__ static void accumulate(Acc& acc, const float* Ps, const float* Ns, int warp, int lane) {
#pragma unroll 2
    for (int j = 0; j < Cfg::BN; ++j) {
      float nv[CC];
#pragma unroll
      for (int c = 0; c < CC; ++c) nv[c] = Ns[j * Cfg::LDN + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < RI; ++i) {
        const float p = Ps[(warp + kWarps * i) * Cfg::LDP + j];
#pragma unroll
        for (int c = 0; c < CC; ++c) acc.o[i][c] = fmaf(p, nv[c], acc.o[i][c]);
      }
    }
  }

  __device__ static void rescale(Acc& acc, const float* alpha, float* /*scratch*/, int warp, int /*lane*/) {
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      const float a = alpha[warp + kWarps * i];
#pragma unroll
      for (int c = 0; c < CC; ++c) acc.o[i][c] *= a;
    }
  }

  __device__ static void write(const Acc& acc, float* /*scratch*/, float* out, int64_t row0, int64_t B, int d,
                               int warp, int lane) {
    float* orow = out + (row0 + warp) * d;
#pragma unroll
    for (int i = 0; i < RI; ++i, orow += kWarps * d) {
      if (row0 + warp + kWarps * i >= B) break;
#pragma unroll
      for (int c = 0; c < CC; ++c) {
        if (lane + 32 * c < d) orow[lane + 32 * c] = acc.o[i][c];
      }
    }
  }
};

template <int C, int D>
using PolicyFor = std::conditional_t<C == kCompF32, FfmaPolicy<D>, WmmaPolicy<C, D>>;

// One block: query rows [blockIdx.x*BM, +BM) x keys [blockIdx.y*chunk, +chunk) -> partial (m, l, O, count).
template <int C, int D>
__global__ void __launch_bounds__(kThreads, kFwdMinCtas) infonce_fwd_kernel(const FwdParams p) {
  using Cfg = FwdCfg<C, D>;
  using Pol = PolicyFor<C, D>;
  using T = typename Cfg::T;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, RT = Cfg::RT, NV = Cfg::NV;
  static_assert(NV * RT == BN, "softmax mapping");

  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + Cfg::Q_OFF);
  T* Nbuf = reinterpret_cast<T*>(smem + Cfg::N_OFF);
  T* Ps = reinterpret_cast<T*>(smem + Cfg::P_OFF);
  float* Ss = reinterpret_cast<float*>(smem + Cfg::S_OFF);
  float* alpha_s = reinterpret_cast<float*>(smem + Cfg::A_OFF);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int split = blockIdx.y;
  const int64_t kbeg = static_cast<int64_t>(split) * p.chunk;
  const int64_t kend = min(p.K, kbeg + p.chunk);
  const bool raw_q = p.vec_q && p.qt == Cfg::kStorage;
  const bool raw_n = p.vec_n && p.nt == Cfg::kStorage;

  // Q tile, and the first key tile when double-buffering: one cp.async group.
  load_tile<T, BM, D, Cfg::LDQ>(Qs, p.q, p.qt, row0, p.B, p.d, p.vec_q, raw_q);
  if (Cfg::NBUF == 2) load_tile<T, BN, D, Cfg::LDN>(Nbuf, p.n, p.nt, kbeg, kend, p.d, p.vec_n, raw_n);
  cp_async_commit();

  // Softmax-step mapping: row r is handled by the RT consecutive threads r*RT .. r*RT+RT-1.
  const int r = tid / RT, sub = tid % RT;
  const int64_t grow = row0 + r;
  // Positive logit (log2 units) in fp32 from the inputs as given; the same code in every chunk.
  float t0 = 0.f;
  if (grow < p.B) {
    for (int c = sub; c < p.d; c += RT)
      t0 = fmaf(ld1(p.q, p.qt, grow * p.d + c), ld1(p.k, p.kt, grow * p.d + c), t0);
  }
  t0 = group_sum<RT>(t0) * p.scale_log2;
  if (split == 0 && sub == 0 && grow < p.B) p.pos[grow] = t0;

  float m_used = -INFINITY;  // reference max of the exponentials (log2 units)
  float l_part = 0.f;        // this thread's share of the row sum, relative to m_used
  int cnt = 0;               // negatives with a larger logit than the positive
  typename Pol::Acc acc;
  Pol::zero(acc);

  int it = 0;
  for (int64_t key0 = kbeg; key0 < kend; key0 += BN, ++it) {
    __syncthreads();  // the previous tile's readers (key buffer, P, scratch) are done
    if (Cfg::NBUF == 2) {
      // prefetch the next tile into the other buffer, then wait for this one (always commit: uniform count)
      if (key0 + BN < kend)
        load_tile<T, BN, D, Cfg::LDN>(Nbuf + ((it + 1) & 1) * Cfg::N_ELEMS, p.n, p.nt, key0 + BN, kend, p.d,
                                      p.vec_n, raw_n);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_tile<T, BN, D, Cfg::LDN>(Nbuf, p.n, p.nt, key0, kend, p.d, p.vec_n, raw_n);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* Ns = Nbuf + (Cfg::NBUF == 2 ? (it & 1) * Cfg::N_ELEMS : 0);
    Pol::scores(Qs, Ns, Ss, warp, lane);
    __syncthreads();

    // Two passes over this row's scores in shared memory (cheaper than holding them in registers).
    const int valid = static_cast<int>(min(static_cast<int64_t>(BN), kend - key0));  // keys of this tile
    const float* srow = Ss + r * Cfg::LDS;
    float tmax = -INFINITY;
#pragma unroll
    for (int t = 0; t < NV; ++t) {
      const int j = sub + RT * t;
      const float s = j < valid ? srow[j] * p.scale_log2 : -INFINITY;
      tmax = fmaxf(tmax, s);
      cnt += (s > t0) ? 1 : 0;
    }
    tmax = group_max<RT>(tmax);
    const bool need = tmax > m_used + kRescaleThreshold;
    float alpha = 1.f;
    if (need) {
      alpha = exp2f(m_used - tmax);  // 0 on the first tile (m_used = -inf)
      m_used = tmax;
      l_part *= alpha;
    }
    if (sub == 0) alpha_s[r] = alpha;
#pragma unroll
    for (int t = 0; t < NV; ++t) {
      const int j = sub + RT * t;
      const float e = j < valid ? exp2f(srow[j] * p.scale_log2 - m_used) : 0.f;
      l_part += e;
      st1_smem(Ps + r * Cfg::LDP + j, e);
    }
    if (__syncthreads_or(need ? 1 : 0)) Pol::rescale(acc, alpha_s, Ss, warp, lane);
    Pol::accumulate(acc, Ps, Ns, warp, lane);
  }

  const float l = group_sum<RT>(l_part);
  cnt = group_sum<RT>(cnt);
  if (sub == 0 && grow < p.B) {
    const int64_t o = static_cast<int64_t>(split) * p.B + grow;
    p.mpart[o] = m_used;
    p.lpart[o] = l;
    p.cpart[o] = cnt;
  }
  // Every S read happened before the last __syncthreads_or: the S region is free as scratch.
  Pol::write(acc, Ss, p.opart + static_cast<int64_t>(split) * p.B * p.d, row0, p.B, p.d, warp, lane);
}

constexpr int kCombineThreads = 128;

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < kCombineThreads / 32; ++i) v = kMax ? fmaxf(v, red[i]) : v + red[i];
  return v;
}

// One block per row: merge the nsplit partials of the negatives, then the positive t0 apart from them; write
// loss, lse, delta and rank of the row. K = 0 (nsplit = 0): M = t0, L = 0, so loss = 0 and delta = 0 exactly.
__global__ void __launch_bounds__(kCombineThreads) infonce_combine_kernel(const FwdParams p) {
  extern __shared__ float w_s[];  // nsplit chunk weights
  __shared__ float red[kCombineThreads / 32];
  __shared__ unsigned long long cnt_s;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t B = p.B;
  const int d = p.d;

  if (tid == 0) cnt_s = 0;  // published by the barriers of block_reduce below
  float t0;
  if (p.nsplit > 0) {
    t0 = p.pos[row];
  } else {
    float s = 0.f;
    for (int c = tid; c < d; c += kCombineThreads)
      s = fmaf(ld1(p.q, p.qt, row * d + c), ld1(p.k, p.kt, row * d + c), s);
    t0 = block_reduce<false>(s, red) * p.scale_log2;
  }
  float M = t0;
  for (int s = tid; s < p.nsplit; s += kCombineThreads) M = fmaxf(M, p.mpart[s * B + row]);
  M = block_reduce<true>(M, red);
  float L = 0.f;
  unsigned long long cnt = 0;
  for (int s = tid; s < p.nsplit; s += kCombineThreads) {
    const float w = exp2f(p.mpart[s * B + row] - M);
    w_s[s] = w;
    L = fmaf(p.lpart[s * B + row], w, L);
    cnt += static_cast<unsigned long long>(p.cpart[s * B + row]);
  }
  if (cnt) atomicAdd(&cnt_s, cnt);
  const float w0 = exp2f(t0 - M);
  L = block_reduce<false>(L, red);  // the negatives' sum relative to M; its barriers also publish w_s, cnt_s
  const float inv = 1.f / (w0 + L);
  for (int c = tid; c < d; c += kCombineThreads) {
    float o = -L * ld1(p.k, p.kt, row * d + c);  // sum_j e_j (n_j - k): the positive's term is 0
    for (int s = 0; s < p.nsplit; ++s) o = fmaf(w_s[s], p.opart[(s * B + row) * d + c], o);
    p.delta[row * d + c] = o * inv;
  }
  if (tid == 0) {
    // w0 - 1 is exactly 0 when the positive is the max (then M = t0): K = 0 gives log1pf(0) = 0. log1pf is
    // the accurate libdevice function under --use_fast_math too (only logf/log2f/expf... become intrinsics).
    // NaN stays NaN (t0 or L).
    const float loss = (M - t0) * kLn2 + log1pf(L + (M > t0 ? w0 - 1.f : 0.f));
    p.loss[row] = loss;
    p.lse[row] = t0 * kLn2 + loss;
    p.rank[row] = static_cast<int64_t>(cnt_s);
  }
}

template <int V>
using Int = std::integral_constant<int, V>;

// f(Int<C>{}, Int<D>{}) for the kernel instance serving (compute, d): D = d padded to 32/64/128/256.
template <class F>
void dispatch_fwd(int compute, int d, F&& f) {
  auto by_d = [&](auto c) {
    if (d <= 32) {
      f(c, Int<32>{});
    } else if (d <= 64) {
      f(c, Int<64>{});
    } else if (d <= 128) {
      f(c, Int<128>{});
    } else {
      f(c, Int<256>{});
    }
  };
  switch (compute) {
    case kCompBF16:
      return by_d(Int<kCompBF16>{});
    case kCompF16:
      return by_d(Int<kCompF16>{});
    case kCompTF32:
      return by_d(Int<kCompTF32>{});
    default:
      return by_d(Int<kCompF32>{});
  }
}

template <int C, int D>
void allow_fwd_smem() {
  C10_CUDA_CHECK(cudaFuncSetAttribute(infonce_fwd_kernel<C, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      FwdCfg<C, D>::SMEM));
}

// ---------------------------------------------------------------------------------------------------
// Backward.

constexpr int kBwdWarps = 8;

// dq = g*scale*delta in q's dtype, dk = g*scale*(p0 - 1)*q in k's dtype with p0 - 1 = expm1(-loss) (exact for
// a tiny loss, 0 when K = 0); one warp per row. Neither k nor the negatives are read.
__global__ void __launch_bounds__(kBwdWarps * 32) infonce_bwd_kernel(const BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kBwdWarps + threadIdx.x / 32;
  if (row >= p.B) return;  // whole warp leaves together
  const int d = p.d;
  const float gs = p.grad[row] * p.scale;
  const float gp = gs * expm1f(-p.loss[row]);
  for (int c = lane; c < d; c += 32) {
    const int64_t i = row * d + c;
    st1(p.dq, p.qt, i, gs * p.delta[i]);
    st1(p.dk, p.kt, i, gp * ld1(p.q, p.qt, i));
  }
}

constexpr int kDnKeys = 32;  // negatives per block
constexpr int kDnRows = 32;  // query rows per step

template <int D>
struct DnCfg {
  static constexpr int LD = D + 4;
  static constexpr int LDP = kDnRows + 1;
  static constexpr int N_OFF = 0;
  static constexpr int Q_OFF = align128(long(kDnKeys) * LD * 4);
  static constexpr int P_OFF = align128(Q_OFF + long(kDnRows) * LD * 4);
  static constexpr int G_OFF = align128(P_OFF + long(kDnKeys) * LDP * 4);
  static constexpr int SMEM = G_OFF + 2 * kDnRows * 4;
  static_assert(SMEM <= 99 * 1024, "smem");
};

// dn_j = scale * sum_i g_i * exp(scale*q_i.n_j - lse_i) * q_i for 32 keys per block (FFMA, fp32).
template <int D>
__global__ void __launch_bounds__(kThreads) infonce_dn_kernel(const DnParams p) {
  using Cfg = DnCfg<D>;
  constexpr int LD = Cfg::LD, LDP = Cfg::LDP, CC = D / 32, JJ = kDnKeys / kWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  float* Ns = reinterpret_cast<float*>(smem + Cfg::N_OFF);
  float* Qs = reinterpret_cast<float*>(smem + Cfg::Q_OFF);
  float* Ps = reinterpret_cast<float*>(smem + Cfg::P_OFF);
  float* g_s = reinterpret_cast<float*>(smem + Cfg::G_OFF);
  float* lse_s = g_s + kDnRows;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kDnKeys;
  const float scale_log2 = p.scale * kLog2e;
  load_tile<float, kDnKeys, D, LD>(Ns, p.n, p.nt, key0, p.K, p.d, p.vec_n, false);

  float acc[JJ][CC];
#pragma unroll
  for (int j = 0; j < JJ; ++j)
#pragma unroll
    for (int c = 0; c < CC; ++c) acc[j][c] = 0.f;

  // score mapping: key sj = tid / 8, rows si + 8t
  const int sj = tid / 8, si = tid % 8;
  for (int64_t row0 = 0; row0 < p.B; row0 += kDnRows) {
    __syncthreads();  // previous step done with Qs/Ps (and Ns written before the first step)
    load_tile<float, kDnRows, D, LD>(Qs, p.q, p.qt, row0, p.B, p.d, p.vec_q, false);
    if (tid < kDnRows) {
      const int64_t i = row0 + tid;
      g_s[tid] = i < p.B ? p.grad[i] : 0.f;
      lse_s[tid] = i < p.B ? p.lse[i] * kLog2e : 0.f;
    }
    __syncthreads();
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int k = 0; k < D; k += 4) {
      const float4 nv = *reinterpret_cast<const float4*>(Ns + sj * LD + k);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const float4 qv = *reinterpret_cast<const float4*>(Qs + (si + 8 * t) * LD + k);
        s[t] = fmaf(qv.x, nv.x, s[t]);
        s[t] = fmaf(qv.y, nv.y, s[t]);
        s[t] = fmaf(qv.z, nv.z, s[t]);
        s[t] = fmaf(qv.w, nv.w, s[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int i = si + 8 * t;
      Ps[sj * LDP + i] = (row0 + i < p.B) ? g_s[i] * exp2f(s[t] * scale_log2 - lse_s[i]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int i = 0; i < kDnRows; ++i) {
      float qv[CC];
#pragma unroll
      for (int c = 0; c < CC; ++c) qv[c] = Qs[i * LD + lane + 32 * c];
#pragma unroll
      for (int j = 0; j < JJ; ++j) {
        const float pv = Ps[(warp + kWarps * j) * LDP + i];
#pragma unroll
        for (int c = 0; c < CC; ++c) acc[j][c] = fmaf(pv, qv[c], acc[j][c]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < JJ; ++j) {
    const int64_t key = key0 + warp + kWarps * j;
#pragma unroll
    for (int c = 0; c < CC; ++c) {
      const int col = lane + 32 * c;
      if (key < p.K && col < p.d) st1(p.dn, p.nt, key * p.d + col, acc[j][c] * p.scale);
    }
  }
}

template <int D>
void launch_dn(const DnParams& p, cudaStream_t stream) {
  auto kernel = infonce_dn_kernel<D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DnCfg<D>::SMEM));
  const unsigned grid = static_cast<unsigned>((p.K + kDnKeys - 1) / kDnKeys);
  kernel<<<grid, kThreads, DnCfg<D>::SMEM, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

FwdTile fwd_tile(int compute, int d) {
  FwdTile t{};
  dispatch_fwd(compute, d, [&](auto c, auto dd) {
    using Cfg = FwdCfg<decltype(c)::value, decltype(dd)::value>;
    t = FwdTile{Cfg::BM, Cfg::BN, kThreads, Cfg::SMEM};
  });
  return t;
}

int fwd_ctas_per_sm(int compute, int d) {
  int n = 0;
  dispatch_fwd(compute, d, [&](auto c, auto dd) {
    constexpr int C = decltype(c)::value, D = decltype(dd)::value;
    allow_fwd_smem<C, D>();
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, infonce_fwd_kernel<C, D>, kThreads, FwdCfg<C, D>::SMEM));
  });
  return n;
}

void infonce_forward_launch(const FwdParams& params, cudaStream_t stream) {
  if (params.B == 0) return;
  FwdParams p = params;
  p.scale_log2 = static_cast<float>(params.scale * kLog2eD);
  if (p.nsplit > 0) {
    dispatch_fwd(p.compute, p.d, [&](auto c, auto dd) {
      constexpr int C = decltype(c)::value, D = decltype(dd)::value;
      using Cfg = FwdCfg<C, D>;
      allow_fwd_smem<C, D>();
      const dim3 grid(static_cast<unsigned>((p.B + Cfg::BM - 1) / Cfg::BM), static_cast<unsigned>(p.nsplit));
      infonce_fwd_kernel<C, D><<<grid, kThreads, Cfg::SMEM, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static_assert(kMaxSplits * sizeof(float) <= 48 * 1024, "the combine's chunk weights fit the default shared memory");
  const size_t smem = static_cast<size_t>(p.nsplit) * sizeof(float);
  infonce_combine_kernel<<<static_cast<unsigned>(p.B), kCombineThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void infonce_backward_launch(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  const unsigned grid = static_cast<unsigned>((p.B + kBwdWarps - 1) / kBwdWarps);
  infonce_bwd_kernel<<<grid, kBwdWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void infonce_backward_negatives_launch(const DnParams& p, cudaStream_t stream) {
  if (p.K == 0) return;
  if (p.d <= 32) {
    launch_dn<32>(p, stream);
  } else if (p.d <= 64) {
    launch_dn<64>(p, stream);
  } else if (p.d <= 128) {
    launch_dn<128>(p, stream);
  } else {
    launch_dn<256>(p, stream);
  }
}

}  // namespace mf
