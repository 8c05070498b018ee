// The featadapt::cuda_* ops: defined once here, implemented for CUDA tensors
// on top of the CUTLASS GEMMs and passes of gemm.h, on PyTorch's stable ABI
// (stable_util.h), so one build loads under every torch since 2.10. Their
// signatures are the triton kernels' (featadapt/kernels/triton), so one set of
// autograd Functions drives either; featadapt/kernels/cuda.py registers their
// fake implementations for torch.compile.
//
// Each op checks its inputs with messages that name the argument, what was
// expected and what was given, allocates its outputs and launches.
#ifndef USE_CUDA
#define USE_CUDA  // (the stable C shim declares its CUDA calls under it)
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "build_info.h"
#include "gemm.h"
#include "stable_util.h"

namespace featadapt {
namespace {

using torch::stable::new_empty;
using torch::stable::new_zeros;

// -- checks ----------------------------------------------------------------------

std::string device_of(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : (t.is_cpu() ? "cpu" : "another device");
}

ScalarKind scalar_kind(const char* op, ScalarType type) {
  switch (type) {
    case ScalarType::Half: return ScalarKind::Float16;
    case ScalarType::BFloat16: return ScalarKind::BFloat16;
    default:
      STD_TORCH_CHECK(false, op, ": expected float16 or bfloat16 tensors, got ", dtype_name(type),
                      " (float32 and float64 run on backend='torch': the CUTLASS kernels multiply 16-bit inputs, "
                      "and TF32 would change float32's numerics)");
  }
  return ScalarKind::BFloat16;  // (not reached)
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  STD_TORCH_CHECK(device_of(t) == device_of(like), op, ": ", name, " must be on ", device_of(like), ", got ",
                  device_of(t));
}

void check_dtype(const char* op, const char* name, const Tensor& t, ScalarType dtype) {
  STD_TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype_name(dtype), ", got ",
                  dtype_name(t.scalar_type()));
}

void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& like, ScalarType dtype) {
  check_device(op, name, t, like);
  STD_TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape_of(t));
  check_dtype(op, name, t, dtype);
}

void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& like, int64_t size,
                  ScalarType dtype) {
  check_device(op, name, t, like);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, ",), got ",
                  shape_of(t));
  check_dtype(op, name, t, dtype);
}

void check_size(const char* op, const char* name, int dim, const Tensor& t, int64_t expected, const char* meaning) {
  STD_TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must be ", meaning, " = ", expected,
                  ", got shape ", shape_of(t));
}

// The first input must be a CUDA tensor of a supported dtype; the rest follow it.
ScalarKind check_first(const char* op, const char* name, const Tensor& t) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", device_of(t));
  STD_TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape_of(t));
  return scalar_kind(op, t.scalar_type());
}

void check_cuda(cudaError_t error, const char* what) {
  STD_TORCH_CHECK(error == cudaSuccess, what, ": ", cudaGetErrorString(error));
}

// -- operands ----------------------------------------------------------------------

// A row-major matrix the kernels can read: unit column stride, a row stride
// of whole 16-byte units, a 16-byte-aligned start. Activations that arrive in
// another layout (a gradient autograd expanded, say) are copied; the forward
// inputs are checked by the backend first (cuda_backend.not_supported_reasons),
// so dispatch sends such a call to torch instead of paying for a copy here.
// (A single row's stride is never stepped over: its width stands in for it.)
int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

bool aligned(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool readable(const Tensor& t) {
  const int64_t row = row_stride(t);
  return t.stride(1) == 1 && row % 8 == 0 && row >= t.size(1) && aligned(t);
}

Tensor operand(const Tensor& t) {
  if (t.numel() == 0 || readable(t)) return t;
  Tensor c = torch::stable::contiguous(t);
  return readable(c) ? c : torch::stable::clone(c);  // (a contiguous view at an odd offset)
}

// A (size,) vector, contiguous and 16-byte aligned (the epilogue reads it in vectors).
Tensor aligned_vector(const Tensor& t) {
  Tensor c = torch::stable::contiguous(t);
  return aligned(c) ? c : torch::stable::clone(c);
}

// The same in float32 (the VeFA scale and shift, whatever the adapter's dtype).
Tensor float_vector(const Tensor& t) { return aligned_vector(torch::stable::to(t, ScalarType::Float)); }

template <typename T = void>
T* pointer(const std::optional<Tensor>& t) {
  return t ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// t ⊙= value, in place. The factor is a 0-dim float32 tensor (the dispatcher
// call takes no Scalar): it does not change t's dtype, and a half-precision t
// is multiplied in float32, by the value itself rather than its rounding.
void scale_(Tensor& t, double value) {
  Tensor factor = new_empty(t, {}, ScalarType::Float);
  torch::stable::fill_(factor, value);
  aten("aten::mul_", "Tensor", t, factor);
}

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// The current device's SM count and compute capability, asked once per device.
struct DeviceInfo {
  int index = 0, sm_count = 0, capability = 0;
};

DeviceInfo device_info() {
  static std::array<std::atomic<int>, 64> sms{}, capabilities{};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const int slot = device < static_cast<int>(sms.size()) ? device : static_cast<int>(sms.size()) - 1;
  DeviceInfo info{device, sms[slot].load(std::memory_order_relaxed),
                  capabilities[slot].load(std::memory_order_relaxed)};
  if (info.sm_count == 0) {
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device), "SM count");
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "capability");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "capability");
    info.capability = 10 * major + minor;
    capabilities[slot].store(info.capability, std::memory_order_relaxed);
    sms[slot].store(info.sm_count, std::memory_order_relaxed);
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
  STD_TORCH_CHECK(capability == 80 || capability == 90, "featadapt::cuda_plan: capability must be 80 (CUTLASS's "
                  "sm_80 kernels) or 90 (its sm_90a kernels), got ", capability);
  return capability == 90 ? GemmArch::Sm90 : GemmArch::Sm80;
}

Tensor workspace_for(size_t bytes, const Tensor& like) {
  return new_empty(like, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
}

void check_plan(const char* op, const Plan& plan) {
  STD_TORCH_CHECK(plan.ok(), op, ": ", plan.reason,
                  " (cuda_backend.not_supported_reasons sends such calls to torch)");
}

// The linear GEMM on this device's architecture: planned, refused with the
// reason if CUTLASS cannot run it, else launched with the workspace it asked for.
void run_linear_here(const char* op, ScalarKind kind, const LinearArgs& args, const Tensor& like) {
  const DeviceInfo device = device_info();
  const GemmArch arch = arch_for(device.capability);
  const Plan plan = plan_linear(arch, kind, args, device.sm_count);
  check_plan(op, plan);
  Tensor workspace = workspace_for(plan.workspace, like);
  run_linear(arch, kind, args, device.sm_count, workspace.data_ptr(), current_stream(device.index));
  check_cuda(cudaGetLastError(), op);
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

VefaBackwardArgs vefa_backward_args(int64_t m, int64_t n, int64_t k, int64_t lddy, int64_t ldx) {
  VefaBackwardArgs a;
  a.shape = input_gradient_shape(m, n, k, lddy);
  a.ldx = ldx;
  return a;
}

// -- ops -------------------------------------------------------------------------

// y = (x ⊙ scale + shift) weightᵀ + bias = x (W0 diag(scale))ᵀ + (W0 shift + bias):
// the scale moves onto the weight (a pass over N·K, not M·K) and the shift
// into the bias, so the GEMM is CUTLASS's with a bias epilogue.
Tensor scaled_gemm(Tensor x_in, Tensor weight_in, std::optional<Tensor> bias, Tensor scale,
                   std::optional<Tensor> shift) {
  const char* op = "featadapt::cuda_scaled_gemm";
  const ScalarKind kind = check_first(op, "x", x_in);
  check_matrix(op, "weight", weight_in, x_in, x_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight_in.size(0);
  check_size(op, "weight", 1, weight_in, k, "x.shape[1] (K)");
  if (bias) check_vector(op, "bias", *bias, x_in, n, x_in.scalar_type());
  check_vector(op, "scale", scale, x_in, k, ScalarType::Float);
  if (shift) check_vector(op, "shift", *shift, x_in, k, ScalarType::Float);
  const torch::stable::accelerator::DeviceGuard guard(x_in.get_device_index());

  if (k == 0 || m == 0) {  // no reduction: y is the bias (F.linear's answer)
    Tensor y = new_zeros(x_in, {m, n});
    return bias ? torch::stable::subtract(y, *bias, -1.0) : y;
  }
  const Tensor x = operand(x_in), weight = torch::stable::contiguous(weight_in);
  const Tensor scale_f = float_vector(scale);
  const std::optional<Tensor> shift_f = shift ? std::optional<Tensor>(float_vector(*shift)) : std::nullopt;
  const std::optional<Tensor> bias_c = bias ? std::optional<Tensor>(aligned_vector(*bias)) : std::nullopt;
  Tensor w_scaled = new_empty(x, {n, k});
  std::optional<Tensor> bias_out = (bias || shift) ? std::optional<Tensor>(new_empty(x, {n})) : std::nullopt;
  const int32_t device = x.get_device_index();
  launch_scale_weight(kind, weight.data_ptr(), n, k, weight.stride(0), scale_f.const_data_ptr<float>(),
                      pointer<float>(shift_f), pointer(bias_c), w_scaled.data_ptr(), pointer(bias_out),
                      current_stream(device));

  Tensor y = new_empty(x, {m, n});
  LinearArgs args = forward_args(m, n, k, row_stride(x));
  args.a = x.data_ptr();
  args.b = w_scaled.data_ptr();
  args.bias = pointer(bias_out);
  args.d = y.data_ptr();
  run_linear_here(op, kind, args, y);
  return y;
}

// (dx, dscale, dshift): g = dy weight, dx = g ⊙ scale, dscale = Σ_m g ⊙ x,
// dshift = Σ_m g; each empty unless asked for; dscale and dshift are float32.
std::tuple<Tensor, Tensor, Tensor> scaled_gemm_backward(Tensor dy_in, Tensor x_in, Tensor weight_in, Tensor scale,
                                                        bool need_dx, bool need_dscale, bool need_dshift) {
  const char* op = "featadapt::cuda_scaled_gemm_backward";
  const ScalarKind kind = check_first(op, "dy", dy_in);
  check_matrix(op, "x", x_in, dy_in, dy_in.scalar_type());
  check_matrix(op, "weight", weight_in, dy_in, dy_in.scalar_type());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight_in.size(0);
  check_size(op, "weight", 1, weight_in, k, "x.shape[1] (K)");
  check_size(op, "dy", 0, dy_in, m, "x.shape[0] (M)");
  check_size(op, "dy", 1, dy_in, n, "weight.shape[0] (N)");
  check_vector(op, "scale", scale, dy_in, k, ScalarType::Float);
  const torch::stable::accelerator::DeviceGuard guard(dy_in.get_device_index());
  auto none = [&](ScalarType type) { return new_empty(dy_in, {0}, type); };
  const ScalarType f32 = ScalarType::Float, dtype = dy_in.scalar_type();

  if (!need_dx && !need_dscale && !need_dshift) return {none(dtype), none(f32), none(f32)};
  if (n == 0 || m == 0 || k == 0) {  // g is zero (or empty)
    return {need_dx ? new_zeros(dy_in, {m, k}) : none(dtype), need_dscale ? new_zeros(dy_in, {k}, f32) : none(f32),
            need_dshift ? new_zeros(dy_in, {k}, f32) : none(f32)};
  }
  const Tensor dy = operand(dy_in), x = operand(x_in), weight = torch::stable::contiguous(weight_in);
  const Tensor scale_f = float_vector(scale);
  const DeviceInfo device = device_info();
  const GemmArch arch = arch_for(device.capability);
  const int64_t rows = vefa_backward_row_tile(arch), ld = vefa_backward_colsum_ld(arch, k);
  const int64_t row_tiles = (m + rows - 1) / rows;

  // dx is written even when not asked for (the kernel always stores d); then into a scratch buffer.
  Tensor dx = new_empty(dy, {m, k});
  std::optional<Tensor> dscale_part, dshift_part;
  if (need_dscale) dscale_part = new_empty(dy, {row_tiles, ld}, f32);
  if (need_dshift) dshift_part = new_empty(dy, {row_tiles, ld}, f32);
  VefaBackwardArgs args = vefa_backward_args(m, n, k, row_stride(dy), row_stride(x));
  args.a = dy.data_ptr();
  args.b = weight.data_ptr();
  args.col_scale = scale_f.const_data_ptr<float>();
  args.x = x.data_ptr();
  args.d = dx.data_ptr();
  args.colsum = pointer<float>(dshift_part);
  args.colsum_x = pointer<float>(dscale_part);
  const Plan plan = plan_vefa_backward(arch, kind, args, device.sm_count);
  check_plan(op, plan);
  // sm_80 keeps g (m × k, float32) for its pass; sm_90a only what CUTLASS asks for
  Tensor workspace = arch == GemmArch::Sm80 ? new_empty(dy, {m, k}, f32) : workspace_for(plan.workspace, dy);
  run_vefa_backward(arch, kind, args, device.sm_count, workspace.data_ptr(), current_stream(device.index));
  check_cuda(cudaGetLastError(), op);
  // A fixed-order sum over the row tiles: the same bits on every run.
  auto column_sums = [&](const std::optional<Tensor>& part) {
    if (!part) return none(f32);
    Tensor sums = torch::stable::sum(*part, std::vector<int64_t>{0});
    return torch::stable::narrow(sums, 0, 0, k);
  };
  return {need_dx ? dx : none(dtype), column_sums(dscale_part), column_sums(dshift_part)};
}

// out (rows × cols) += a·op(b) in place: the CUTLASS GEMM with β = 1 on the source
// the caller wrote into out (c = d: each element is read before it is written, by the same thread).
void accumulate_into(const char* op, ScalarKind kind, LinearArgs args, const Tensor& out) {
  args.c = out.data_ptr();
  args.ldc = out.stride(0);
  args.d = out.data_ptr();
  run_linear_here(op, kind, args, out);
}

// y = x weightᵀ + u cᵀ + bias (c already carries γ). The rank-r term is written
// first by cuBLAS (torch's matmul: a K = r GEMM, memory-bound), then the frozen
// GEMM adds x W0ᵀ and the bias onto it (β = 1, in place). That costs one more
// write and read of y than an epilogue that loaded u and c itself; the
// alternative, one GEMM on the merged weight W0 + γ C A, costs a pass over
// N·K per call and needs A, which this op does not see. The GPU measurement
// says whether either is worth its complexity.
Tensor low_rank_gemm(Tensor x_in, Tensor weight_in, std::optional<Tensor> bias, Tensor u, Tensor c) {
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
  const torch::stable::accelerator::DeviceGuard guard(x_in.get_device_index());

  Tensor y = torch::stable::contiguous(torch::stable::matmul(u, transposed(c)));
  if (m == 0 || n == 0 || k == 0) return bias ? torch::stable::subtract(y, *bias, -1.0) : y;
  const Tensor x = operand(x_in), weight = torch::stable::contiguous(weight_in);
  const std::optional<Tensor> bias_c = bias ? std::optional<Tensor>(aligned_vector(*bias)) : std::nullopt;
  LinearArgs args = forward_args(m, n, k, row_stride(x));
  args.a = x.data_ptr();
  args.b = weight.data_ptr();
  args.bias = pointer(bias_c);
  accumulate_into(op, kind, args, y);
  return y;
}

// dx = dy weight + (du a) ⊙ keep · keep_scale (without keep: dy weight + du a):
// the rank-r term by cuBLAS into dx, masked in place, then the frozen GEMM onto it.
Tensor low_rank_gemm_dx(Tensor dy_in, Tensor weight_in, Tensor du, Tensor a, std::optional<Tensor> keep,
                        double keep_scale) {
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
    check_matrix(op, "keep", *keep, dy_in, ScalarType::Bool);
    check_size(op, "keep", 0, *keep, m, "dy.shape[0] (M)");
    check_size(op, "keep", 1, *keep, k, "weight.shape[1] (K)");
  }
  const torch::stable::accelerator::DeviceGuard guard(dy_in.get_device_index());

  Tensor dx = torch::stable::contiguous(torch::stable::matmul(du, a));
  if (keep) {
    aten("aten::mul_", "Tensor", dx, *keep);
    scale_(dx, keep_scale);
  }
  if (m == 0 || k == 0 || n == 0) return dx;
  const Tensor dy = operand(dy_in), weight = torch::stable::contiguous(weight_in);
  LinearArgs args;
  args.shape = input_gradient_shape(m, n, k, row_stride(dy));
  args.a = dy.data_ptr();
  args.b = weight.data_ptr();
  accumulate_into(op, kind, args, dx);
  return dx;
}

// (du, dc) = (dy c, scaling · dyᵀ u), both float32, each empty unless asked
// for: two small GEMMs (N = r) by cuBLAS with float32 outputs.
std::tuple<Tensor, Tensor> low_rank_dy_grads(Tensor dy, Tensor u, Tensor c, double scaling, bool need_du,
                                             bool need_dc) {
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
  const torch::stable::accelerator::DeviceGuard guard(dy.get_device_index());
  Tensor du = need_du ? mm_float(dy, c) : new_empty(dy, {0}, ScalarType::Float);
  Tensor dc = new_empty(dy, {0}, ScalarType::Float);
  if (need_dc) {
    dc = mm_float(transposed(dy), u);
    scale_(dc, scaling);
  }
  return {du, dc};
}

// What CUTLASS says of one op's GEMM on an architecture, before anything runs:
// "" when it can run it, else why not. Needs no GPU: `make test` checks it
// against cuda_backend.not_supported_reasons over the odd shapes.
//   op          "vefa_forward", "vefa_backward", "low_rank_forward" or "low_rank_dx"
//   capability  80 (CUTLASS's sm_80 kernels) or 90 (its sm_90a kernels)
//   m, n, k     x (m × k), weight (n × k); x_row_stride: x's (for the backward ops, dy's)
std::string plan(std::string op, int64_t capability, ScalarType dtype, int64_t m, int64_t n, int64_t k,
                 int64_t x_row_stride) {
  const GemmArch arch = arch_named(capability);
  const ScalarKind kind = scalar_kind("featadapt::cuda_plan", dtype);
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
  STD_TORCH_CHECK(op == "vefa_backward", "featadapt::cuda_plan: op must be vefa_forward, vefa_backward, "
                  "low_rank_forward or low_rank_dx, got '", op, "'");
  return plan_vefa_backward(arch, kind, vefa_backward_args(m, n, k, x_row_stride, k), kSmCount).reason;
}

}  // namespace
}  // namespace featadapt

STABLE_TORCH_LIBRARY(featadapt, m) {
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
  m.def("cuda_plan(str op, int capability, ScalarType dtype, int m, int n, int k, int x_row_stride) -> str");
}

STABLE_TORCH_LIBRARY_IMPL(featadapt, CUDA, m) {
  m.impl("cuda_scaled_gemm", TORCH_BOX(&featadapt::scaled_gemm));
  m.impl("cuda_scaled_gemm_backward", TORCH_BOX(&featadapt::scaled_gemm_backward));
  m.impl("cuda_low_rank_gemm", TORCH_BOX(&featadapt::low_rank_gemm));
  m.impl("cuda_low_rank_gemm_dx", TORCH_BOX(&featadapt::low_rank_gemm_dx));
  m.impl("cuda_low_rank_dy_grads", TORCH_BOX(&featadapt::low_rank_dy_grads));
}

// No tensors, no device: the dispatcher runs a CompositeExplicitAutograd kernel for it anywhere.
STABLE_TORCH_LIBRARY_IMPL(featadapt, CompositeExplicitAutograd, m) {
  m.impl("cuda_plan", TORCH_BOX(&featadapt::plan));
}
