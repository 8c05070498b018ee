// The interface between the op layer (ops.cpp, which knows torch) and the
// GEMM kernels (gemm_sm90_*.cu and gemm_sm80.cu, which do not: they include
// CUTLASS and no torch header). Everything here is plain data: pointers,
// sizes and leading dimensions in elements, 64-bit throughout.
//
// The main loops are CUTLASS's. What featadapt adds is the epilogue:
//   linear          d = a·op(b) + c            (c: an (m, n) source, or a bias row)
//   vefa_backward   g = a·b,  d = g ⊙ col_scale,
//                   and per row tile Σ g and Σ g ⊙ c over its rows (c = x)
// Each kernel comes in two builds: sm_90a (TMA, warp-specialised persistent
// main loops, epilogue visitor trees) and sm_80 (cp.async multistage main
// loops; on sm_80 the VeFA backward's reductions run in a pass after the GEMM).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace featadapt {

enum class ScalarKind { Float16, BFloat16 };

// Which code path runs: CUTLASS's Hopper kernels (sm_90a) or its Ampere ones
// (sm_80, which also serve sm_86/sm_89 and later GPUs through PTX).
enum class GemmArch { Sm80, Sm90 };

// d (m × n) = a (m × k) · op(b), row-major operands with leading dimensions:
//   b_is_n_by_k   op(b) = bᵀ with b (n × k): the forward, y = x W0ᵀ
//   otherwise     op(b) = b with b (k × n): the input gradient, dx = dy W0
struct GemmShape {
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;
  bool b_is_n_by_k = true;
};

// linear: d = a·op(b) + c + bias, where c is an (m, n) source with leading
// dimension ldc and bias an (n,) row added to every row; either may be null.
// A source and a bias together need c == d (the sm_80 path adds the bias into
// the source first). c, bias and d have a's dtype.
struct LinearArgs {
  GemmShape shape;
  const void* a = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;
  int64_t ldc = 0;
  const void* bias = nullptr;
  void* d = nullptr;
};

// vefa_backward: g = a·b (b is k × n: b_is_n_by_k is false), d = g ⊙ col_scale
// in a's dtype, and per tile of row_tile() rows, the column sums Σ g and
// Σ g ⊙ x into colsum (row tiles × colsum_ld) and colsum_x (same shape),
// float32; either may be null. x (m × n, leading dimension ldx) has a's dtype.
struct VefaBackwardArgs {
  GemmShape shape;
  const void* a = nullptr;
  const void* b = nullptr;
  const float* col_scale = nullptr;
  const void* x = nullptr;
  int64_t ldx = 0;
  void* d = nullptr;
  float* colsum = nullptr;
  float* colsum_x = nullptr;
};

// Rows per tile of the column-sum buffers and their padded width (colsum_ld):
// the caller allocates (ceil(m / rows), colsum_ld(n)) float32 and sums over
// the first dimension in a fixed order.
int vefa_backward_row_tile(GemmArch arch);
int64_t vefa_backward_colsum_ld(GemmArch arch, int64_t n);

// A plan is what CUTLASS says of a problem before anything runs (no GPU
// needed): `reason` is empty when the kernel can run it, else why not, and
// `workspace` the device bytes it needs (the caller allocates them).
struct Plan {
  std::string reason;
  size_t workspace = 0;
  bool ok() const { return reason.empty(); }
};

// sm_count: the GPU's SM count (the persistent kernels size their grid by it).
Plan plan_linear(GemmArch arch, ScalarKind kind, const LinearArgs& args, int sm_count);
void run_linear(GemmArch arch, ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace,
                cudaStream_t stream);

Plan plan_vefa_backward(GemmArch arch, ScalarKind kind, const VefaBackwardArgs& args, int sm_count);
void run_vefa_backward(GemmArch arch, ScalarKind kind, const VefaBackwardArgs& args, int sm_count,
                       void* workspace, cudaStream_t stream);

// The memory-bound passes (gemm_passes.cu):
// w_scaled (n × k) = w ⊙ scale (per column k), and bias_out (n,) = w·shift + bias
// (shift and bias may be null), from one read of w: the VeFA forward's weight.
void launch_scale_weight(ScalarKind kind, const void* w, int64_t n, int64_t k, int64_t ldw, const float* scale,
                         const float* shift, const void* bias, void* w_scaled, void* bias_out, cudaStream_t stream);

// out (m × n, leading dimension ld) += bias (n,) on every row, in place.
void launch_add_bias_rows(ScalarKind kind, void* out, int64_t m, int64_t n, int64_t ld, const void* bias,
                          cudaStream_t stream);

// The sm_80 VeFA backward after its GEMM: from g (m × n float32), dx = g ⊙ scale
// (may be null) and per tile of `row_tile` rows Σ g and Σ g ⊙ x (either may be null).
void launch_vefa_backward_pass(ScalarKind kind, const float* g, int64_t m, int64_t n, const float* scale,
                               const void* x, int64_t ldx, void* dx, int64_t lddx, int row_tile, float* colsum,
                               float* colsum_x, int64_t colsum_ld, cudaStream_t stream);

}  // namespace featadapt
