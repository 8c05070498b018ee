// CUTLASS 2 kernels for Ampere (sm_80; also sm_86 and sm_89, and later GPUs
// through the PTX): cp.async multistage main loops with CUTLASS's linear
// combination epilogue, d = acc + β·c.
//
//   linear     d = a·op(b) + c + bias: the epilogue adds one source, so the
//              bias rides as a source row of leading dimension 0 (every
//              output row reads it) when there is no other source, and is
//              added into the source first when there is one (c == d)
//   gradient   g = a·b in float32, for the VeFA backward, whose scale and
//              column sums then run as a pass (gemm_passes.cu): CUTLASS 2's
//              epilogue has no column reductions without a visitor tree,
//              and one pass over g is what the sm_80 path pays for that.
//
// The kernels are launched through featadapt's own __global__ entry, whose
// body exists only in the sm_8x passes of the build: the sm_90a pass, which
// never runs these, does not compile them again.
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "gemm_common.h"

namespace featadapt {
namespace sm80 {
namespace {

template <typename GemmKernel>
__global__ void __launch_bounds__(GemmKernel::kThreadCount, 1) entry(typename GemmKernel::Params params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && __CUDA_ARCH__ < 900
  extern __shared__ int storage[];
  GemmKernel op;
  op(params, *reinterpret_cast<typename GemmKernel::SharedStorage*>(storage));
#endif
}

// 128 × 128 × 32 tiles over four warps of 64 × 64, four stages: CUTLASS's
// standard Ampere 16-bit configuration.
template <typename T, typename LayoutB, typename Out>
struct Kernel {
  using Epilogue =
      cutlass::epilogue::thread::LinearCombination<Out, 128 / cutlass::sizeof_bits<Out>::value, float, float>;
  using Device = cutlass::gemm::device::GemmUniversal<
      T, cutlass::layout::RowMajor, T, LayoutB, Out, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
      4, 8, 8>;
  using GemmKernel = typename Device::GemmKernel;
  using Arguments = typename Device::Arguments;

  static Arguments arguments(const GemmShape& s, const void* a, const void* b, const void* c, int64_t ldc, float beta,
                             void* d) {
    return Arguments(cutlass::gemm::GemmUniversalMode::kGemm,
                     {static_cast<int>(s.m), static_cast<int>(s.n), static_cast<int>(s.k)}, 1, {1.0f, beta}, a, b, c,
                     d, 0, 0, 0, 0, s.lda, s.ldb, ldc, s.ldd);
  }

  static Plan plan(const Arguments& args) {
    Plan p;
    const cutlass::Status status = GemmKernel::can_implement(args);
    if (status != cutlass::Status::kSuccess)
      p.reason = std::string("CUTLASS's sm_80 kernel cannot implement it (") + cutlassGetStatusString(status) + ")";
    return p;  // kGemm mode without split-K: no workspace
  }

  static void run(const Arguments& args, cudaStream_t stream) {
    const typename GemmKernel::Params params(args, /*device_sms=*/0, /*sm_occupancy=*/0);  // (stream-K only)
    const int smem = static_cast<int>(sizeof(typename GemmKernel::SharedStorage));
    if (smem >= (48 << 10)) {
      const cudaError_t e = cudaFuncSetAttribute(entry<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess)
        throw std::runtime_error(std::string("featadapt sm_80 GEMM: CUTLASS could not launch it (shared memory: ") +
                                 cudaGetErrorString(e) + ")");
    }
    entry<GemmKernel><<<params.get_grid_dims(), GemmKernel::kThreadCount, smem, stream>>>(params);
  }
};

template <typename T, bool BIsNByK>
using Linear = Kernel<T, std::conditional_t<BIsNByK, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>, T>;

template <typename T>
using Gradient = Kernel<T, cutlass::layout::RowMajor, float>;

// The one source the epilogue adds: c, else the bias as a row of leading dimension 0.
template <typename T, bool BIsNByK>
typename Linear<T, BIsNByK>::Arguments linear_arguments(const LinearArgs& a) {
  const void* source = a.c != nullptr ? a.c : a.bias;
  const int64_t ld = a.c != nullptr ? a.ldc : 0;
  return Linear<T, BIsNByK>::arguments(a.shape, a.a, a.b, source, ld, source != nullptr ? 1.0f : 0.0f, a.d);
}

template <typename T>
Plan plan_linear_typed(const LinearArgs& a) {
  if (a.shape.b_is_n_by_k) return Linear<T, true>::plan(linear_arguments<T, true>(a));
  return Linear<T, false>::plan(linear_arguments<T, false>(a));
}

template <typename T>
void run_linear_typed(const LinearArgs& a, cudaStream_t stream) {
  if (a.shape.b_is_n_by_k) {
    Linear<T, true>::run(linear_arguments<T, true>(a), stream);
  } else {
    Linear<T, false>::run(linear_arguments<T, false>(a), stream);
  }
}

}  // namespace

Plan plan_linear(ScalarKind kind, const LinearArgs& args) {
  if (kind == ScalarKind::BFloat16) return plan_linear_typed<cutlass::bfloat16_t>(args);
  return plan_linear_typed<cutlass::half_t>(args);
}

void run_linear(ScalarKind kind, const LinearArgs& args, cudaStream_t stream) {
  if (args.c != nullptr && args.bias != nullptr) {  // (c == d: gemm.cpp checked)
    launch_add_bias_rows(kind, args.d, args.shape.m, args.shape.n, args.shape.ldd, args.bias, stream);
  }
  if (kind == ScalarKind::BFloat16) {
    run_linear_typed<cutlass::bfloat16_t>(args, stream);
  } else {
    run_linear_typed<cutlass::half_t>(args, stream);
  }
}

Plan plan_gradient(ScalarKind kind, const GemmShape& s) {
  if (kind == ScalarKind::BFloat16)
    return Gradient<cutlass::bfloat16_t>::plan(Gradient<cutlass::bfloat16_t>::arguments(s, nullptr, nullptr, nullptr, 0, 0.0f, nullptr));
  return Gradient<cutlass::half_t>::plan(Gradient<cutlass::half_t>::arguments(s, nullptr, nullptr, nullptr, 0, 0.0f, nullptr));
}

void run_gradient(ScalarKind kind, const GemmShape& s, const void* a, const void* b, float* g, cudaStream_t stream) {
  if (kind == ScalarKind::BFloat16) {
    Gradient<cutlass::bfloat16_t>::run(Gradient<cutlass::bfloat16_t>::arguments(s, a, b, nullptr, 0, 0.0f, g), stream);
  } else {
    Gradient<cutlass::half_t>::run(Gradient<cutlass::half_t>::arguments(s, a, b, nullptr, 0, 0.0f, g), stream);
  }
}

}  // namespace sm80
}  // namespace featadapt
