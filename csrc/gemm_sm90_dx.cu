// sm_90a: the input-gradient GEMM, dx = dy W0 (+ the low-rank term keep ⊙ (du A)
// as a source), for the LoRA and LoRFA backward (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace featadapt {
namespace sm90 {

template <typename T>
using Dx = Linear<T, /*BIsNByK=*/false>;

Plan plan_dx(ScalarKind kind, const LinearArgs& args, int sm_count) {
  if (kind == ScalarKind::BFloat16) return Dx<cutlass::bfloat16_t>::plan(Dx<cutlass::bfloat16_t>::arguments(args, sm_count));
  return Dx<cutlass::half_t>::plan(Dx<cutlass::half_t>::arguments(args, sm_count));
}

void run_dx(ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace, cudaStream_t stream) {
  if (kind == ScalarKind::BFloat16) {
    Dx<cutlass::bfloat16_t>::run(Dx<cutlass::bfloat16_t>::arguments(args, sm_count), workspace, stream);
  } else {
    Dx<cutlass::half_t>::run(Dx<cutlass::half_t>::arguments(args, sm_count), workspace, stream);
  }
}

}  // namespace sm90
}  // namespace featadapt
