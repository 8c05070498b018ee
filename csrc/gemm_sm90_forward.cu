// sm_90a: the forward GEMM, y = x W0ᵀ (+ the low-rank term as a source, or a
// bias row), for the VeFA, LoRA and LoRFA forwards (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace featadapt {
namespace sm90 {

template <typename T>
using Forward = Linear<T, /*BIsNByK=*/true>;

Plan plan_forward(ScalarKind kind, const LinearArgs& args, int sm_count) {
  if (kind == ScalarKind::BFloat16) return Forward<cutlass::bfloat16_t>::plan(Forward<cutlass::bfloat16_t>::arguments(args, sm_count));
  return Forward<cutlass::half_t>::plan(Forward<cutlass::half_t>::arguments(args, sm_count));
}

void run_forward(ScalarKind kind, const LinearArgs& args, int sm_count, void* workspace, cudaStream_t stream) {
  if (kind == ScalarKind::BFloat16) {
    Forward<cutlass::bfloat16_t>::run(Forward<cutlass::bfloat16_t>::arguments(args, sm_count), workspace, stream);
  } else {
    Forward<cutlass::half_t>::run(Forward<cutlass::half_t>::arguments(args, sm_count), workspace, stream);
  }
}

}  // namespace sm90
}  // namespace featadapt
