// The featadapt::cuda_* ops: defined once here (TORCH_LIBRARY), implemented
// for CUDA tensors (TORCH_LIBRARY_IMPL) on top of the kernels in *.cu. Their
// signatures are the triton kernels' (featadapt/kernels/triton), so one set
// of autograd Functions drives either; featadapt/kernels/cuda.py registers
// their fake implementations for torch.compile.
//
// Each op checks its inputs with messages that name the argument, what was
// expected and what was given, allocates its outputs and launches.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

#include "kernels.h"

namespace featadapt {
namespace {

using at::Tensor;

ScalarKind scalar_kind(const char* op, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16 tensors, got ", t.scalar_type(),
                  " (float64 runs on backend='torch')");
  }
}

void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& like, int64_t size,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_size(const char* op, const char* name, int dim, const Tensor& t, int64_t expected, const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must be ", meaning, " = ", expected,
              ", got shape ", t.sizes());
}

// The first input must be a CUDA tensor of a supported dtype; the rest follow it.
ScalarKind check_first(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  return scalar_kind(op, t);
}

Operand rows_by_depth(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

// The kernels index the (N,) and (K,) vectors (bias, scale, shift) as
// contiguous: strided views are copied (a contiguous one is returned as is).
// The result must outlive the launch.
Tensor unit_stride(const std::optional<Tensor>& t) { return t ? t->contiguous() : Tensor(); }

template <typename T = void>
T* pointer(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}
Operand transposed(const Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }

// (c10's CUDA headers only: ATen's CUDA context pulls in the cuBLAS and
// cuSPARSE headers, which a minimal toolkit does not have.)
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The current device's SM count, asked once per device.
int num_sms() {
  static std::array<std::atomic<int>, 64> known{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= static_cast<int>(known.size())) device = static_cast<int>(known.size()) - 1;  // (never in practice)
  int count = known[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    known[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// (Both tile configurations are square, so block_rows is also the column tile.)
void check_grid(const char* op, int64_t rows, int64_t cols, int block_rows) {
  const int64_t tiles = ((rows + block_rows - 1) / block_rows) * ((cols + block_rows - 1) / block_rows);
  TORCH_CHECK(tiles < (int64_t{1} << 31), op, ": the output (", rows, ", ", cols, ") has too many tiles for one launch");
}

// Arguments for an (rows, cols) output of the fused GEMM, written to `out`
// when it is defined: the tile configuration and the output's place.
FusedGemmArgs output_args(const char* op, int64_t rows, int64_t cols, const Tensor& out) {
  FusedGemmArgs args;
  args.rows = rows;
  args.cols = cols;
  args.block_rows = fused_gemm_block_rows(rows, cols, num_sms());
  check_grid(op, rows, cols, args.block_rows);
  if (out.defined()) {
    args.out = out.data_ptr();
    args.out_stride_row = out.stride(0);
    args.out_stride_col = out.stride(1);
  }
  return args;
}

void launch(ScalarKind kind, const FusedGemmArgs& args) {
  launch_fused_gemm(kind, args, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = (x ⊙ scale + shift) weightᵀ + bias
Tensor scaled_gemm(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& scale,
                   const std::optional<Tensor>& shift) {
  const char* op = "featadapt::cuda_scaled_gemm";
  const ScalarKind kind = check_first(op, "x", x);
  check_matrix(op, "weight", weight, x, x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  check_size(op, "weight", 1, weight, k, "x.shape[1] (K)");
  if (bias) check_vector(op, "bias", *bias, x, n, x.scalar_type());
  check_vector(op, "scale", scale, x, k, at::kFloat);
  if (shift) check_vector(op, "shift", *shift, x, k, at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());

  Tensor y = at::empty({m, n}, x.options());
  FusedGemmArgs args = output_args(op, m, n, y);
  args.a = rows_by_depth(x);
  args.b = rows_by_depth(weight);
  args.depth = k;
  const Tensor scale_c = unit_stride(scale), shift_c = unit_stride(shift), bias_c = unit_stride(bias);
  args.a_scale = pointer<float>(scale_c);
  args.a_shift = pointer<float>(shift_c);
  args.bias = pointer(bias_c);
  launch(kind, args);
  return y;
}

// (dx, dscale, dshift): g = dy weight, dx = g ⊙ scale, dscale = Σ_m g ⊙ x,
// dshift = Σ_m g; each empty unless asked for; dscale and dshift are float32.
std::tuple<Tensor, Tensor, Tensor> scaled_gemm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                        const Tensor& scale, bool need_dx, bool need_dscale,
                                                        bool need_dshift) {
  const char* op = "featadapt::cuda_scaled_gemm_backward";
  const ScalarKind kind = check_first(op, "dy", dy);
  check_matrix(op, "x", x, dy, dy.scalar_type());
  check_matrix(op, "weight", weight, dy, dy.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  check_size(op, "weight", 1, weight, k, "x.shape[1] (K)");
  check_size(op, "dy", 0, dy, m, "x.shape[0] (M)");
  check_size(op, "dy", 1, dy, n, "weight.shape[0] (N)");
  check_vector(op, "scale", scale, dy, k, at::kFloat);
  const c10::cuda::CUDAGuard guard(dy.device());

  Tensor dx = at::empty(need_dx ? at::IntArrayRef{m, k} : at::IntArrayRef{0}, dy.options());
  FusedGemmArgs args = output_args(op, m, k, need_dx ? dx : Tensor());
  const int64_t row_tiles = (m + args.block_rows - 1) / args.block_rows;
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor dscale_part = at::empty(need_dscale ? at::IntArrayRef{row_tiles, k} : at::IntArrayRef{0}, f32);
  Tensor dshift_part = at::empty(need_dshift ? at::IntArrayRef{row_tiles, k} : at::IntArrayRef{0}, f32);
  if (need_dx || need_dscale || need_dshift) {
    args.a = rows_by_depth(dy);
    args.b = transposed(weight);
    args.depth = n;
    const Tensor scale_c = unit_stride(scale);
    args.col_scale = need_dx ? pointer<float>(scale_c) : nullptr;
    args.colsum_part = need_dshift ? dshift_part.data_ptr<float>() : nullptr;
    args.colsum_x_part = need_dscale ? dscale_part.data_ptr<float>() : nullptr;
    args.sum_x = rows_by_depth(x);
    launch(kind, args);
  }
  // A fixed-order sum over the row tiles: the same bits on every run.
  Tensor dscale = need_dscale ? dscale_part.sum(0) : dscale_part;
  Tensor dshift = need_dshift ? dshift_part.sum(0) : dshift_part;
  return {dx, dscale, dshift};
}

// y = x weightᵀ + u cᵀ + bias (c already carries γ)
Tensor low_rank_gemm(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& u,
                     const Tensor& c) {
  const char* op = "featadapt::cuda_low_rank_gemm";
  const ScalarKind kind = check_first(op, "x", x);
  check_matrix(op, "weight", weight, x, x.scalar_type());
  check_matrix(op, "u", u, x, x.scalar_type());
  check_matrix(op, "c", c, x, x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), r = u.size(1);
  check_size(op, "weight", 1, weight, k, "x.shape[1] (K)");
  check_size(op, "u", 0, u, m, "x.shape[0] (M)");
  check_size(op, "c", 0, c, n, "weight.shape[0] (N)");
  check_size(op, "c", 1, c, r, "u.shape[1] (r)");
  if (bias) check_vector(op, "bias", *bias, x, n, x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());

  Tensor y = at::empty({m, n}, x.options());
  FusedGemmArgs args = output_args(op, m, n, y);
  args.a = rows_by_depth(x);
  args.b = rows_by_depth(weight);
  args.depth = k;
  args.a2 = rows_by_depth(u);
  args.b2 = rows_by_depth(c);
  args.rank = r;
  const Tensor bias_c = unit_stride(bias);
  args.bias = pointer(bias_c);
  launch(kind, args);
  return y;
}

// dx = dy weight + (du a) ⊙ keep · keep_scale (without keep: dy weight + du a)
Tensor low_rank_gemm_dx(const Tensor& dy, const Tensor& weight, const Tensor& du, const Tensor& a,
                        const std::optional<Tensor>& keep, double keep_scale) {
  const char* op = "featadapt::cuda_low_rank_gemm_dx";
  const ScalarKind kind = check_first(op, "dy", dy);
  check_matrix(op, "weight", weight, dy, dy.scalar_type());
  check_matrix(op, "du", du, dy, dy.scalar_type());
  check_matrix(op, "a", a, dy, dy.scalar_type());
  const int64_t m = dy.size(0), n = weight.size(0), k = weight.size(1), r = a.size(0);
  check_size(op, "dy", 1, dy, n, "weight.shape[0] (N)");
  check_size(op, "du", 0, du, m, "dy.shape[0] (M)");
  check_size(op, "du", 1, du, r, "a.shape[0] (r)");
  check_size(op, "a", 1, a, k, "weight.shape[1] (K)");
  if (keep) {
    check_matrix(op, "keep", *keep, dy, at::kBool);
    check_size(op, "keep", 0, *keep, m, "dy.shape[0] (M)");
    check_size(op, "keep", 1, *keep, k, "weight.shape[1] (K)");
  }
  const c10::cuda::CUDAGuard guard(dy.device());

  Tensor dx = at::empty({m, k}, dy.options());
  FusedGemmArgs args = output_args(op, m, k, dx);
  args.a = rows_by_depth(dy);
  args.b = transposed(weight);
  args.depth = n;
  args.a2 = rows_by_depth(du);
  args.b2 = transposed(a);
  args.rank = r;
  if (keep) {
    args.keep = keep->data_ptr<bool>();
    args.keep_stride_row = keep->stride(0);
    args.keep_stride_col = keep->stride(1);
    args.keep_scale = static_cast<float>(keep_scale);
  }
  launch(kind, args);
  return dx;
}

// (du, dc) = (dy c, scaling · dyᵀ u), reading dy once; both float32, each empty unless asked for.
std::tuple<Tensor, Tensor> low_rank_dy_grads(const Tensor& dy, const Tensor& u, const Tensor& c, double scaling,
                                             bool need_du, bool need_dc) {
  const char* op = "featadapt::cuda_low_rank_dy_grads";
  const ScalarKind kind = check_first(op, "dy", dy);
  check_matrix(op, "u", u, dy, dy.scalar_type());
  const int64_t m = dy.size(0), n = dy.size(1), r = u.size(1);
  check_size(op, "u", 0, u, m, "dy.shape[0] (M)");
  if (need_du) {
    check_matrix(op, "c", c, dy, dy.scalar_type());
    check_size(op, "c", 0, c, n, "dy.shape[1] (N)");
    check_size(op, "c", 1, c, r, "u.shape[1] (r)");
  }
  const c10::cuda::CUDAGuard guard(dy.device());

  // A few programs per SM: split M when the column tiles alone are too few.
  const int64_t tile = dy_grads_tile(kind);
  const int64_t col_tiles = (n + tile - 1) / tile;
  const int64_t wanted = std::max<int64_t>((4 * num_sms() + col_tiles - 1) / std::max<int64_t>(col_tiles, 1), 1);
  const int64_t chunk = std::max<int64_t>(((m + wanted - 1) / wanted + tile - 1) / tile, 1) * tile;
  const int64_t chunks = (m + chunk - 1) / chunk;
  TORCH_CHECK(col_tiles < (int64_t{1} << 31), op, ": dy has too many columns for one launch: ", n);
  TORCH_CHECK(chunks <= 65535 && (r + 63) / 64 <= 65535, op, ": rank ", r, " is too large for one launch");

  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor du_part = at::empty(need_du ? at::IntArrayRef{col_tiles, m, r} : at::IntArrayRef{0}, f32);
  Tensor dc_part = at::empty(need_dc ? at::IntArrayRef{chunks, n, r} : at::IntArrayRef{0}, f32);
  if (m * n * r > 0 && (need_du || need_dc)) {
    DyGradsArgs args;
    args.rows = m;
    args.cols = n;
    args.rank = r;
    args.dy = rows_by_depth(dy);
    args.u = rows_by_depth(u);
    args.c = need_du ? rows_by_depth(c) : Operand{};
    args.scaling = static_cast<float>(scaling);
    args.chunk_rows = chunk;
    args.du_part = need_du ? du_part.data_ptr<float>() : nullptr;
    args.dc_part = need_dc ? dc_part.data_ptr<float>() : nullptr;
    launch_dy_grads(kind, args, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Fixed-order sums over the column tiles and the row chunks: the same bits on every run.
  // (With no column tiles or no chunks the sums are the zeros they should be.)
  Tensor du = need_du ? du_part.sum(0) : du_part;
  Tensor dc = need_dc ? dc_part.sum(0) : dc_part;
  return {du, dc};
}

}  // namespace
}  // namespace featadapt

TORCH_LIBRARY(featadapt, m) {
  m.def("cuda_scaled_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor? shift) -> Tensor");
  m.def(
      "cuda_scaled_gemm_backward(Tensor dy, Tensor x, Tensor weight, Tensor scale, bool need_dx, "
      "bool need_dscale, bool need_dshift) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_low_rank_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor u, Tensor c) -> Tensor");
  m.def(
      "cuda_low_rank_gemm_dx(Tensor dy, Tensor weight, Tensor du, Tensor a, Tensor? keep, float keep_scale) "
      "-> Tensor");
  m.def(
      "cuda_low_rank_dy_grads(Tensor dy, Tensor u, Tensor c, float scaling, bool need_du, bool need_dc) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(featadapt, CUDA, m) {
  m.impl("cuda_scaled_gemm", &featadapt::scaled_gemm);
  m.impl("cuda_scaled_gemm_backward", &featadapt::scaled_gemm_backward);
  m.impl("cuda_low_rank_gemm", &featadapt::low_rank_gemm);
  m.impl("cuda_low_rank_gemm_dx", &featadapt::low_rank_gemm_dx);
  m.impl("cuda_low_rank_dy_grads", &featadapt::low_rank_dy_grads);
}

// `import featadapt._C` loads this library, which registers the ops above (and,
// from cpu_*.cpp, the CPU ops); the module itself carries what Python reads
// of the build: its CUDA architectures and the CPU kernels' capability and threads.
// FEATADAPT_CUDA_ARCH_LIST (set by setup.py, e.g. 80,90) is the list of
// compute capabilities the kernels were compiled for.
#ifndef FEATADAPT_CUDA_ARCH_LIST
#define FEATADAPT_CUDA_ARCH_LIST
#endif

// _C.cpu_capability(): the instruction set the CPU kernels use in this call's
// environment (cpu_simd.h), so that tests and `featadapt.info` can say which.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(featadapt::cpu::kCapabilityNames[static_cast<int>(featadapt::cpu::capability())]);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

// _C.parallel_threads(): how many threads at::parallel_for runs here, as the
// CPU kernels use it. Without OpenMP at build time it is a serial loop (1), a
// regression no result would show, so the tests check this.
static PyObject* parallel_threads(PyObject*, PyObject*) {
  const int64_t tasks = at::get_num_threads();
  std::vector<std::atomic<int>> seen(static_cast<size_t>(tasks));
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen[at::get_thread_num() % tasks].store(1); });
  long used = 0;
  for (const auto& s : seen) used += s.load();
  return PyLong_FromLong(used);
}

static PyMethodDef featadapt_c_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set featadapt's CPU kernels use here: default, avx2 or avx512."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "How many threads at::parallel_for runs in featadapt's CPU kernels (torch.get_num_threads() when built with OpenMP)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef featadapt_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "featadapt's kernels: importing this registers the featadapt::cuda_* and CPU ops.", -1,
    featadapt_c_methods};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&featadapt_c_module);
  if (module == nullptr) return nullptr;
  const int archs[] = {0, FEATADAPT_CUDA_ARCH_LIST};
  const size_t count = sizeof(archs) / sizeof(archs[0]) - 1;
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(count));
  if (tuple == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  for (size_t i = 0; i < count; ++i) PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), PyLong_FromLong(archs[i + 1]));
  if (PyModule_AddObject(module, "cuda_archs", tuple) < 0) {
    Py_DECREF(tuple);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
