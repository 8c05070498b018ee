// What the op layer uses of PyTorch's stable ABI (torch/csrc/stable and
// torch/headeronly): tensors, errors, and a call into the dispatcher for the
// aten ops the stable headers do not wrap. setup.py compiles against
// TORCH_TARGET_VERSION 2.10, so the library loads under every torch since.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <string>

namespace featadapt {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// "(3, 4)": a tensor's shape (or strides) for error messages.
template <typename Dim>
std::string dims_of(const Tensor& t, Dim dim) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << dim(d);
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string shape_of(const Tensor& t) { return dims_of(t, [&](int64_t d) { return t.size(d); }); }
inline std::string strides_of(const Tensor& t) { return dims_of(t, [&](int64_t d) { return t.stride(d); }); }

inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// aten::<op>.<overload>(args...) through the dispatcher; its first output.
template <typename... Args>
Tensor aten(const char* op, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// a · b with a float32 result from 16-bit inputs (cuBLAS accumulates in float32 either way).
inline Tensor mm_float(const Tensor& a, const Tensor& b) { return aten("aten::mm", "dtype", a, b, ScalarType::Float); }

inline Tensor transposed(const Tensor& t) { return torch::stable::transpose(t, 0, 1); }

}  // namespace featadapt
