// What the GEMM translation units share: the checks a problem must pass
// before CUTLASS sees it, with reasons a user can act on, and the per-kernel
// entry points that gemm_plan.cpp dispatches to (one translation unit each).
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "gemm.h"

namespace featadapt {

// Empty when the sizes and leading dimensions suit kernels that read
// `alignment` elements (16 bytes) at a time, else why not. M is free; K, N
// and every leading dimension must be multiples (TMA on sm_90a and cp.async
// on sm_80 move 16-byte rows).
inline std::string shape_reason(const GemmShape& s, int alignment, const char* arch) {
  const int64_t limit = int64_t{1} << 31;
  if (s.m < 0 || s.n < 0 || s.k < 0) return "negative sizes";
  if (s.m >= limit || s.n >= limit || s.k >= limit)
    return "a dimension of 2^31 or more (M = " + std::to_string(s.m) + ", N = " + std::to_string(s.n) +
           ", K = " + std::to_string(s.k) + ") does not fit CUTLASS's int problem shape";
  const std::string need = " is not a multiple of " + std::to_string(alignment) + ": the " + arch +
                           " kernels move 16-byte rows (" + std::to_string(alignment) + " elements)";
  if (s.k % alignment != 0) return "the reduction size " + std::to_string(s.k) + need;
  if (s.n % alignment != 0) return "the output width " + std::to_string(s.n) + need;
  if (s.lda % alignment != 0 || s.ldb % alignment != 0 || s.ldd % alignment != 0)
    return "a leading dimension (" + std::to_string(s.lda) + ", " + std::to_string(s.ldb) + ", " +
           std::to_string(s.ldd) + ")" + need;
  return "";
}

inline std::string pointer_reason(const char* name, const void* p) {
  if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0)
    return std::string(name) + " is not 16-byte aligned (a view at an odd offset?)";
  return "";
}

namespace sm90 {
Plan plan_forward(ScalarKind kind, const LinearArgs& args, int sm_count);
void run_forward(ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace, cudaStream_t stream);
Plan plan_dx(ScalarKind kind, const LinearArgs& args, int sm_count);
void run_dx(ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace, cudaStream_t stream);
Plan plan_vefa_backward(ScalarKind kind, const VefaBackwardArgs& args, int sm_count);
void run_vefa_backward(ScalarKind kind, const VefaBackwardArgs& args, int sm_count, void* workspace,
                       cudaStream_t stream);
}  // namespace sm90

namespace sm80 {
Plan plan_linear(ScalarKind kind, const LinearArgs& args);
void run_linear(ScalarKind kind, const LinearArgs& args, cudaStream_t stream);
// g (m × n, float32) = a·b for the VeFA backward, before its pass
Plan plan_gradient(ScalarKind kind, const GemmShape& shape);
void run_gradient(ScalarKind kind, const GemmShape& shape, const void* a, const void* b, float* g,
                  cudaStream_t stream);
}  // namespace sm80

}  // namespace featadapt
