// torch glue of moco_fast._C: argument checks, allocation, streams, and the op registrations.
//
// Ops live in their own namespace, torch.ops.moco_fast_C, with CUDA kernels only; the public, autograd-aware
// moco_fast ops (moco_fast/ops.py) call them through moco_fast/cuda_ext.py.
#include <Python.h>

#include <cstring>
#include <string>
#include <utility>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
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

void check_d(int64_t d) {
  TORCH_CHECK_VALUE(d >= 1 && d <= mf::kMaxD, "moco_fast_C: the feature dimension d must be in [1, ", mf::kMaxD,
                    "], got ", d);
}

// The compute type named by the caller's plan (kernels/heuristics.py CUDA_COMPUTES).
int parse_compute(const std::string& name) {
  if (name == "bfloat16") return mf::kCompBF16;
  if (name == "float16") return mf::kCompF16;
  if (name == "tf32") return mf::kCompTF32;
  if (name == "ieee") return mf::kCompF32;
  TORCH_CHECK_VALUE(false, "moco_fast_C: compute must be 'bfloat16', 'float16', 'tf32' or 'ieee', got '", name, "'");
  return -1;
}

// [block_m, block_n, threads, smem bytes, resident blocks per SM on `device` (0 when device < 0), max splits]
// of the forward kernel for (compute, d): the facts the Python plan (kernels/heuristics.py) is made from.
std::vector<int64_t> infonce_forward_tile(const std::string& compute_name, int64_t d, int64_t device) {
  const int compute = parse_compute(compute_name);
  check_d(d);
  const mf::FwdTile t = mf::fwd_tile(compute, static_cast<int>(d));
  int64_t ctas = 0;
  if (device >= 0) {
    TORCH_CHECK_VALUE(device < c10::cuda::device_count(), "moco_fast_C: device ", device, " does not exist (",
                      static_cast<int>(c10::cuda::device_count()), " CUDA devices)");
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    ctas = mf::fwd_ctas_per_sm(compute, static_cast<int>(d));
  }
  return {t.bm, t.bn, t.threads, t.smem, ctas, mf::kMaxSplits};
}

// The caller's plan must be one the kernels can run: compute readable from these dtypes, and chunks of
// whole key tiles, none empty, covering all K keys (K = 0: no chunks).
void check_plan(int compute, int qt, int nt, int d, int64_t K, int64_t nsplit, int64_t chunk) {
  TORCH_CHECK_VALUE(compute != mf::kCompBF16 || (qt == mf::kBF16 && nt == mf::kBF16),
                    "moco_fast_C: compute 'bfloat16' needs q and negatives both bfloat16");
  TORCH_CHECK_VALUE(compute != mf::kCompF16 || (qt == mf::kF16 && nt == mf::kF16),
                    "moco_fast_C: compute 'float16' needs q and negatives both float16");
  if (K == 0) {
    TORCH_CHECK_VALUE(nsplit == 0 && chunk == 0, "moco_fast_C: with K = 0 negatives the plan must have num_splits = 0",
                      " and keys_per_split = 0, got ", nsplit, " and ", chunk);
    return;
  }
  const int64_t bn = mf::fwd_tile(compute, d).bn;
  TORCH_CHECK_VALUE(nsplit >= 1 && nsplit <= mf::kMaxSplits, "moco_fast_C: num_splits must be in [1, ", mf::kMaxSplits,
                    "] for K = ", K, ", got ", nsplit);
  TORCH_CHECK_VALUE(chunk >= bn && chunk % bn == 0 && chunk <= (K + bn - 1) / bn * bn,
                    "moco_fast_C: keys_per_split must be a positive multiple of the key tile ", bn, " and at most ",
                    (K + bn - 1) / bn * bn, " for K = ", K, ", got ", chunk);
  TORCH_CHECK_VALUE((nsplit - 1) * chunk < K && K <= nsplit * chunk, "moco_fast_C: ", nsplit, " splits of ", chunk,
                    " keys must cover K = ", K, " keys with no empty split");
}

// Shapes, dtypes and the plan of an infonce_forward call, whatever the device: shared by the CUDA kernel
// and the Meta kernel (which lets the checks run, and be tested, without a GPU).
mf::FwdParams check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& n, const std::string& compute,
                            int64_t num_splits, int64_t keys_per_split) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {n, "negatives"}}) {
    TORCH_CHECK_VALUE(t.dim() == 2, "moco_fast_C: ", name, " must be 2-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == q.device(), "moco_fast_C: ", name, " is on ", t.device(), ", expected ", q.device());
  }
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "moco_fast_C: k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(n.size(1) == q.size(1), "moco_fast_C: negatives must have d = ", q.size(1), ", got ", n.size(1));
  check_d(q.size(1));
  mf::FwdParams p{};
  p.qt = dtype_code(q, "q", false);
  p.kt = dtype_code(k, "k", false);
  p.nt = dtype_code(n, "negatives", false);
  p.compute = parse_compute(compute);
  p.B = q.size(0);
  p.K = n.size(0);
  p.d = static_cast<int>(q.size(1));
  check_plan(p.compute, p.qt, p.nt, p.d, p.K, num_splits, keys_per_split);
  p.nsplit = static_cast<int>(num_splits);
  p.chunk = keys_per_split;
  return p;
}

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdOut forward_outputs(const at::Tensor& q) {
  const int64_t B = q.size(0), d = q.size(1);
  auto f32 = q.options().dtype(at::kFloat);
  return {at::empty({B}, f32), at::empty({B}, f32), at::empty({B, d}, f32), at::empty({B}, q.options().dtype(at::kLong))};
}

FwdOut infonce_forward_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& n, double /*scale*/,
                            const std::string& compute, int64_t num_splits, int64_t keys_per_split) {
  check_forward(q, k, n, compute, num_splits, keys_per_split);
  return forward_outputs(q);
}

FwdOut infonce_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& n_in, double scale,
                       const std::string& compute, int64_t num_splits, int64_t keys_per_split) {
  const at::Device device = q_in.device();
  check_cuda(q_in, "q", device);
  check_cuda(k_in, "k", device);
  check_cuda(n_in, "negatives", device);
  mf::FwdParams p = check_forward(q_in, k_in, n_in, compute, num_splits, keys_per_split);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), n = n_in.contiguous();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.n = n.data_ptr();
  p.vec_q = p.d % 8 == 0 && aligned16(p.q);
  p.vec_n = p.d % 8 == 0 && aligned16(p.n);
  p.scale = scale;
  auto outputs = forward_outputs(q);
  auto& [loss, lse, delta, rank] = outputs;
  const int64_t B = p.B, d = p.d, nsplit = p.nsplit;
  if (B == 0) return outputs;
  // workspace: O (nsplit*B*d) + m, l, count (nsplit*B each) + pos (B), all 4-byte words
  at::Tensor ws = at::empty({nsplit * B * d + 3 * nsplit * B + B}, q.options().dtype(at::kFloat));
  float* w = ws.data_ptr<float>();
  p.opart = w;
  p.mpart = p.opart + nsplit * B * d;
  p.lpart = p.mpart + nsplit * B;
  p.cpart = reinterpret_cast<int*>(p.lpart + nsplit * B);
  p.pos = reinterpret_cast<float*>(p.cpart + nsplit * B);
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.rank = rank.data_ptr<int64_t>();
  mf::infonce_forward_launch(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  return outputs;
}

// dk is written in k's dtype and shape; k's values are not needed (dk = g scale expm1(-loss) q).
std::tuple<at::Tensor, at::Tensor> infonce_backward(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                    const at::Tensor& k_in, const at::Tensor& loss_in,
                                                    const at::Tensor& delta_in, double scale) {
  const at::Device device = q_in.device();
  check_matrix(q_in, "q", device);
  check_matrix(k_in, "k", device);
  check_matrix(delta_in, "delta", device);
  check_cuda(grad_in, "grad", device);
  check_cuda(loss_in, "loss", device);
  const int64_t B = q_in.size(0), d = q_in.size(1);
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && delta_in.sizes() == q_in.sizes(),
              "moco_fast_C: q, k and delta must have one shape");
  TORCH_CHECK(grad_in.numel() == B && loss_in.numel() == B, "moco_fast_C: grad and loss must have B = ", B,
              " elements");
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), loss = loss_in.to(at::kFloat).contiguous();
  const at::Tensor delta = delta_in.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k_in, at::MemoryFormat::Contiguous);
  mf::BwdParams p{};
  p.grad = grad.data_ptr<float>();
  p.q = q.data_ptr();
  p.qt = dtype_code(q, "q", false);
  p.kt = dtype_code(k_in, "k", false);
  p.loss = loss.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
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
    nblocks += mf::momentum_blocks(dt, t.data_ptr(), t.numel());
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
  // The plan (compute, num_splits, keys_per_split) comes from kernels/heuristics.py cuda_fwd_plan.
  m.def(
      "infonce_forward(Tensor q, Tensor k, Tensor negatives, float scale, str compute, int num_splits, "
      "int keys_per_split) -> (Tensor loss, Tensor lse, Tensor delta, Tensor rank)");
  // No tensor arguments: a catch-all kernel, callable on any machine (device < 0: no occupancy query).
  m.def("infonce_forward_tile(str compute, int d, int device=-1) -> int[]", &infonce_forward_tile);
  m.def(
      "infonce_backward(Tensor grad, Tensor q, Tensor k, Tensor loss, Tensor delta, float scale) -> (Tensor, Tensor)");
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

// The forward's shape, dtype and plan checks without a GPU (outputs: empty meta tensors of the right shapes).
TORCH_LIBRARY_IMPL(moco_fast_C, Meta, m) { m.impl("infonce_forward", &infonce_forward_meta); }

// `import moco_fast._C` loads the library (and so runs the registrations above); no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "moco_fast CUDA kernels (torch.ops.moco_fast_C)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
