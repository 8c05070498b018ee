// sm_90a: the VeFA backward in one GEMM, dx = (dy W0) ⊙ s with the per-row-tile
// column sums of g and g ⊙ x for ds and dt in its epilogue (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace featadapt {
namespace sm90 {

Plan plan_vefa_backward(ScalarKind kind, const VefaBackwardArgs& args, int sm_count) {
  if (kind == ScalarKind::BFloat16)
    return VefaBackward<cutlass::bfloat16_t>::plan(VefaBackward<cutlass::bfloat16_t>::arguments(args, sm_count));
  return VefaBackward<cutlass::half_t>::plan(VefaBackward<cutlass::half_t>::arguments(args, sm_count));
}

void run_vefa_backward(ScalarKind kind, const VefaBackwardArgs& args, int sm_count, void* workspace,
                       cudaStream_t stream) {
  if (kind == ScalarKind::BFloat16) {
    VefaBackward<cutlass::bfloat16_t>::run(VefaBackward<cutlass::bfloat16_t>::arguments(args, sm_count), workspace,
                                           stream);
  } else {
    VefaBackward<cutlass::half_t>::run(VefaBackward<cutlass::half_t>::arguments(args, sm_count), workspace, stream);
  }
}

}  // namespace sm90
}  // namespace featadapt
