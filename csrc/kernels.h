// The interface between the op layer (ops.cpp, which knows torch) and the
// kernels (*.cu, which do not: they include no torch header, so they compile
// fast). Everything here is plain data: pointers, sizes and strides in
// elements, 64-bit throughout.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace featadapt {

enum class ScalarKind { Float32, Float16, BFloat16 };

// One operand of a product C = A Bᵀ, seen as a matrix of output rows by
// reduction steps: element (row, k) is data[row * stride_row + k * stride_red].
// Any strides work (transposed views, zero strides); unit stride along either
// dimension, with 16-byte alignment, gets vectorised loads.
struct Operand {
  const void* data = nullptr;
  int64_t stride_row = 0;
  int64_t stride_red = 0;
};

// out = ((a' bᵀ) + keep ⊙ keep_scale ⊙ (a2 b2ᵀ) + bias) ⊙ col_scale, where
// a'(m, k) = a(m, k) · a_scale[k] + a_shift[k] when a_scale is given. Each
// optional part is off when its pointer is null. One kernel serves all four
// large GEMMs of the two kernel families:
//   VeFA forward     y  = (x ⊙ s + t) W0ᵀ + b       a = x, b = W0, a_scale/a_shift
//   VeFA backward    dx = (dy W0) ⊙ s               a = dy, b = W0ᵀ, col_scale = s,
//                    and per row tile Σ_m g ⊙ x, Σ_m g (ds, dt partials)
//   low-rank forward y  = x W0ᵀ + u Cγᵀ + b         second product a2 = u, b2 = Cγ
//   low-rank dx      dx = dy W0 + keep ⊙ (du A)     a2 = du, b2 = Aᵀ, keep
struct FusedGemmArgs {
  int64_t rows = 0;  // M: output rows
  int64_t cols = 0;  // N: output columns
  int block_rows = 128;  // BM of the tile configuration (fused_gemm_block_rows)

  Operand a, b;  // rows × depth and cols × depth
  int64_t depth = 0;
  const float* a_scale = nullptr;  // (depth,)
  const float* a_shift = nullptr;  // (depth,), only with a_scale

  Operand a2, b2;  // rows × rank and cols × rank
  int64_t rank = 0;  // 0: no second product
  const bool* keep = nullptr;  // (rows, cols) boolean keep mask of dropout
  int64_t keep_stride_row = 0, keep_stride_col = 0;
  float keep_scale = 1.0f;

  const void* bias = nullptr;  // (cols,), the output's dtype
  const float* col_scale = nullptr;  // (cols,)
  void* out = nullptr;  // (rows, cols), may be null when only column sums are wanted
  int64_t out_stride_row = 0, out_stride_col = 0;

  // Column sums of the product over each tile's rows, written per row tile to
  // (row tiles, cols) float32 buffers: Σ g and Σ g ⊙ sum_x, with g = a' bᵀ.
  float* colsum_part = nullptr;
  float* colsum_x_part = nullptr;
  Operand sum_x;  // (rows, cols) in the output's dtype, stride_red is the column stride
};

// BM of the configuration the kernel uses for this problem (it sizes the
// column-sum buffers, so the caller asks first and passes it back in args).
int fused_gemm_block_rows(int64_t rows, int64_t cols, int num_sms);
void launch_fused_gemm(ScalarKind kind, const FusedGemmArgs& args, cudaStream_t stream);

// du = dy Cγ and dC = scaling · dyᵀ u in one pass over dy. A program owns one
// column tile of dy and a chunk of rows; it writes its share of du to one
// (M, r) float32 slice per column tile and its dC to one (N, r) slice per row
// chunk. The caller sums the slices in a fixed order: the same bits every run.
struct DyGradsArgs {
  int64_t rows = 0, cols = 0, rank = 0;  // M, N, r
  Operand dy;  // (M, N)
  Operand u;   // (M, r)
  Operand c;   // (N, r); unused when du_part is null
  float scaling = 1.0f;
  int64_t chunk_rows = 0;  // rows per program along M, a multiple of dy_grads_tile()
  float* du_part = nullptr;  // (column tiles, M, r) or null
  float* dc_part = nullptr;  // (row chunks, N, r) or null
};

int dy_grads_tile(ScalarKind kind);  // the column tile (and row step) of the kernel
void launch_dy_grads(ScalarKind kind, const DyGradsArgs& args, cudaStream_t stream);

}  // namespace featadapt
