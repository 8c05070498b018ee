// The vectorised row loop of featadapt::vefa_input_grads_cpu (cpu_vefa.cpp).
//
// cpu_vefa.cpp includes this file once per instruction set, in a namespace
// that sees that instruction set's vector functions (cpu_simd.h); the scalar
// vefa_row (cpu_vefa.cpp) does the columns a whole vector does not cover.
// (Sharing each load and store of ds among four rows measured no faster: the
// pass is bound by memory, not by these L1 accesses.)

// Rows [0, rows) of g (row stride gs) and x (row stride xs), K = k:
// dx = g ⊙ s over g, ds += g ⊙ x and (with dt) dt += g.
template <typename T, bool kShift>
void rows_of(T* g, int64_t gs, const T* x, int64_t xs, const float* s, int64_t k, int64_t rows, float* ds,
             float* dt) {
  const int64_t k_vec = k - k % kWidth;
  for (int64_t m = 0; m < rows; ++m) {
    T* g_m = g + m * gs;
    const T* x_m = x + m * xs;
    for (int64_t j = 0; j < k_vec; j += kWidth) {
      const Vec a = load(g_m + j);
      store(ds + j, fmadd(a, load(x_m + j), load(ds + j)));
      if (kShift) store(dt + j, add(load(dt + j), a));
      store(g_m + j, mul(a, load(s + j)));
    }
    vefa_row<T, kShift>(g_m + k_vec, x_m + k_vec, s + k_vec, k - k_vec, ds + k_vec, kShift ? dt + k_vec : dt);
  }
}

template <typename T>
void rows(T* g, int64_t gs, const T* x, int64_t xs, const float* s, int64_t k, int64_t rows, float* ds, float* dt) {
  if (dt != nullptr) {
    rows_of<T, true>(g, gs, x, xs, s, k, rows, ds, dt);
  } else {
    rows_of<T, false>(g, gs, x, xs, s, k, rows, ds, dt);
  }
}
