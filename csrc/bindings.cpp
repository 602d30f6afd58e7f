// torch glue of moco_fast._C: argument checks, allocation, streams, and the op registrations.
//
// Ops live in their own namespace, torch.ops.moco_fast_C, with CUDA kernels only; the public, autograd-aware
// moco_fast ops (moco_fast/ops.py) call them through moco_fast/cuda_ext.py.
#include <Python.h>

#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "moco_fast.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name, bool allow_f64) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mf::kF32;
    case at::kHalf:
      return mf::kF16;
    case at::kBFloat16:
      return mf::kBF16;
    case at::kDouble:
      if (allow_f64) return mf::kF64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, "moco_fast_C: ", name, " must be float32, bfloat16 or float16",
                       allow_f64 ? " (or float64)" : "", ", got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "moco_fast_C: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "moco_fast_C: ", name, " is on ", t.device(), ", expected ", device);
}

void check_matrix(const at::Tensor& t, const char* name, const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.dim() == 2, "moco_fast_C: ", name, " must be 2-D, got shape ", t.sizes());
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

void check_d(int64_t d) {
  TORCH_CHECK(d >= 1 && d <= mf::kMaxD, "moco_fast_C: feature dimension d must be in [1, ", mf::kMaxD,
              "], got ", d, " (moco_fast.cuda_ext routes larger d to the 'torch' backend)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& n_in, double scale,
                                                               bool allow_tf32) {
  const at::Device device = q_in.device();
  check_matrix(q_in, "q", device);
  check_matrix(k_in, "k", device);
  check_matrix(n_in, "negatives", device);
  TORCH_CHECK(k_in.sizes() == q_in.sizes(), "moco_fast_C: k must have q's shape ", q_in.sizes(), ", got ",
              k_in.sizes());
  TORCH_CHECK(n_in.size(1) == q_in.size(1), "moco_fast_C: negatives must have d = ", q_in.size(1), ", got ",
              n_in.size(1));
  const int64_t B = q_in.size(0), K = n_in.size(0), d = q_in.size(1);
  check_d(d);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), n = n_in.contiguous();

  mf::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.n = n.data_ptr();
  p.qt = dtype_code(q, "q", false);
  p.kt = dtype_code(k, "k", false);
  p.nt = dtype_code(n, "negatives", false);
  if (p.qt == p.nt && p.qt == mf::kBF16) {
    p.compute = mf::kCompBF16;
  } else if (p.qt == p.nt && p.qt == mf::kF16) {
    p.compute = mf::kCompF16;
  } else {  // fp32 involved, or bf16 with fp16: fp32 operands (exact for 16-bit inputs)
    p.compute = allow_tf32 ? mf::kCompTF32 : mf::kCompF32;
  }
  p.B = B;
  p.K = K;
  p.d = static_cast<int>(d);
  p.vec_q = d % 8 == 0 && aligned16(p.q);
  p.vec_n = d % 8 == 0 && aligned16(p.n);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({B}, f32);
  at::Tensor out = at::empty({B, d}, f32);
  at::Tensor rank = at::empty({B}, q.options().dtype(at::kLong));
  if (B == 0) return {lse, out, rank};

  int bm = 0, bn = 0;
  mf::fwd_tile_shape(p.compute, p.d, &bm, &bn);
  const int64_t row_tiles = (B + bm - 1) / bm;
  const int64_t key_tiles = (K + bn - 1) / bn;
  int64_t nsplit = 0, chunk = 0;
  if (K > 0) {
    // about one wave of blocks (2 per SM); at most 1024 chunks; no empty chunk
    const int64_t target = 2 * static_cast<int64_t>(sm_count(device.index()));
    nsplit = std::min<int64_t>({std::max<int64_t>(1, (target + row_tiles - 1) / row_tiles), key_tiles, 1024});
    const int64_t tiles_per_split = (key_tiles + nsplit - 1) / nsplit;
    nsplit = (key_tiles + tiles_per_split - 1) / tiles_per_split;
    chunk = tiles_per_split * bn;
  }
  p.nsplit = static_cast<int>(nsplit);
  p.chunk = chunk;
  // workspace: O (nsplit*B*d) + m, l, count (nsplit*B each) + pos (B), all 4-byte words
  at::Tensor ws = at::empty({nsplit * B * d + 3 * nsplit * B + B}, f32);
  float* w = ws.data_ptr<float>();
  p.opart = w;
  p.mpart = p.opart + nsplit * B * d;
  p.lpart = p.mpart + nsplit * B;
  p.cpart = reinterpret_cast<int*>(p.lpart + nsplit * B);
  p.pos = reinterpret_cast<float*>(p.cpart + nsplit * B);
  p.lse = lse.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.rank = rank.data_ptr<int64_t>();
  mf::infonce_forward_launch(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return {lse, out, rank};
}

std::tuple<at::Tensor, at::Tensor> infonce_backward(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                    const at::Tensor& k_in, const at::Tensor& lse_in,
                                                    const at::Tensor& out_in, double scale) {
  const at::Device device = q_in.device();
  check_matrix(q_in, "q", device);
  check_matrix(k_in, "k", device);
  check_matrix(out_in, "out", device);
  check_cuda(grad_in, "grad", device);
  check_cuda(lse_in, "lse", device);
  const int64_t B = q_in.size(0), d = q_in.size(1);
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "moco_fast_C: q, k and out must have one shape");
  TORCH_CHECK(grad_in.numel() == B && lse_in.numel() == B, "moco_fast_C: grad and lse must have B = ", B,
              " elements");
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), lse = lse_in.to(at::kFloat).contiguous();
  const at::Tensor out = out_in.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  mf::BwdParams p{};
  p.grad = grad.data_ptr<float>();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.qt = dtype_code(q, "q", false);
  p.kt = dtype_code(k, "k", false);
  p.lse = lse.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.B = B;
  p.d = static_cast<int>(d);
  p.scale = static_cast<float>(scale);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  mf::infonce_backward_launch(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return {dq, dk};
}

at::Tensor infonce_backward_negatives(const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& n_in,
                                      const at::Tensor& lse_in, double scale) {
  const at::Device device = q_in.device();
  check_matrix(q_in, "q", device);
  check_matrix(n_in, "negatives", device);
  check_cuda(grad_in, "grad", device);
  check_cuda(lse_in, "lse", device);
  const int64_t B = q_in.size(0), K = n_in.size(0), d = q_in.size(1);
  TORCH_CHECK(n_in.size(1) == d, "moco_fast_C: negatives must have d = ", d, ", got ", n_in.size(1));
  TORCH_CHECK(grad_in.numel() == B && lse_in.numel() == B, "moco_fast_C: grad and lse must have B = ", B,
              " elements");
  check_d(d);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = q_in.contiguous(), n = n_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), lse = lse_in.to(at::kFloat).contiguous();
  at::Tensor dn = at::empty_like(n);
  if (K == 0) return dn;
  mf::DnParams p{};
  p.grad = grad.data_ptr<float>();
  p.q = q.data_ptr();
  p.n = n.data_ptr();
  p.qt = dtype_code(q, "q", false);
  p.nt = dtype_code(n, "negatives", false);
  p.lse = lse.data_ptr<float>();
  p.B = B;
  p.K = K;
  p.d = static_cast<int>(d);
  p.vec_q = d % 8 == 0 && aligned16(p.q);
  p.vec_n = d % 8 == 0 && aligned16(p.n);
  p.scale = static_cast<float>(scale);
  p.dn = dn.data_ptr();
  if (B == 0) {
    dn.zero_();
    return dn;
  }
  mf::infonce_backward_negatives_launch(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return dn;
}

void momentum_update_(at::TensorList targets, at::TensorList sources, double momentum) {
  TORCH_CHECK(targets.size() == sources.size(), "moco_fast_C: momentum_update_ got ", targets.size(),
              " targets and ", sources.size(), " sources");
  if (targets.empty()) return;
  const at::Device device = targets[0].device();
  const at::ScalarType st = targets[0].scalar_type();
  const int dt = dtype_code(targets[0], "targets", true);
  std::vector<mf::MomentumSeg> segs;
  segs.reserve(targets.size());
  const int64_t per_block = mf::momentum_block_elems(dt);
  int64_t nblocks = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    const at::Tensor& s = sources[i];
    check_cuda(t, "targets", device);
    check_cuda(s, "sources", device);
    TORCH_CHECK(t.scalar_type() == st && s.scalar_type() == st,
                "moco_fast_C: momentum_update_ needs one dtype for all tensors, got ", t.scalar_type(), " and ",
                s.scalar_type(), " at index ", i, " (first target: ", st, ")");
    TORCH_CHECK(t.numel() == s.numel(), "moco_fast_C: target ", i, " has ", t.numel(), " elements, source has ",
                s.numel());
    TORCH_CHECK(t.is_contiguous() && s.is_contiguous(), "moco_fast_C: momentum_update_ needs contiguous tensors (",
                "index ", i, ")");
    if (t.numel() == 0) continue;
    segs.push_back({t.data_ptr(), s.data_ptr(), t.numel(), nblocks});
    nblocks += (t.numel() + per_block - 1) / per_block;
  }
  if (segs.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (segs.size() == 1) {  // flat buffer: no table
    mf::momentum_flat_launch(dt, segs[0].t, segs[0].s, segs[0].n, momentum, stream);
    return;
  }
  // One pinned host buffer -> one async H2D copy -> one kernel. The caching host allocator keeps the pinned
  // block alive until the copy is done; the device table is freed in stream order.
  static_assert(sizeof(mf::MomentumSeg) == 4 * sizeof(int64_t), "table layout");
  const int64_t words = static_cast<int64_t>(segs.size()) * 4;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), segs.data(), segs.size() * sizeof(mf::MomentumSeg));
  at::Tensor dev = host.to(at::TensorOptions().dtype(at::kLong).device(device), /*non_blocking=*/true);
  mf::momentum_table_launch(dt, reinterpret_cast<const mf::MomentumSeg*>(dev.data_ptr<int64_t>()),
                            static_cast<int>(segs.size()), nblocks, momentum, stream);
}

at::Tensor enqueue_(at::Tensor& queue, at::Tensor& ptr, at::Tensor& count, const at::Tensor& keys_in,
                    bool normalize) {
  const at::Device device = queue.device();
  check_matrix(queue, "queue", device);
  check_matrix(keys_in, "keys", device);
  check_cuda(ptr, "ptr", device);
  check_cuda(count, "count", device);
  TORCH_CHECK(queue.is_contiguous(), "moco_fast_C: queue must be contiguous");
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.numel() == 1 && count.scalar_type() == at::kLong &&
                  count.numel() == 1,
              "moco_fast_C: ptr and count must be int64 tensors with one element");
  const int64_t K = queue.size(0), d = queue.size(1), B = keys_in.size(0);
  TORCH_CHECK(keys_in.size(1) == d, "moco_fast_C: keys must have d = ", d, ", got ", keys_in.size(1));
  TORCH_CHECK(B >= 1 && B <= K, "moco_fast_C: need 1 <= B <= K, got B = ", B, ", K = ", K);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor keys = keys_in.contiguous();
  at::Tensor ok = at::empty({1}, queue.options().dtype(at::kBool));
  mf::EnqueueParams p{};
  p.queue = queue.data_ptr();
  p.qdt = dtype_code(queue, "queue", true);
  p.K = K;
  p.d = static_cast<int>(d);
  p.ptr = ptr.data_ptr<int64_t>();
  p.count = count.data_ptr<int64_t>();
  p.keys = keys.data_ptr();
  p.kdt = dtype_code(keys, "keys", true);
  p.B = B;
  p.normalize = normalize;
  p.ok = ok.data_ptr<bool>();
  mf::enqueue_launch(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return ok;
}

}  // namespace

TORCH_LIBRARY(moco_fast_C, m) {
  m.def(
      "infonce_forward(Tensor q, Tensor k, Tensor negatives, float scale, bool allow_tf32=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("infonce_backward(Tensor grad, Tensor q, Tensor k, Tensor lse, Tensor out, float scale) -> (Tensor, Tensor)");
  m.def("infonce_backward_negatives(Tensor grad, Tensor q, Tensor negatives, Tensor lse, float scale) -> Tensor");
  m.def("momentum_update_(Tensor(a!)[] targets, Tensor[] sources, float momentum) -> ()");
  m.def("enqueue_(Tensor(a!) queue, Tensor(b!) ptr, Tensor(c!) count, Tensor keys, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(moco_fast_C, CUDA, m) {
  m.impl("infonce_forward", &infonce_forward);
  m.impl("infonce_backward", &infonce_backward);
  m.impl("infonce_backward_negatives", &infonce_backward_negatives);
  m.impl("momentum_update_", &momentum_update_);
  m.impl("enqueue_", &enqueue_);
}

// `import moco_fast._C` loads the library (and so runs the registrations above); no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "moco_fast CUDA kernels (torch.ops.moco_fast_C)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
