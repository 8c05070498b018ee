// CUTLASS 3 kernels for Hopper (sm_90a): TMA loads, a warp-specialised
// persistent cooperative main loop and an epilogue visitor tree (EVT) that
// carries featadapt's fusion. Included by the gemm_sm90_*.cu translation
// units, one per kernel, so they compile in parallel.
//
// The kernel bodies exist only in the sm_90a pass of the build (CUTLASS
// guards them); the host side (can_implement, workspace sizing) is ordinary
// C++, so a plan can be made on a machine without a GPU.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/functional.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include <stdexcept>
#include <string>

#include "gemm.h"
#include "gemm_common.h"

namespace featadapt {
namespace sm90 {

using namespace cute;

// One tile configuration for now (the issue's headline shape is 2048 × 4096 ×
// 4096): 128 × 256 × 64 output tiles over two consumer warpgroups, clusters
// of two along M sharing each W0 tile through TMA multicast. Which of this,
// a 128 × 128 tile or the ping-pong schedule wins per shape is for the GPU
// measurement to say (the dispatch table records it).
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
constexpr int kRowTile = 128;  // size<0>(TileShape): rows per column-sum partial
constexpr int kColTile = 256;  // size<1>(TileShape): the partials' padding

template <typename T>
constexpr int kAlignment = 128 / cutlass::sizeof_bits<T>::value;  // 16 bytes: what TMA needs
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

using LayoutA = cutlass::layout::RowMajor;
using LayoutD = cutlass::layout::RowMajor;
template <bool BIsNByK>  // b (n × k) row-major is CUTLASS's column-major K × N
using LayoutB = std::conditional_t<BIsNByK, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// The GEMM around an epilogue fusion (a FusionOperation or an EVT).
template <typename T, bool BIsNByK, typename Fusion>
struct Kernel {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, LayoutD, kAlignment<T>, T, LayoutD,
      kAlignment<T>, EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA, kAlignment<T>, T, LayoutB<BIsNByK>,
      kAlignment<T>, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using Arguments = typename Gemm::Arguments;

  using StrideA = typename GemmKernel::StrideA;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;

  static StrideA stride_a(const GemmShape& s) { return make_stride(s.lda, Int<1>{}, int64_t(0)); }
  static StrideB stride_b(const GemmShape& s) {
    if constexpr (BIsNByK) {
      return make_stride(s.ldb, Int<1>{}, int64_t(0));  // (n, k): k contiguous
    } else {
      return make_stride(Int<1>{}, s.ldb, int64_t(0));  // (n, k): n contiguous
    }
  }
  static StrideD stride_rows(int64_t ld) { return make_stride(ld, Int<1>{}, int64_t(0)); }

  static cutlass::KernelHardwareInfo hardware(int sm_count) {
    cutlass::KernelHardwareInfo info;
    info.device_id = 0;  // (only read when sm_count is unknown)
    info.sm_count = sm_count;
    return info;
  }

  static Plan plan(const Arguments& args) {
    Plan p;
    const cutlass::Status status = Gemm::can_implement(args);
    if (status != cutlass::Status::kSuccess) {
      p.reason = std::string("CUTLASS's sm_90a kernel cannot implement it (") + cutlassGetStatusString(status) + ")";
      return p;
    }
    p.workspace = Gemm::get_workspace_size(args);
    return p;
  }

  static void run(const Arguments& args, void* workspace, cudaStream_t stream) {
    Gemm gemm;
    check_status("initialize", gemm.initialize(args, workspace, stream));
    check_status("run", gemm.run(stream));
  }

  static void check_status(const char* step, cutlass::Status status) {
    if (status != cutlass::Status::kSuccess)
      throw std::runtime_error(std::string("featadapt sm_90a GEMM: CUTLASS could not launch it (") + step + ": " +
                               cutlassGetStatusString(status) + ")");
  }
};

// -- linear: d = a·op(b) + c + bias ---------------------------------------------
// CUTLASS's own fusion D = β·C + (α·acc + bias): c as the source (β = 1, or
// β = 0 without one, and then C is never loaded), the bias row broadcast.
template <typename T>
using LinearFusion = cutlass::epilogue::fusion::LinCombPerColBias<T, float, T, T, float, kAlignment<T>, kRound>;

template <typename T, bool BIsNByK>
struct Linear : Kernel<T, BIsNByK, LinearFusion<T>> {
  using K = Kernel<T, BIsNByK, LinearFusion<T>>;

  static typename K::Arguments arguments(const LinearArgs& a, int sm_count) {
    const GemmShape& s = a.shape;
    const bool source = a.c != nullptr;
    typename K::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {static_cast<int>(s.m), static_cast<int>(s.n), static_cast<int>(s.k), 1},
        {static_cast<const T*>(a.a), K::stride_a(s), static_cast<const T*>(a.b), K::stride_b(s)},
        // Without a source, C names d's memory (β = 0: never read) rather than null, so
        // the TMA descriptor CUTLASS builds for C describes real memory.
        {{}, static_cast<const T*>(source ? a.c : a.d), K::stride_rows(source ? a.ldc : s.ldd),
         static_cast<T*>(a.d), K::stride_rows(s.ldd)},
        K::hardware(sm_count)};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = source ? 1.0f : 0.0f;
    fusion.bias_ptr = static_cast<const T*>(a.bias);
    return args;
  }
};

// -- vefa_backward ---------------------------------------------------------------
// g = acc. The tree stores d = g ⊙ s and, as side effects, writes per row tile
// Σ g and Σ g ⊙ x: x is the epilogue's source C (TMA-loaded like any source).
// The row reductions write one partial per CTA row tile (FinalReduction =
// false): no atomics, and the caller sums the partials in a fixed order.
namespace evt = cutlass::epilogue::fusion;

template <class A>
struct FirstOf {  // the tree's root: keeps d, the reductions' outputs only had side effects
  template <class... Rest>
  CUTLASS_HOST_DEVICE A operator()(A const& first, Rest const&...) const { return first; }
};

using ColumnSums = evt::Sm90RowReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float, float,
                                         kRound, Stride<_0, _1, int64_t>, 4, /*EnableNullptr=*/true,
                                         /*FinalReduction=*/false>;
using ScaleRow = evt::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 4>;

template <typename T>
using VefaBackwardTree = evt::Sm90EVT<
    evt::Sm90Compute<FirstOf, T, float, kRound>,
    evt::Sm90EVT<evt::Sm90Compute<cutlass::multiplies, float, float, kRound>, evt::Sm90AccFetch, ScaleRow>,
    evt::Sm90EVT<ColumnSums, evt::Sm90AccFetch>,
    evt::Sm90EVT<ColumnSums, evt::Sm90EVT<evt::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                                          evt::Sm90AccFetch, evt::Sm90SrcFetch<T>>>>;

template <typename T>
struct VefaBackward : Kernel<T, false, VefaBackwardTree<T>> {
  using K = Kernel<T, false, VefaBackwardTree<T>>;

  static typename K::Arguments arguments(const VefaBackwardArgs& a, int sm_count) {
    const GemmShape& s = a.shape;
    const Stride<_0, _1, int64_t> row{};
    typename K::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {static_cast<int>(s.m), static_cast<int>(s.n), static_cast<int>(s.k), 1},
        {static_cast<const T*>(a.a), K::stride_a(s), static_cast<const T*>(a.b), K::stride_b(s)},
        {{
             {{}, {a.col_scale, 0.0f, row}, {}},              // g ⊙ s
             {{}, {a.colsum, 0.0f, row}},                       // Σ g
             {{{}, {}, {}}, {a.colsum_x, 0.0f, row}},           // Σ g ⊙ x
             {}                                                 // FirstOf
         },
         static_cast<const T*>(a.x), K::stride_rows(a.ldx), static_cast<T*>(a.d), K::stride_rows(s.ldd)},
        K::hardware(sm_count)};
    return args;
  }
};

}  // namespace sm90
}  // namespace featadapt
