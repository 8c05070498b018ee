// The fused GEMM behind both kernel families (DESIGN.md §1): the VeFA
// forward and backward and the low-rank forward and dx are all one tiled
// GEMM with optional parts (kernels.h, FusedGemmArgs, says which is which):
//
//   prologue   the VeFA scale and shift, applied to each tile of a as it loads
//   second     a short product a2 b2ᵀ over the rank, in the same accumulators
//              (under dropout, multiplied by the keep mask before the main loop
//              adds to it, so no second set of accumulators is needed)
//   epilogue   bias, a per-column scale, and per-row-tile column sums of g and
//              g ⊙ x (the VeFA parameter gradients; fixed order, no atomics)
//
// A block computes a BM×BN output tile with WARPS_M×WARPS_N warps, each
// owning a (BM/WARPS_M)×(BN/WARPS_N) block of 16×16 accumulators; the depth
// advances BK at a time, the next tile loading into registers while the
// current one is multiplied out of shared memory.
#include "tile.cuh"

namespace featadapt {
namespace {

constexpr int kGroupRows = 8;  // row tiles visited together, so b's tiles are reused from L2

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int BM_, int BN_, int WARPS_M, int WARPS_N>
struct Config {
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int BK = kIsFloat32<T> ? 16 : 32;
  static constexpr int LD = BK + kPad<T>;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // a warp's share of the tile
  static constexpr int FM = WM / 16, FN = WN / 16;             // ... in 16×16 fragments
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are whole fragments");

  using M = Math<T>;
  using Acc = typename M::Acc;

  struct Shared {
    alignas(128) T a[BM * LD];
    alignas(128) T b[BN * LD];
    alignas(128) float scratch[kWarps][2][256];  // per warp: two 16×16 float tiles
    float colsum[2][WARPS_M][BN];                // per warp row: Σ g and Σ g ⊙ x
  };

  // Where this block's tile is and which warp this thread belongs to.
  struct Place {
    int64_t tile_m, m0, n0;
    int warp, wm, wn;
  };
};

// acc += a' bᵀ over `depth` for the block's tile.
template <typename C, typename T>
__device__ void accumulate(typename C::Shared& smem, typename C::Acc (&acc)[C::FM][C::FN], const typename C::Place& at,
                           const Operand& a, const Operand& b, int64_t rows, int64_t cols, int64_t depth,
                           const float* scale, const float* shift) {
  using M = typename C::M;
  TileLoader<T, C::BM, C::BK, C::kThreads> load_a(a, rows, depth, scale, shift);
  TileLoader<T, C::BN, C::BK, C::kThreads> load_b(b, cols, depth);
  if (depth <= 0) return;
  load_a.fetch(at.m0, 0);
  load_b.fetch(at.n0, 0);
  for (int64_t k0 = 0; k0 < depth; k0 += C::BK) {
    __syncthreads();  // every warp is done with the previous tile
    load_a.store(smem.a, C::LD);
    load_b.store(smem.b, C::LD);
    __syncthreads();
    if (k0 + C::BK < depth) {
      load_a.fetch(at.m0, k0 + C::BK);
      load_b.fetch(at.n0, k0 + C::BK);
    }
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      typename M::template A<RowMajor> fa[C::FM];
      typename M::template B<ColMajor> fb[C::FN];
#pragma unroll
      for (int i = 0; i < C::FM; ++i) M::load(fa[i], &smem.a[(at.wm * C::WM + i * 16) * C::LD + kk], C::LD);
#pragma unroll
      for (int j = 0; j < C::FN; ++j) M::load(fb[j], &smem.b[(at.wn * C::WN + j * 16) * C::LD + kk], C::LD);
#pragma unroll
      for (int i = 0; i < C::FM; ++i)
#pragma unroll
        for (int j = 0; j < C::FN; ++j) M::mma(acc[i][j], fa[i], fb[j]);
    }
  }
}

// acc ⊙= keep · keep_scale, element by element, through the warp's scratch tile.
template <typename C>
__device__ void apply_keep_mask(typename C::Shared& smem, typename C::Acc (&acc)[C::FM][C::FN],
                                const typename C::Place& at, const FusedGemmArgs& args) {
  using M = typename C::M;
  float* s = smem.scratch[at.warp][0];
  const int r = lane_row(), c0 = lane_col0();
#pragma unroll
  for (int i = 0; i < C::FM; ++i) {
#pragma unroll
    for (int j = 0; j < C::FN; ++j) {
      M::store(s, acc[i][j]);
      __syncwarp();
      const int64_t m = at.m0 + at.wm * C::WM + i * 16 + r;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t n = at.n0 + at.wn * C::WN + j * 16 + c0 + e;
        const bool inside = m < args.rows && n < args.cols;
        s[r * 16 + c0 + e] *=
            inside && args.keep[m * args.keep_stride_row + n * args.keep_stride_col] ? args.keep_scale : 0.0f;
      }
      __syncwarp();
      M::load_acc(acc[i][j], s);
      __syncwarp();
    }
  }
}

template <typename C, typename T>
__device__ void epilogue(typename C::Shared& smem, typename C::Acc (&acc)[C::FM][C::FN], const typename C::Place& at,
                         const FusedGemmArgs& args) {
  using M = typename C::M;
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  const T* x = static_cast<const T*>(args.sum_x.data);
  const bool sums = args.colsum_part != nullptr || args.colsum_x_part != nullptr;
  float* s = smem.scratch[at.warp][0];
  float* sx = smem.scratch[at.warp][1];
  const int lane = threadIdx.x & 31, r = lane_row(), c0 = lane_col0();

  float sum_g[C::FN], sum_gx[C::FN];  // column sums over this warp's rows (lanes 0..15: one column each)
#pragma unroll
  for (int j = 0; j < C::FN; ++j) sum_g[j] = sum_gx[j] = 0.0f;

#pragma unroll
  for (int i = 0; i < C::FM; ++i) {
#pragma unroll
    for (int j = 0; j < C::FN; ++j) {
      M::store(s, acc[i][j]);
      __syncwarp();
      const int64_t m = at.m0 + at.wm * C::WM + i * 16 + r;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int c = c0 + e;
        const int64_t n = at.n0 + at.wn * C::WN + j * 16 + c;
        const bool inside = m < args.rows && n < args.cols;
        const float g = s[r * 16 + c];
        if (inside && out != nullptr) {
          float v = g;
          if (bias != nullptr) v += to_float(bias[n]);
          if (args.col_scale != nullptr) v *= args.col_scale[n];
          out[m * args.out_stride_row + n * args.out_stride_col] = from_float<T>(v);
        }
        if (sums) {
          s[r * 16 + c] = inside ? g : 0.0f;
          sx[r * 16 + c] =
              inside && x != nullptr ? g * to_float(x[m * args.sum_x.stride_row + n * args.sum_x.stride_red]) : 0.0f;
        }
      }
      __syncwarp();
      if (sums && lane < 16) {
#pragma unroll
        for (int rr = 0; rr < 16; ++rr) {
          sum_g[j] += s[rr * 16 + lane];
          sum_gx[j] += sx[rr * 16 + lane];
        }
      }
      __syncwarp();
    }
  }
  if (!sums) return;  // uniform across the block

  if (lane < 16) {
#pragma unroll
    for (int j = 0; j < C::FN; ++j) {
      smem.colsum[0][at.wm][at.wn * C::WN + j * 16 + lane] = sum_g[j];
      smem.colsum[1][at.wm][at.wn * C::WN + j * 16 + lane] = sum_gx[j];
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < C::BN; t += C::kThreads) {
    const int64_t n = at.n0 + t;
    if (n >= args.cols) continue;
    float g = 0.0f, gx = 0.0f;
#pragma unroll
    for (int w = 0; w < C::BM / C::WM; ++w) {  // warp rows in order: the same bits every run
      g += smem.colsum[0][w][t];
      gx += smem.colsum[1][w][t];
    }
    if (args.colsum_part != nullptr) args.colsum_part[at.tile_m * args.cols + n] = g;
    if (args.colsum_x_part != nullptr) args.colsum_x_part[at.tile_m * args.cols + n] = gx;
  }
}

template <typename C, typename T>
__global__ void __launch_bounds__(C::kThreads) fused_gemm_kernel(const FusedGemmArgs args) {
  __shared__ typename C::Shared smem;

  // Output tiles in groups of kGroupRows row tiles, column by column.
  const int64_t tiles_m = ceil_div(args.rows, C::BM), tiles_n = ceil_div(args.cols, C::BN);
  const int64_t pid = blockIdx.x;
  const int64_t per_group = kGroupRows * tiles_n;
  const int64_t first_m = (pid / per_group) * kGroupRows;
  const int64_t group_size = min(tiles_m - first_m, static_cast<int64_t>(kGroupRows));
  typename C::Place at;
  at.tile_m = first_m + (pid % per_group) % group_size;
  at.m0 = at.tile_m * C::BM;
  at.n0 = ((pid % per_group) / group_size) * C::BN;
  at.warp = threadIdx.x / 32;
  at.wm = at.warp / (C::BN / C::WN);
  at.wn = at.warp % (C::BN / C::WN);

  typename C::Acc acc[C::FM][C::FN];
#pragma unroll
  for (int i = 0; i < C::FM; ++i)
#pragma unroll
    for (int j = 0; j < C::FN; ++j) C::M::zero(acc[i][j]);

  if (args.rank > 0) {
    accumulate<C, T>(smem, acc, at, args.a2, args.b2, args.rows, args.cols, args.rank, nullptr, nullptr);
    if (args.keep != nullptr) apply_keep_mask<C>(smem, acc, at, args);
  }
  accumulate<C, T>(smem, acc, at, args.a, args.b, args.rows, args.cols, args.depth, args.a_scale, args.a_shift);
  epilogue<C, T>(smem, acc, at, args);
}

// Large tiles for large problems; small ones when the large grid would not fill the GPU.
constexpr int kLargeRows = 128;
constexpr int kSmallRows = 64;

template <typename T>
void launch_typed(const FusedGemmArgs& args, cudaStream_t stream) {
  if (args.block_rows == kLargeRows) {
    using C = Config<T, kLargeRows, 128, 2, 4>;
    const int64_t tiles = ceil_div(args.rows, C::BM) * ceil_div(args.cols, C::BN);
    fused_gemm_kernel<C, T><<<static_cast<unsigned>(tiles), C::kThreads, 0, stream>>>(args);
  } else {
    using C = Config<T, kSmallRows, 64, 2, 2>;
    const int64_t tiles = ceil_div(args.rows, C::BM) * ceil_div(args.cols, C::BN);
    fused_gemm_kernel<C, T><<<static_cast<unsigned>(tiles), C::kThreads, 0, stream>>>(args);
  }
}

}  // namespace

int fused_gemm_block_rows(int64_t rows, int64_t cols, int num_sms) {
  const int64_t large_tiles = ceil_div(rows, kLargeRows) * ceil_div(cols, 128);
  return large_tiles >= num_sms ? kLargeRows : kSmallRows;
}

void launch_fused_gemm(ScalarKind kind, const FusedGemmArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.cols <= 0) return;
  switch (kind) {
    case ScalarKind::Float32: launch_typed<float>(args, stream); break;
    case ScalarKind::Float16: launch_typed<__half>(args, stream); break;
    case ScalarKind::BFloat16: launch_typed<__nv_bfloat16>(args, stream); break;
  }
}

}  // namespace featadapt
