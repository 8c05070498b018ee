// featadapt::vefa_input_grads_cpu: VeFA's backward after the frozen GEMM, on
// the CPU, in one pass over g = dy W0 and x (DESIGN.md §1):
//   dx = g ⊙ s (written over g), ds = Σ_m g ⊙ x, dt = Σ_m g.
// With torch ops this takes a product, a float32 copy of it for the sum and a
// scaling pass; here each element of g and x is read once, converted to float32
// in registers, and the sums accumulate in float32 per thread.
//
// The row loop is written once with vector types (cpu_vefa_loop.h, on
// cpu_simd.h) and compiled for AVX2 and AVX-512; the widest one the CPU has
// runs, and CPUs with neither (or other compilers) get a scalar loop. The op
// is on PyTorch's stable ABI (stable_util.h), like the CUDA ones.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "stable_util.h"

namespace featadapt {
namespace {

using cpu::Capability;
using cpu::load_float;
using cpu::store_float;

// One row: dx = g ⊙ s over g, ds += g ⊙ x, dt += g.
template <typename T, bool kShift>
FEATADAPT_INLINE void vefa_row(T* __restrict g, const T* __restrict x, const float* __restrict s, int64_t k,
                               float* __restrict ds, float* __restrict dt) {
  for (int64_t j = 0; j < k; ++j) {
    const float a = load_float(g[j]);
    ds[j] += a * load_float(x[j]);
    if (kShift) dt[j] += a;
    store_float(g[j], a * s[j]);
  }
}

// Four rows at once, so that each ds[j] (and dt[j]) is loaded and stored once
// per four rows.
template <typename T, bool kShift>
FEATADAPT_INLINE void vefa_four_rows(T* __restrict g0, T* __restrict g1, T* __restrict g2, T* __restrict g3,
                                     const T* __restrict x0, const T* __restrict x1, const T* __restrict x2,
                                     const T* __restrict x3, const float* __restrict s, int64_t k,
                                     float* __restrict ds, float* __restrict dt) {
  for (int64_t j = 0; j < k; ++j) {
    const float a0 = load_float(g0[j]), a1 = load_float(g1[j]), a2 = load_float(g2[j]), a3 = load_float(g3[j]);
    ds[j] += (a0 * load_float(x0[j]) + a1 * load_float(x1[j])) + (a2 * load_float(x2[j]) + a3 * load_float(x3[j]));
    if (kShift) dt[j] += (a0 + a1) + (a2 + a3);
    const float sj = s[j];
    store_float(g0[j], a0 * sj);
    store_float(g1[j], a1 * sj);
    store_float(g2[j], a2 * sj);
    store_float(g3[j], a3 * sj);
  }
}

template <typename T, bool kShift>
FEATADAPT_INLINE void vefa_rows_of(T* g, int64_t gs, const T* x, int64_t xs, const float* s, int64_t k,
                                   int64_t rows, float* ds, float* dt) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) {
    T* g_m = g + m * gs;
    const T* x_m = x + m * xs;
    vefa_four_rows<T, kShift>(g_m, g_m + gs, g_m + 2 * gs, g_m + 3 * gs, x_m, x_m + xs, x_m + 2 * xs,
                              x_m + 3 * xs, s, k, ds, dt);
  }
  for (; m < rows; ++m) vefa_row<T, kShift>(g + m * gs, x + m * xs, s, k, ds, dt);
}

template <typename T>
void scalar_rows(T* g, int64_t gs, const T* x, int64_t xs, const float* s, int64_t k, int64_t rows, float* ds,
                 float* dt) {
  if (dt != nullptr) {
    vefa_rows_of<T, true>(g, gs, x, xs, s, k, rows, ds, dt);
  } else {
    vefa_rows_of<T, false>(g, gs, x, xs, s, k, rows, ds, dt);
  }
}

// The vector loop (cpu_vefa_loop.h), compiled for AVX2 and for AVX-512.
#ifdef FEATADAPT_X86_SIMD
FEATADAPT_SIMD_BEGIN_AVX2
namespace avx2 {
using namespace cpu::avx2;
#include "cpu_vefa_loop.h"
}  // namespace avx2
FEATADAPT_SIMD_END

FEATADAPT_SIMD_BEGIN_AVX512
namespace avx512 {
using namespace cpu::avx512;
#include "cpu_vefa_loop.h"
}  // namespace avx512
FEATADAPT_SIMD_END
#endif

template <typename T>
using RowsFn = void (*)(T*, int64_t, const T*, int64_t, const float*, int64_t, int64_t, float*, float*);

// The row loop for T at this capability (float16 has only the scalar one).
template <typename T>
RowsFn<T> rows_for(Capability cap) {
#ifdef FEATADAPT_X86_SIMD
  if constexpr (!std::is_same_v<T, c10::Half>) {
    if (cap == Capability::kAvx512) return avx512::rows<T>;
    if (cap == Capability::kAvx2) return avx2::rows<T>;
  }
#endif
  return scalar_rows<T>;
}

template <typename T>
void run(const Tensor& g, const Tensor& x, const Tensor& scale, float* ds, float* dt, int64_t threads) {
  const RowsFn<T> rows = rows_for<T>(cpu::capability());
  const int64_t m = g.size(0), k = g.size(1);
  T* g_ptr = static_cast<T*>(g.data_ptr());
  const T* x_ptr = static_cast<const T*>(x.data_ptr());
  const float* s = static_cast<const float*>(scale.data_ptr());
  const int64_t gs = g.stride(0), xs = x.stride(0);
  // One block of rows per thread; each thread sums into its own K-vectors.
  torch::stable::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t begin = m * t / threads, end = m * (t + 1) / threads;
      rows(g_ptr + begin * gs, gs, x_ptr + begin * xs, xs, s, k, end - begin, ds + t * k,
           dt == nullptr ? nullptr : dt + t * k);
    }
  });
}

std::tuple<Tensor, Tensor> vefa_input_grads_cpu(Tensor g, Tensor x, Tensor scale, bool need_shift) {
  const char* op = "featadapt::vefa_input_grads_cpu";
  STD_TORCH_CHECK(g.is_cpu() && x.is_cpu() && scale.is_cpu(), op, ": expected CPU tensors");
  STD_TORCH_CHECK(g.dim() == 2, op, ": g must be 2-D (M, K), got shape ", shape_of(g));
  STD_TORCH_CHECK(x.dim() == 2 && x.size(0) == g.size(0) && x.size(1) == g.size(1), op, ": x must have g's shape ",
                  shape_of(g), ", got ", shape_of(x));
  STD_TORCH_CHECK(x.scalar_type() == g.scalar_type(), op, ": x must have g's dtype ", dtype_name(g.scalar_type()),
                  ", got ", dtype_name(x.scalar_type()));
  STD_TORCH_CHECK(g.stride(1) == 1 && x.stride(1) == 1, op, ": g and x need unit stride along K, got strides ",
                  strides_of(g), " and ", strides_of(x));
  STD_TORCH_CHECK(scale.dim() == 1 && scale.size(0) == g.size(1) && scale.scalar_type() == ScalarType::Float &&
                      scale.is_contiguous(),
                  op, ": scale must be a contiguous float32 vector of size ", g.size(1), ", got shape ",
                  shape_of(scale), " and dtype ", dtype_name(scale.scalar_type()));
  const int64_t m = g.size(0), k = g.size(1);
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(torch::stable::get_num_threads()), m));
  const ScalarType f32 = ScalarType::Float;
  Tensor ds_parts = torch::stable::new_zeros(x, {threads, k}, f32);
  Tensor dt_parts = torch::stable::new_zeros(x, {need_shift ? threads : 0, k}, f32);
  float* ds = static_cast<float*>(ds_parts.data_ptr());
  float* dt = need_shift ? static_cast<float*>(dt_parts.data_ptr()) : nullptr;
  switch (g.scalar_type()) {
    case ScalarType::BFloat16: run<c10::BFloat16>(g, x, scale, ds, dt, threads); break;
    case ScalarType::Half: run<c10::Half>(g, x, scale, ds, dt, threads); break;
    case ScalarType::Float: run<float>(g, x, scale, ds, dt, threads); break;
    default:
      STD_TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16 tensors, got ",
                      dtype_name(g.scalar_type()));
  }
  const std::vector<int64_t> rows{0};
  return {torch::stable::sum(ds_parts, rows),
          need_shift ? torch::stable::sum(dt_parts, rows) : torch::stable::new_empty(x, {0}, f32)};
}

}  // namespace
}  // namespace featadapt

STABLE_TORCH_LIBRARY_FRAGMENT(featadapt, m) {
  // g is overwritten with dx; returns ds and dt (empty without need_shift), float32.
  // (No optional outputs: torch.compile's functionalization of a mutating op takes none.)
  m.def("vefa_input_grads_cpu(Tensor(a!) g, Tensor x, Tensor scale, bool need_shift) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(featadapt, CPU, m) { m.impl("vefa_input_grads_cpu", TORCH_BOX(&featadapt::vefa_input_grads_cpu)); }
