// du = dy Cγ and dC = scaling · dyᵀ u for the low-rank backward, reading each
// tile of dy once for both (kernels.h, DyGradsArgs, describes the outputs).
//
// A block owns one TILE-wide column tile of dy, one chunk of rows and one
// slice of at most 64 ranks (more ranks: more slices, each reading dy again).
// Per TILE rows it stages the dy tile and the u tile in shared memory, writes
// dy_tile · Cγ_tile (its share of du) and adds dy_tileᵀ · u_tile into dC
// accumulators that live in registers for the whole chunk.
#include "tile.cuh"

namespace featadapt {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRankSlice = 64;

template <typename T> constexpr int kTile = kIsFloat32<T> ? 32 : 64;

template <typename T, int RP>  // RP: the rank slice, padded to 16, 32 or 64
__global__ void __launch_bounds__(kThreads) dy_grads_kernel(const DyGradsArgs args) {
  using M = Math<T>;
  using Acc = typename M::Acc;
  constexpr int TILE = kTile<T>;
  constexpr int LD_DY = TILE + kPad<T>, LD_R = RP + kPad<T>;
  constexpr int FC = RP / 16;                  // fragments along the rank
  constexpr int kFrags = (TILE / 16) * FC;     // of a TILE×RP output block
  constexpr int kPerWarp = (kFrags + kWarps - 1) / kWarps;

  __shared__ alignas(128) T dy_s[TILE * LD_DY];
  __shared__ alignas(128) T u_s[TILE * LD_R];
  __shared__ alignas(128) T c_s[TILE * LD_R];
  __shared__ alignas(128) float scratch[kWarps][256];

  const int warp = threadIdx.x / 32, r = lane_row(), c0 = lane_col0();
  const int64_t n_tile = blockIdx.x, n0 = n_tile * TILE;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * RP;  // first rank of this slice
  const int64_t width = min(static_cast<int64_t>(RP), args.rank - j0);
  const int64_t m_begin = blockIdx.y * args.chunk_rows;
  const int64_t m_end = min(args.rows, m_begin + args.chunk_rows);
  const bool want_du = args.du_part != nullptr, want_dc = args.dc_part != nullptr;
  float* s = scratch[warp];

  Operand u = args.u;
  u.data = static_cast<const T*>(u.data) + j0 * u.stride_red;
  // Bounded by the chunk's end, so no row is counted by two chunks.
  TileLoader<T, TILE, TILE, kThreads> load_dy(args.dy, m_end, args.cols);
  TileLoader<T, TILE, RP, kThreads> load_u(u, m_end, width);
  if (want_du) {
    Operand c = args.c;
    c.data = static_cast<const T*>(c.data) + j0 * c.stride_red;
    TileLoader<T, TILE, RP, kThreads> load_c(c, args.cols, width);
    load_c.fetch(n0, 0);
    load_c.store(c_s, LD_R);  // read after the loop's first __syncthreads
  }

  Acc dc[kPerWarp];
#pragma unroll
  for (int q = 0; q < kPerWarp; ++q) M::zero(dc[q]);

  for (int64_t m0 = m_begin; m0 < m_end; m0 += TILE) {
    load_dy.fetch(m0, n0);
    if (want_dc) load_u.fetch(m0, 0);
    __syncthreads();  // every warp is done with the previous tiles
    load_dy.store(dy_s, LD_DY);
    if (want_dc) load_u.store(u_s, LD_R);
    __syncthreads();

    if (want_du) {
      // du rows m0.. = dy_tile (TILE×TILE) · Cγ_tile (TILE×RP)
      for (int f = warp; f < kFrags; f += kWarps) {
        const int fr = f / FC, fc = f % FC;
        Acc acc;
        M::zero(acc);
#pragma unroll
        for (int kk = 0; kk < TILE; kk += 16) {
          typename M::template A<RowMajor> fa;
          typename M::template B<RowMajor> fb;
          M::load(fa, &dy_s[fr * 16 * LD_DY + kk], LD_DY);
          M::load(fb, &c_s[kk * LD_R + fc * 16], LD_R);
          M::mma(acc, fa, fb);
        }
        M::store(s, acc);
        __syncwarp();
        const int64_t m = m0 + fr * 16 + r;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t j = fc * 16 + c0 + e;
          if (m < m_end && j < width) args.du_part[(n_tile * args.rows + m) * args.rank + j0 + j] = s[r * 16 + c0 + e];
        }
        __syncwarp();
      }
    }
    if (want_dc) {
      // dC_tile (TILE×RP) += dy_tileᵀ · u_tile: dyᵀ is dy_s read column-major
#pragma unroll
      for (int q = 0; q < kPerWarp; ++q) {
        const int f = warp + q * kWarps;
        if (f >= kFrags) break;
        const int fr = f / FC, fc = f % FC;
#pragma unroll
        for (int kk = 0; kk < TILE; kk += 16) {
          typename M::template A<ColMajor> fa;
          typename M::template B<RowMajor> fb;
          M::load(fa, &dy_s[kk * LD_DY + fr * 16], LD_DY);
          M::load(fb, &u_s[kk * LD_R + fc * 16], LD_R);
          M::mma(dc[q], fa, fb);
        }
      }
    }
  }

  if (!want_dc) return;
#pragma unroll
  for (int q = 0; q < kPerWarp; ++q) {
    const int f = warp + q * kWarps;
    if (f >= kFrags) break;
    const int fr = f / FC, fc = f % FC;
    M::store(s, dc[q]);
    __syncwarp();
    const int64_t n = n0 + fr * 16 + r;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t j = fc * 16 + c0 + e;
      if (n < args.cols && j < width) {
        args.dc_part[(static_cast<int64_t>(blockIdx.y) * args.cols + n) * args.rank + j0 + j] =
            s[r * 16 + c0 + e] * args.scaling;
      }
    }
    __syncwarp();
  }
}

template <typename T, int RP>
void launch_slice(const DyGradsArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.cols + kTile<T> - 1) / kTile<T>),
                  static_cast<unsigned>((args.rows + args.chunk_rows - 1) / args.chunk_rows),
                  static_cast<unsigned>((args.rank + RP - 1) / RP));
  dy_grads_kernel<T, RP><<<grid, kThreads, 0, stream>>>(args);
}

template <typename T>
void launch_typed(const DyGradsArgs& args, cudaStream_t stream) {
  if (args.rank <= 16) {
    launch_slice<T, 16>(args, stream);
  } else if (args.rank <= 32) {
    launch_slice<T, 32>(args, stream);
  } else {
    launch_slice<T, kMaxRankSlice>(args, stream);
  }
}

}  // namespace

int dy_grads_tile(ScalarKind kind) { return kind == ScalarKind::Float32 ? kTile<float> : kTile<__half>; }

void launch_dy_grads(ScalarKind kind, const DyGradsArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.cols <= 0 || args.rank <= 0) return;
  switch (kind) {
    case ScalarKind::Float32: launch_typed<float>(args, stream); break;
    case ScalarKind::Float16: launch_typed<__half>(args, stream); break;
    case ScalarKind::BFloat16: launch_typed<__nv_bfloat16>(args, stream); break;
  }
}

}  // namespace featadapt
