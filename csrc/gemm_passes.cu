// The memory-bound passes around the GEMMs (gemm.h): no main loop here, each
// thread streams its columns once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "gemm.h"

namespace featadapt {
namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

// One block per row n of w: w_scaled[n, :] = w[n, :] ⊙ scale and, when asked,
// bias_out[n] = Σ_k w[n, k] shift[k] + bias[n], reduced in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads) scale_weight_kernel(const T* w, int64_t k, int64_t ldw, const float* scale,
                                                              const float* shift, const T* bias, T* w_scaled,
                                                              T* bias_out) {
  const int64_t n = blockIdx.x;
  const T* row = w + n * ldw;
  T* out = w_scaled + n * k;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(row[j]);
    out[j] = from_float<T>(v * scale[j]);
    if (shift != nullptr) dot += v * shift[j];
  }
  if (bias_out == nullptr) return;  // uniform across the block
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) bias_out[n] = from_float<T>(partial[0] + (bias != nullptr ? to_float(bias[n]) : 0.0f));
}

// out[i, j] += bias[j], a thread per element (the sm_80 linear GEMM's bias
// when there is also a source: its epilogue adds one).
template <typename T>
__global__ void __launch_bounds__(kThreads) add_bias_rows_kernel(T* out, int64_t m, int64_t n, int64_t ld,
                                                               const T* bias) {
  const int64_t index = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (index >= m * n) return;
  const int64_t i = index / n, j = index % n;
  out[i * ld + j] = from_float<T>(to_float(out[i * ld + j]) + to_float(bias[j]));
}

// Block (column tile of 32, row tile): dx = g ⊙ scale, and the tile's column
// sums of g and g ⊙ x, reduced over the block's 8 row lanes in a fixed order.
constexpr int kCols = 32, kRowLanes = kThreads / kCols;

template <typename T>
__global__ void __launch_bounds__(kThreads) vefa_backward_pass_kernel(const float* g, int64_t m, int64_t n,
                                                                    const float* scale, const T* x, int64_t ldx,
                                                                    T* dx, int64_t lddx, int row_tile, float* colsum,
                                                                    float* colsum_x, int64_t colsum_ld) {
  const int col = threadIdx.x % kCols, lane = threadIdx.x / kCols;
  const int64_t j = int64_t{blockIdx.x} * kCols + col;
  const int64_t first = int64_t{blockIdx.y} * row_tile, last = std::min<int64_t>(first + row_tile, m);
  float sum = 0.0f, sum_x = 0.0f;
  if (j < n) {
    for (int64_t i = first + lane; i < last; i += kRowLanes) {
      const float v = g[i * n + j];
      if (dx != nullptr) dx[i * lddx + j] = from_float<T>(v * scale[j]);
      sum += v;
      if (colsum_x != nullptr) sum_x += v * to_float(x[i * ldx + j]);
    }
  }
  __shared__ float sums[2][kRowLanes][kCols];
  sums[0][lane][col] = sum;
  sums[1][lane][col] = sum_x;
  __syncthreads();
  if (lane == 0 && j < n) {
    float total = 0.0f, total_x = 0.0f;
    for (int l = 0; l < kRowLanes; ++l) {
      total += sums[0][l][col];
      total_x += sums[1][l][col];
    }
    if (colsum != nullptr) colsum[blockIdx.y * colsum_ld + j] = total;
    if (colsum_x != nullptr) colsum_x[blockIdx.y * colsum_ld + j] = total_x;
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("featadapt ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

void launch_scale_weight(ScalarKind kind, const void* w, int64_t n, int64_t k, int64_t ldw, const float* scale,
                         const float* shift, const void* bias, void* w_scaled, void* bias_out, cudaStream_t stream) {
  if (n <= 0) return;
  if (kind == ScalarKind::BFloat16) {
    using T = __nv_bfloat16;
    scale_weight_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const T*>(w), k, ldw, scale, shift, static_cast<const T*>(bias), static_cast<T*>(w_scaled),
        static_cast<T*>(bias_out));
  } else {
    using T = __half;
    scale_weight_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const T*>(w), k, ldw, scale, shift, static_cast<const T*>(bias), static_cast<T*>(w_scaled),
        static_cast<T*>(bias_out));
  }
  check_launch("scale_weight");
}

void launch_add_bias_rows(ScalarKind kind, void* out, int64_t m, int64_t n, int64_t ld, const void* bias,
                          cudaStream_t stream) {
  if (m <= 0 || n <= 0) return;
  const unsigned blocks = static_cast<unsigned>((m * n + kThreads - 1) / kThreads);
  if (kind == ScalarKind::BFloat16) {
    using T = __nv_bfloat16;
    add_bias_rows_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(out), m, n, ld,
                                                             static_cast<const T*>(bias));
  } else {
    using T = __half;
    add_bias_rows_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(out), m, n, ld,
                                                             static_cast<const T*>(bias));
  }
  check_launch("add_bias_rows");
}

void launch_vefa_backward_pass(ScalarKind kind, const float* g, int64_t m, int64_t n, const float* scale,
                               const void* x, int64_t ldx, void* dx, int64_t lddx, int row_tile, float* colsum,
                               float* colsum_x, int64_t colsum_ld, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return;
  const dim3 grid(static_cast<unsigned>((n + kCols - 1) / kCols), static_cast<unsigned>((m + row_tile - 1) / row_tile));
  if (kind == ScalarKind::BFloat16) {
    using T = __nv_bfloat16;
    vefa_backward_pass_kernel<T><<<grid, kThreads, 0, stream>>>(g, m, n, scale, static_cast<const T*>(x), ldx,
                                                                static_cast<T*>(dx), lddx, row_tile, colsum,
                                                                colsum_x, colsum_ld);
  } else {
    using T = __half;
    vefa_backward_pass_kernel<T><<<grid, kThreads, 0, stream>>>(g, m, n, scale, static_cast<const T*>(x), ldx,
                                                                static_cast<T*>(dx), lddx, row_tile, colsum,
                                                                colsum_x, colsum_ld);
  }
  check_launch("vefa_backward_pass");
}

}  // namespace featadapt
