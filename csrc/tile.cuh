// Device-side building blocks shared by the kernels: scalar conversions,
// 16×16 warp fragments (tensor cores for float16/bfloat16, plain FMA for
// float32, so float32 stays float32 and never rounds to TF32), and a tile
// loader that stages global memory through registers into shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace featadapt {

// -- scalars -------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> constexpr bool kIsFloat32 = std::is_same<T, float>::value;

// Shared-memory row padding (elements): keeps fragment rows 32-byte aligned
// for the tensor-core loads and spreads rows over the banks.
template <typename T> constexpr int kPad = kIsFloat32<T> ? 4 : 8;

// -- 16×16 warp fragments ------------------------------------------------------
//
// A warp multiplies 16×16 tiles held in shared memory: acc += A B, with
// float32 accumulators. A and B are addressed row- or column-major with a
// leading dimension, as the tensor cores define it:
//   A row-major: A(i, k) = a[i * lda + k]    A col-major: A(i, k) = a[k * lda + i]
//   B row-major: B(k, j) = b[k * ldb + j]    B col-major: B(k, j) = b[j * ldb + k]
// Accumulators go to and from a row-major 16×16 float scratch tile, which is
// how every epilogue reads them. Pointers must be 32-byte aligned and leading
// dimensions multiples of 8 elements (the tensor cores' rules).

struct RowMajor {};
struct ColMajor {};

template <typename L> struct WmmaLayout;
template <> struct WmmaLayout<RowMajor> { using type = nvcuda::wmma::row_major; };
template <> struct WmmaLayout<ColMajor> { using type = nvcuda::wmma::col_major; };

// float16 and bfloat16: tensor cores through WMMA.
template <typename T>
struct TensorCoreMath {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  template <typename L>
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, typename WmmaLayout<L>::type>;
  template <typename L>
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, typename WmmaLayout<L>::type>;

  __device__ static void zero(Acc& acc) { nvcuda::wmma::fill_fragment(acc, 0.0f); }
  // (Fragments are taken as any type: an alias template's layout cannot be deduced.)
  template <typename Fragment>
  __device__ static void load(Fragment& f, const T* p, int ld) { nvcuda::wmma::load_matrix_sync(f, p, ld); }
  template <typename FA, typename FB>
  __device__ static void mma(Acc& acc, const FA& a, const FB& b) { nvcuda::wmma::mma_sync(acc, a, b, acc); }
  __device__ static void store(float* scratch, const Acc& acc) {
    nvcuda::wmma::store_matrix_sync(scratch, acc, 16, nvcuda::wmma::mem_row_major);
  }
  __device__ static void load_acc(Acc& acc, const float* scratch) {
    nvcuda::wmma::load_matrix_sync(acc, scratch, 16, nvcuda::wmma::mem_row_major);
  }
};

// float32: plain FMA, so float32 stays float32 (tensor cores would round to
// TF32). A lane owns row lane/2, columns (lane%2)*8 .. +8 of the accumulator;
// "fragments" of A and B are only addresses, read during mma.
struct FmaMath {
  struct Acc { float v[8]; };
  template <typename L> struct A { const float* p; int ld; };
  template <typename L> struct B { const float* p; int ld; };

  __device__ static int row() { return (threadIdx.x & 31) >> 1; }
  __device__ static int col0() { return (threadIdx.x & 1) * 8; }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc.v[e] = 0.0f;
  }
  template <typename L>
  __device__ static void load(A<L>& a, const float* p, int ld) { a = {p, ld}; }
  template <typename L>
  __device__ static void load(B<L>& b, const float* p, int ld) { b = {p, ld}; }

  template <typename LA, typename LB>
  __device__ static void mma(Acc& acc, const A<LA>& a, const B<LB>& b) {
    const int r = row(), c0 = col0();
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const float av = std::is_same<LA, RowMajor>::value ? a.p[r * a.ld + k] : a.p[k * a.ld + r];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int c = c0 + e;
        const float bv = std::is_same<LB, RowMajor>::value ? b.p[k * b.ld + c] : b.p[c * b.ld + k];
        acc.v[e] = fmaf(av, bv, acc.v[e]);
      }
    }
  }

  __device__ static void store(float* scratch, const Acc& acc) {
#pragma unroll
    for (int e = 0; e < 8; ++e) scratch[row() * 16 + col0() + e] = acc.v[e];
  }
  __device__ static void load_acc(Acc& acc, const float* scratch) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc.v[e] = scratch[row() * 16 + col0() + e];
  }
};

template <typename T>
using Math = typename std::conditional<kIsFloat32<T>, FmaMath, TensorCoreMath<T>>::type;

// Which elements of a 16×16 scratch tile a lane handles in the epilogues:
// row lane/2, columns (lane%2)*8 .. +8.
__device__ __forceinline__ int lane_row() { return (threadIdx.x & 31) >> 1; }
__device__ __forceinline__ int lane_col0() { return ((threadIdx.x & 31) & 1) * 8; }

// -- global → registers → shared memory ------------------------------------------

// Copies ROWS×DEPTH tiles of an Operand (rows row0.., reduction steps k0..)
// into shared memory laid out [row][k] with leading dimension ld. fetch()
// loads the next tile into registers, so those loads overlap the math on the
// tile already in shared memory; store() writes them out. Elements outside
// (rows, depth) are 0. With `scale`, element (row, k) becomes
// a(row, k)·scale[k] + shift[k], computed in float32 and rounded once (the
// VeFA prologue; the torch backend rounds the same way).
template <typename T, int ROWS, int DEPTH, int THREADS>
struct TileLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int kPerThread = ROWS * DEPTH / THREADS;
  static_assert(ROWS * DEPTH % THREADS == 0 && kPerThread % kVec == 0, "tile does not split into 16-byte loads");
  static_assert(ROWS % kVec == 0 && DEPTH % kVec == 0, "tile sides must be whole vectors");
  static constexpr int kVecs = kPerThread / kVec;

  // How threads walk the tile: 16-byte vectors along whichever dimension is
  // contiguous and aligned, else single elements along the smaller stride.
  enum Mode { kVectorsAlongDepth, kVectorsAlongRows, kElementsAlongDepth, kElementsAlongRows };

  alignas(16) T regs[kPerThread];  // read and written as 16-byte vectors
  const T* data;
  int64_t stride_row, stride_red, rows, depth;
  const float* scale;
  const float* shift;
  Mode mode;

  __device__ TileLoader(const Operand& op, int64_t rows_, int64_t depth_, const float* scale_ = nullptr,
                        const float* shift_ = nullptr)
      : data(static_cast<const T*>(op.data)), stride_row(op.stride_row), stride_red(op.stride_red),
        rows(rows_), depth(depth_), scale(scale_), shift(shift_) {
    const bool aligned = (reinterpret_cast<uintptr_t>(op.data) % 16) == 0;
    if (aligned && stride_red == 1 && stride_row % kVec == 0 && depth % kVec == 0) {
      mode = kVectorsAlongDepth;
    } else if (aligned && stride_row == 1 && stride_red % kVec == 0 && rows % kVec == 0) {
      mode = kVectorsAlongRows;
    } else if (stride_red == 1 || (stride_row != 1 && llabs(stride_red) <= llabs(stride_row))) {
      mode = kElementsAlongDepth;
    } else {
      mode = kElementsAlongRows;
    }
  }

  // Tile coordinates of register element i (same walk for fetch and store).
  __device__ void coords(int i, int& r, int& k) const {
    if (mode == kVectorsAlongDepth) {
      const int v = threadIdx.x + (i / kVec) * THREADS;
      r = v / (DEPTH / kVec);
      k = (v % (DEPTH / kVec)) * kVec + i % kVec;
    } else if (mode == kVectorsAlongRows) {
      const int v = threadIdx.x + (i / kVec) * THREADS;
      r = (v % (ROWS / kVec)) * kVec + i % kVec;
      k = v / (ROWS / kVec);
    } else if (mode == kElementsAlongDepth) {
      const int e = threadIdx.x + i * THREADS;
      r = e / DEPTH;
      k = e % DEPTH;
    } else {
      const int e = threadIdx.x + i * THREADS;
      r = e % ROWS;
      k = e / ROWS;
    }
  }

  __device__ void fetch(int64_t row0, int64_t k0) {
    if (mode == kVectorsAlongDepth || mode == kVectorsAlongRows) {
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        int r, k;
        coords(v * kVec, r, k);  // the vector's first element
        const int64_t gr = row0 + r, gk = k0 + k;
        // A vector lies wholly inside or wholly outside: the contiguous extent is a multiple of kVec.
        if (gr < rows && gk < depth) {
          *reinterpret_cast<uint4*>(&regs[v * kVec]) =
              __ldg(reinterpret_cast<const uint4*>(data + gr * stride_row + gk * stride_red));
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) regs[v * kVec + e] = from_float<T>(0.0f);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        int r, k;
        coords(i, r, k);
        const int64_t gr = row0 + r, gk = k0 + k;
        regs[i] = (gr < rows && gk < depth) ? data[gr * stride_row + gk * stride_red] : from_float<T>(0.0f);
      }
    }
    if (scale != nullptr) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        int r, k;
        coords(i, r, k);
        const int64_t gr = row0 + r, gk = k0 + k;
        if (gr < rows && gk < depth) {
          const float t = shift != nullptr ? shift[gk] : 0.0f;
          regs[i] = from_float<T>(fmaf(to_float(regs[i]), scale[gk], t));
        }
      }
    }
  }

  __device__ void store(T* smem, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int r, k;
      coords(i, r, k);
      smem[r * ld + k] = regs[i];
    }
  }
};

}  // namespace featadapt
