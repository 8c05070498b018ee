// The featadapt::cuda_* ops: defined once here (TORCH_LIBRARY), implemented
// for CUDA tensors (TORCH_LIBRARY_IMPL) on top of the CUTLASS GEMMs and passes of gemm.h. Their
// signatures are the triton kernels' (featadapt/kernels/triton), so one set
// of autograd Functions drives either; featadapt/kernels/cuda.py registers
// their fake implementations for torch.compile.
//
// Each op checks its inputs with messages that name the argument, what was
// expected and what was given, allocates its outputs and launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <optional>
#include <tuple>

#include "build_info.h"
#include "gemm.h"

namespace featadapt {
namespace {

using at::Tensor;

// -- checks ----------------------------------------------------------------------

ScalarKind scalar_kind(const char* op, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK(false, op, ": expected float16 or bfloat16 tensors, got ", t.scalar_type(),
                  " (float32 and float64 run on backend='torch': the CUTLASS kernels multiply 16-bit inputs, and "
                  "TF32 would change float32's numerics)");
  }
}

void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& like, int64_t size,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_size(const char* op, const char* name, int dim, const Tensor& t, int64_t expected, const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must be ", meaning, " = ", expected,
              ", got shape ", t.sizes());
}

// The first input must be a CUDA tensor of a supported dtype; the rest follow it.
ScalarKind check_first(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  return scalar_kind(op, t);
}

// -- operands ----------------------------------------------------------------------

// A row-major matrix the kernels can read: unit column stride, a row stride
// of whole 16-byte units, a 16-byte-aligned start. Activations that arrive in
// another layout (a gradient autograd expanded, say) are copied; the forward
// inputs are checked by the backend first (cuda_backend.not_supported_reasons),
// so dispatch sends such a call to torch instead of paying for a copy here.
bool readable(const Tensor& t) {
  const int64_t row = t.size(0) > 1 ? t.stride(0) : t.size(1);
  return t.stride(1) == 1 && row % 8 == 0 && row >= t.size(1) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

Tensor operand(const Tensor& t) {
  if (t.numel() == 0 || readable(t)) return t;
  Tensor c = t.contiguous();
  return readable(c) ? c : c.clone();  // (a contiguous view at an odd offset)
}

int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// A (size,) float32 vector, contiguous and 16-byte aligned (RowBroadcast reads it in vectors).
Tensor float_vector(const Tensor& t) {
  Tensor c = t.to(at::kFloat).contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

template <typename T = void>
T* pointer(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// (c10's CUDA headers only: ATen's CUDA context pulls in the cuBLAS and
// cuSPARSE headers, which a minimal toolkit does not have.)
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The current device's SM count and compute capability, asked once per device.
struct DeviceInfo {
  int sm_count = 0, capability = 0;
};

DeviceInfo device_info() {
  static std::array<std::atomic<int>, 64> sms{}, capabilities{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= static_cast<int>(sms.size())) device = static_cast<int>(sms.size()) - 1;  // (never in practice)
  DeviceInfo info{sms[device].load(std::memory_order_relaxed), capabilities[device].load(std::memory_order_relaxed)};
  if (info.sm_count == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    info.capability = 10 * major + minor;
    capabilities[device].store(info.capability, std::memory_order_relaxed);
    sms[device].store(info.sm_count, std::memory_order_relaxed);
  }
  return info;
}

// The compute capabilities the kernels were compiled for (build_info.h).
constexpr int kBuiltArchs[] = {0, FEATADAPT_CUDA_ARCH_LIST};

bool built_for(int capability) {
  for (int a : kBuiltArchs)
    if (a == capability) return true;
  return false;
}

// The Hopper kernels on an sm_90 GPU when they were built (sm_90a code runs on
// 9.0 only); CUTLASS's Ampere kernels everywhere else. FEATADAPT_CUTLASS_ARCH=sm80
// runs the Ampere kernels on a Hopper GPU too (from their PTX: build with 8.0),
// so one GPU machine can check both.
GemmArch arch_for(int capability) {
  const char* forced = std::getenv("FEATADAPT_CUTLASS_ARCH");
  if (forced != nullptr && std::string(forced) == "sm80") return GemmArch::Sm80;
  return capability == 90 && built_for(90) ? GemmArch::Sm90 : GemmArch::Sm80;
}

GemmArch arch_named(int64_t capability) {
  TORCH_CHECK(capability == 80 || capability == 90, "featadapt::cuda_plan: capability must be 80 (CUTLASS's sm_80 "
              "kernels) or 90 (its sm_90a kernels), got ", capability);
  return capability == 90 ? GemmArch::Sm90 : GemmArch::Sm80;
}

Tensor workspace_for(const Plan& plan, const Tensor& like) {
  return at::empty({static_cast<int64_t>(plan.workspace)}, like.options().dtype(at::kByte));
}

void check_plan(const char* op, const Plan& plan) {
  TORCH_CHECK(plan.ok(), op, ": ", plan.reason, " (cuda_backend.not_supported_reasons sends such calls to torch)");
}

// The linear GEMM on this device's architecture: planned, refused with the
// reason if CUTLASS cannot run it, else launched with the workspace it asked for.
void run_linear_here(const char* op, ScalarKind kind, const LinearArgs& args, const Tensor& like) {
  const DeviceInfo device = device_info();
  const GemmArch arch = arch_for(device.capability);
  const Plan plan = plan_linear(arch, kind, args, device.sm_count);
  check_plan(op, plan);
  Tensor workspace = workspace_for(plan, like);
  run_linear(arch, kind, args, device.sm_count, workspace.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// -- the problems each op hands to CUTLASS (the op and cuda_plan share these) -----------

// y (m × n) = x (m × k) W0ᵀ: x's rows, W0 (n × k) contiguous
LinearArgs forward_args(int64_t m, int64_t n, int64_t k, int64_t ldx) {
  LinearArgs a;
  a.shape = {m, n, k, ldx, k, n, /*b_is_n_by_k=*/true};
  return a;
}

// dx (m × k) = dy (m × n) W0 (n × k)
GemmShape input_gradient_shape(int64_t m, int64_t n, int64_t k, int64_t lddy) {
  return {m, k, n, lddy, k, k, /*b_is_n_by_k=*/false};
}

// -- ops -------------------------------------------------------------------------

// y = (x ⊙ scale + shift) weightᵀ + bias = x (W0 diag(scale))ᵀ + (W0 shift + bias):
// the scale moves onto the weight (a pass over N·K, not M·K) and the shift
// into the bias, so the GEMM is CUTLASS's with a bias epilogue.
Tensor scaled_gemm(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias,
                   const Tensor& scale, const std::optional<Tensor>& shift) {
  const char* op = "featadapt::cuda_scaled_gemm";
  const ScalarKind kind = check_first(op, "x", x_in);
  check_matrix(op, "weight", weight_in, x_in, x_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight_in.size(0);
  check_size(op, "weight", 1, weight_in, k, "x.shape[1] (K)");
  if (bias) check_vector(op, "bias", *bias, x_in, n, x_in.scalar_type());
  check_vector(op, "scale", scale, x_in, k, at::kFloat);
  if (shift) check_vector(op, "shift", *shift, x_in, k, at::kFloat);
  const c10::cuda::CUDAGuard guard(x_in.device());

  if (k == 0 || m == 0) {  // no reduction: y is the bias (F.linear's answer)
    Tensor y = at::zeros({m, n}, x_in.options());
    return bias ? y.add_(*bias) : y;
  }
  const Tensor x = operand(x_in), weight = weight_in.contiguous();
  const Tensor scale_f = float_vector(scale), shift_f = shift ? float_vector(*shift) : Tensor();
  const Tensor bias_c = bias ? bias->contiguous() : Tensor();
  Tensor w_scaled = at::empty({n, k}, x.options());
  Tensor bias_out = (bias || shift) ? at::empty({n}, x.options()) : Tensor();
  launch_scale_weight(kind, weight.data_ptr(), n, k, weight.stride(0), pointer<float>(scale_f),
                      pointer<float>(shift_f), pointer(bias_c), w_scaled.data_ptr(), pointer(bias_out),
                      current_stream());

  Tensor y = at::empty({m, n}, x.options());
  LinearArgs args = forward_args(m, n, k, row_stride(x));
  args.a = x.data_ptr();
  args.b = w_scaled.data_ptr();
  args.c = pointer(bias_out);
  args.ldc = 0;  // a bias row
  args.d = y.data_ptr();
  run_linear_here(op, kind, args, y);
  return y;
}

VefaBackwardArgs vefa_backward_args(int64_t m, int64_t n, int64_t k, int64_t lddy, int64_t ldx) {
  VefaBackwardArgs a;
  a.shape = input_gradient_shape(m, n, k, lddy);
  a.ldx = ldx;
  return a;
}

// (dx, dscale, dshift): g = dy weight, dx = g ⊙ scale, dscale = Σ_m g ⊙ x,
// dshift = Σ_m g; each empty unless asked for; dscale and dshift are float32.
std::tuple<Tensor, Tensor, Tensor> scaled_gemm_backward(const Tensor& dy_in, const Tensor& x_in,
                                                        const Tensor& weight_in, const Tensor& scale, bool need_dx,
                                                        bool need_dscale, bool need_dshift) {
  const char* op = "featadapt::cuda_scaled_gemm_backward";
  check_first(op, "dy", dy_in);
  const ScalarKind kind = scalar_kind(op, dy_in);
  check_matrix(op, "x", x_in, dy_in, dy_in.scalar_type());
  check_matrix(op, "weight", weight_in, dy_in, dy_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight_in.size(0);
  check_size(op, "weight", 1, weight_in, k, "x.shape[1] (K)");
  check_size(op, "dy", 0, dy_in, m, "x.shape[0] (M)");
  check_size(op, "dy", 1, dy_in, n, "weight.shape[0] (N)");
  check_vector(op, "scale", scale, dy_in, k, at::kFloat);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const auto f32 = dy_in.options().dtype(at::kFloat);

  if (!need_dx && !need_dscale && !need_dshift) return {at::empty({0}, dy_in.options()), at::empty({0}, f32),
                                                        at::empty({0}, f32)};
  if (n == 0 || m == 0 || k == 0) {  // g is zero (or empty)
    return {need_dx ? at::zeros({m, k}, dy_in.options()) : at::empty({0}, dy_in.options()),
            need_dscale ? at::zeros({k}, f32) : at::empty({0}, f32),
            need_dshift ? at::zeros({k}, f32) : at::empty({0}, f32)};
  }
  const Tensor dy = operand(dy_in), x = operand(x_in), weight = weight_in.contiguous();
  const Tensor scale_f = float_vector(scale);
  const DeviceInfo device = device_info();
  const GemmArch arch = arch_for(device.capability);
  const int64_t rows = vefa_backward_row_tile(arch), ld = vefa_backward_colsum_ld(arch, k);
  const int64_t row_tiles = (m + rows - 1) / rows;

  // dx is written even when not asked for (the kernel always stores d); then into a scratch buffer.
  Tensor dx = at::empty({m, k}, dy.options());
  Tensor dscale_part = need_dscale ? at::empty({row_tiles, ld}, f32) : Tensor();
  Tensor dshift_part = need_dshift ? at::empty({row_tiles, ld}, f32) : Tensor();
  VefaBackwardArgs args = vefa_backward_args(m, n, k, row_stride(dy), row_stride(x));
  args.a = dy.data_ptr();
  args.b = weight.data_ptr();
  args.col_scale = pointer<float>(scale_f);
  args.x = x.data_ptr();
  args.d = dx.data_ptr();
  args.colsum = pointer<float>(dshift_part);
  args.colsum_x = pointer<float>(dscale_part);
  const Plan plan = plan_vefa_backward(arch, kind, args, device.sm_count);
  check_plan(op, plan);
  // sm_80 keeps g (m × k, float32) for its pass; sm_90a only what CUTLASS asks for
  Tensor workspace = arch == GemmArch::Sm80 ? at::empty({m, k}, f32) : workspace_for(plan, dy);
  run_vefa_backward(arch, kind, args, device.sm_count, workspace.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A fixed-order sum over the row tiles: the same bits on every run.
  Tensor dscale = need_dscale ? dscale_part.sum(0).narrow(0, 0, k) : at::empty({0}, f32);
  Tensor dshift = need_dshift ? dshift_part.sum(0).narrow(0, 0, k) : at::empty({0}, f32);
  return {need_dx ? dx : at::empty({0}, dy.options()), dscale, dshift};
}

// out (rows × cols) += a·op(b) in place: the CUTLASS GEMM with β = 1 on the source
// the caller wrote into out (c = d: each element is read before it is written, by the same thread).
void accumulate_into(const char* op, ScalarKind kind, LinearArgs args, const Tensor& out) {
  args.c = out.data_ptr();
  args.ldc = out.stride(0);
  args.d = out.data_ptr();
  run_linear_here(op, kind, args, out);
}

// y = x weightᵀ + u cᵀ + bias (c already carries γ). The rank-r term and the
// bias are written first by cuBLAS (torch's addmm: a K = r GEMM, memory-bound),
// then the frozen GEMM adds x W0ᵀ onto them (β = 1, in place). That costs one
// more write and read of y than an epilogue that loaded u and c itself; the
// alternative, one GEMM on the merged weight W0 + γ C A, costs a pass over
// N·K per call and needs A, which this op does not see. The GPU measurement
// says whether either is worth its complexity.
Tensor low_rank_gemm(const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias, const Tensor& u,
                     const Tensor& c) {
  const char* op = "featadapt::cuda_low_rank_gemm";
  const ScalarKind kind = check_first(op, "x", x_in);
  check_matrix(op, "weight", weight_in, x_in, x_in.scalar_type());
  check_matrix(op, "u", u, x_in, x_in.scalar_type());
  check_matrix(op, "c", c, x_in, x_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight_in.size(0), r = u.size(1);
  check_size(op, "weight", 1, weight_in, k, "x.shape[1] (K)");
  check_size(op, "u", 0, u, m, "x.shape[0] (M)");
  check_size(op, "c", 0, c, n, "weight.shape[0] (N)");
  check_size(op, "c", 1, c, r, "u.shape[1] (r)");
  if (bias) check_vector(op, "bias", *bias, x_in, n, x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());

  Tensor y = at::empty({m, n}, x_in.options());
  if (bias) {
    at::addmm_out(y, bias->unsqueeze(0), u, c.t());
  } else {
    at::mm_out(y, u, c.t());
  }
  if (m == 0 || n == 0 || k == 0) return y;
  const Tensor x = operand(x_in), weight = weight_in.contiguous();
  LinearArgs args = forward_args(m, n, k, row_stride(x));
  args.a = x.data_ptr();
  args.b = weight.data_ptr();
  accumulate_into(op, kind, args, y);
  return y;
}

// dx = dy weight + (du a) ⊙ keep · keep_scale (without keep: dy weight + du a):
// the rank-r term by cuBLAS into dx, masked in place, then the frozen GEMM onto it.
Tensor low_rank_gemm_dx(const Tensor& dy_in, const Tensor& weight_in, const Tensor& du, const Tensor& a,
                        const std::optional<Tensor>& keep, double keep_scale) {
  const char* op = "featadapt::cuda_low_rank_gemm_dx";
  const ScalarKind kind = check_first(op, "dy", dy_in);
  check_matrix(op, "weight", weight_in, dy_in, dy_in.scalar_type());
  check_matrix(op, "du", du, dy_in, dy_in.scalar_type());
  check_matrix(op, "a", a, dy_in, dy_in.scalar_type());
  const int64_t m = dy_in.size(0), n = weight_in.size(0), k = weight_in.size(1), r = a.size(0);
  check_size(op, "dy", 1, dy_in, n, "weight.shape[0] (N)");
  check_size(op, "du", 0, du, m, "dy.shape[0] (M)");
  check_size(op, "du", 1, du, r, "a.shape[0] (r)");
  check_size(op, "a", 1, a, k, "weight.shape[1] (K)");
  if (keep) {
    check_matrix(op, "keep", *keep, dy_in, at::kBool);
    check_size(op, "keep", 0, *keep, m, "dy.shape[0] (M)");
    check_size(op, "keep", 1, *keep, k, "weight.shape[1] (K)");
  }
  const c10::cuda::CUDAGuard guard(dy_in.device());

  Tensor dx = at::mm(du, a);
  if (keep) dx.mul_(*keep).mul_(keep_scale);
  if (m == 0 || k == 0 || n == 0) return dx;
  const Tensor dy = operand(dy_in), weight = weight_in.contiguous();
  LinearArgs args;
  args.shape = input_gradient_shape(m, n, k, row_stride(dy));
  args.a = dy.data_ptr();
  args.b = weight.data_ptr();
  accumulate_into(op, kind, args, dx);
  return dx;
}

// (du, dc) = (dy c, scaling · dyᵀ u), both float32, each empty unless asked
// for: two small GEMMs (N = r) by cuBLAS with float32 outputs.
std::tuple<Tensor, Tensor> low_rank_dy_grads(const Tensor& dy, const Tensor& u, const Tensor& c, double scaling,
                                             bool need_du, bool need_dc) {
  const char* op = "featadapt::cuda_low_rank_dy_grads";
  check_first(op, "dy", dy);
  check_matrix(op, "u", u, dy, dy.scalar_type());
  const int64_t m = dy.size(0), n = dy.size(1), r = u.size(1);
  check_size(op, "u", 0, u, m, "dy.shape[0] (M)");
  if (need_du) {
    check_matrix(op, "c", c, dy, dy.scalar_type());
    check_size(op, "c", 0, c, n, "dy.shape[1] (N)");
    check_size(op, "c", 1, c, r, "u.shape[1] (r)");
  }
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor du = need_du ? at::mm(dy, c, at::kFloat) : at::empty({0}, f32);
  Tensor dc = need_dc ? at::mm(dy.t(), u, at::kFloat).mul_(scaling) : at::empty({0}, f32);
  return {du, dc};
}

// What CUTLASS says of one op's GEMM on an architecture, before anything runs:
// "" when it can run it, else why not. Needs no GPU: `make test` checks it
// against cuda_backend.not_supported_reasons over the odd shapes.
//   op          "vefa_forward", "vefa_backward", "low_rank_forward" or "low_rank_dx"
//   capability  80 (CUTLASS's sm_80 kernels) or 90 (its sm_90a kernels)
//   m, n, k     x (m × k), weight (n × k); x_row_stride: x's (for the backward ops, dy's)
std::string plan(const std::string& op, int64_t capability, at::ScalarType dtype, int64_t m, int64_t n, int64_t k,
                 int64_t x_row_stride) {
  const GemmArch arch = arch_named(capability);
  const ScalarKind kind = scalar_kind("featadapt::cuda_plan", at::empty({0}, at::TensorOptions().dtype(dtype)));
  constexpr int kSmCount = 132;  // (an H100's; only the persistent grid depends on it)
  if (op == "vefa_forward" || op == "low_rank_forward") {
    LinearArgs args = forward_args(m, n, k, x_row_stride);
    if (op == "low_rank_forward") args.ldc = n;
    return plan_linear(arch, kind, args, kSmCount).reason;
  }
  if (op == "low_rank_dx") {
    LinearArgs args;
    args.shape = input_gradient_shape(m, n, k, x_row_stride);
    args.ldc = k;
    return plan_linear(arch, kind, args, kSmCount).reason;
  }
  TORCH_CHECK(op == "vefa_backward", "featadapt::cuda_plan: op must be vefa_forward, vefa_backward, "
              "low_rank_forward or low_rank_dx, got '", op, "'");
  return plan_vefa_backward(arch, kind, vefa_backward_args(m, n, k, x_row_stride, k), kSmCount).reason;
}

}  // namespace
}  // namespace featadapt

TORCH_LIBRARY(featadapt, m) {
  m.def("cuda_scaled_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor? shift) -> Tensor");
  m.def(
      "cuda_scaled_gemm_backward(Tensor dy, Tensor x, Tensor weight, Tensor scale, bool need_dx, "
      "bool need_dscale, bool need_dshift) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_low_rank_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor u, Tensor c) -> Tensor");
  m.def(
      "cuda_low_rank_gemm_dx(Tensor dy, Tensor weight, Tensor du, Tensor a, Tensor? keep, float keep_scale) "
      "-> Tensor");
  m.def(
      "cuda_low_rank_dy_grads(Tensor dy, Tensor u, Tensor c, float scaling, bool need_du, bool need_dc) "
      "-> (Tensor, Tensor)");
  // No tensors, no device: a catch-all kernel that runs anywhere.
  m.def("cuda_plan(str op, int capability, ScalarType dtype, int m, int n, int k, int x_row_stride) -> str",
        &featadapt::plan);
}

TORCH_LIBRARY_IMPL(featadapt, CUDA, m) {
  m.impl("cuda_scaled_gemm", &featadapt::scaled_gemm);
  m.impl("cuda_scaled_gemm_backward", &featadapt::scaled_gemm_backward);
  m.impl("cuda_low_rank_gemm", &featadapt::low_rank_gemm);
  m.impl("cuda_low_rank_gemm_dx", &featadapt::low_rank_gemm_dx);
  m.impl("cuda_low_rank_dy_grads", &featadapt::low_rank_dy_grads);
}
