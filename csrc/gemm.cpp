// gemm.h's plan and run calls: the checks every kernel needs first (sizes,
// 16-byte alignment), then the architecture's kernel (gemm_sm90_*.cu,
// gemm_sm80.cu) and its own CUTLASS can_implement.
#include <stdexcept>
#include <string>

#include "gemm_common.h"

namespace featadapt {
namespace {

const char* arch_name(GemmArch arch) { return arch == GemmArch::Sm90 ? "sm_90a" : "sm_80"; }

std::string first_reason(std::initializer_list<std::string> reasons) {
  for (const std::string& r : reasons)
    if (!r.empty()) return r;
  return "";
}

// The source and bias of a linear GEMM suit 16-byte vector loads like the rest.
std::string source_reason(const LinearArgs& a) {
  if (a.ldc < 0 || a.ldc % 8 != 0)
    return "the source's leading dimension " + std::to_string(a.ldc) + " is not a multiple of 8";
  if (a.c != nullptr && a.bias != nullptr && a.c != a.d)
    return "a source and a bias together need the source to be the output (c == d)";
  return first_reason({pointer_reason("the source", a.c), pointer_reason("the bias", a.bias)});
}

void throw_if(const Plan& p, const char* what) {
  if (!p.ok()) throw std::invalid_argument(std::string(what) + ": " + p.reason);
}

}  // namespace

int vefa_backward_row_tile(GemmArch) { return 128; }

int64_t vefa_backward_colsum_ld(GemmArch arch, int64_t n) {
  return arch == GemmArch::Sm90 ? (n + 255) / 256 * 256 : n;  // sm_90a: a whole CTA tile per partial row
}

Plan plan_linear(GemmArch arch, ScalarKind kind, const LinearArgs& args, int sm_count) {
  Plan p;
  p.reason = first_reason({shape_reason(args.shape, 8, arch_name(arch)), source_reason(args),
                           pointer_reason("a", args.a), pointer_reason("b", args.b), pointer_reason("d", args.d)});
  if (!p.ok() || args.shape.m == 0 || args.shape.n == 0) return p;
  if (arch == GemmArch::Sm80) return sm80::plan_linear(kind, args);
  return args.shape.b_is_n_by_k ? sm90::plan_forward(kind, args, sm_count) : sm90::plan_dx(kind, args, sm_count);
}

void run_linear(GemmArch arch, ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace,
                cudaStream_t stream) {
  throw_if(plan_linear(arch, kind, args, sm_count), "featadapt linear GEMM");
  if (args.shape.m == 0 || args.shape.n == 0) return;
  if (arch == GemmArch::Sm80) {
    sm80::run_linear(kind, args, stream);
  } else if (args.shape.b_is_n_by_k) {
    sm90::run_forward(kind, args, sm_count, workspace, stream);
  } else {
    sm90::run_dx(kind, args, sm_count, workspace, stream);
  }
}

Plan plan_vefa_backward(GemmArch arch, ScalarKind kind, const VefaBackwardArgs& args, int sm_count) {
  Plan p;
  const int64_t row_tiles = (args.shape.m + vefa_backward_row_tile(arch) - 1) / vefa_backward_row_tile(arch);
  p.reason = first_reason(
      {args.shape.b_is_n_by_k ? "the VeFA backward takes b as (k, n)" : "",
       shape_reason(args.shape, 8, arch_name(arch)),
       args.ldx % 8 != 0 ? "x's leading dimension " + std::to_string(args.ldx) + " is not a multiple of 8" : "",
       row_tiles > 65535 ? "more than 65535 row tiles of " + std::to_string(vefa_backward_row_tile(arch)) + " rows"
                         : "",
       pointer_reason("a", args.a), pointer_reason("b", args.b), pointer_reason("x", args.x),
       pointer_reason("d", args.d), pointer_reason("the column scale", args.col_scale)});
  if (!p.ok() || args.shape.m == 0 || args.shape.n == 0) return p;
  if (arch == GemmArch::Sm80) return sm80::plan_gradient(kind, args.shape);
  return sm90::plan_vefa_backward(kind, args, sm_count);
}

void run_vefa_backward(GemmArch arch, ScalarKind kind, const VefaBackwardArgs& args, int sm_count, void* workspace,
                       cudaStream_t stream) {
  throw_if(plan_vefa_backward(arch, kind, args, sm_count), "featadapt VeFA backward GEMM");
  if (args.shape.m == 0 || args.shape.n == 0) return;
  if (arch == GemmArch::Sm90) {
    sm90::run_vefa_backward(kind, args, sm_count, workspace, stream);
    return;
  }
  // sm_80: g in float32 (the caller's workspace), then the pass
  GemmShape g_shape = args.shape;
  g_shape.ldd = args.shape.n;
  float* g = static_cast<float*>(workspace);
  sm80::run_gradient(kind, g_shape, args.a, args.b, g, stream);
  launch_vefa_backward_pass(kind, g, args.shape.m, args.shape.n, args.col_scale, args.x, args.ldx, args.d,
                            args.shape.ldd, vefa_backward_row_tile(arch), args.colsum, args.colsum_x,
                            vefa_backward_colsum_ld(arch, args.shape.n), stream);
}

}  // namespace featadapt
