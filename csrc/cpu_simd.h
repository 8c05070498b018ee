// What the CPU kernels (cpu_*.cpp) share: float32 <-> bfloat16/float16
// conversions, vector types for AVX2 and AVX-512, and the choice between them.
//
// A kernel writes its loop once, in a header of its own, against
//   Vec, kWidth                 a float32 vector and its lane count;
//   load(const T*), store(T*, Vec) for T = float, c10::BFloat16: kWidth lanes
//                               as float32 and back (bfloat16 rounded to
//                               nearest even, NaN kept);
//   set1(float), fmadd(a, b, c) = a·b + c, add, mul;
// and includes that header once per instruction set, between the same
// FEATADAPT_SIMD_BEGIN_<ISA> and FEATADAPT_SIMD_END as the namespace it uses, so
// each copy is compiled for its instruction set whatever the build's flags.
// Which copy runs is decided per call: capability().
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FEATADAPT_X86_SIMD 1
#include <immintrin.h>
// Code between FEATADAPT_SIMD_BEGIN_<ISA> and FEATADAPT_SIMD_END is compiled
// for that instruction set.
#define FEATADAPT_SIMD_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define FEATADAPT_SIMD_BEGIN_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")
#define FEATADAPT_SIMD_END _Pragma("GCC pop_options")
#endif

#if defined(__GNUC__)
#define FEATADAPT_INLINE inline __attribute__((always_inline))
#else
#define FEATADAPT_INLINE inline
#endif

namespace featadapt {
namespace cpu {

// Scalar bfloat16 <-> float32 on the raw bits (c10::BFloat16's conversions do
// not vectorise), for the default loops and the columns a vector loop leaves.
FEATADAPT_INLINE float load_float(const c10::BFloat16& v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
FEATADAPT_INLINE float load_float(const float& v) { return v; }
FEATADAPT_INLINE float load_float(const c10::Half& v) { return static_cast<float>(v); }

FEATADAPT_INLINE void store_float(c10::BFloat16& out, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
  out.x = f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);  // NaN stays NaN
}
FEATADAPT_INLINE void store_float(float& out, float f) { out = f; }
FEATADAPT_INLINE void store_float(c10::Half& out, float f) { out = static_cast<c10::Half>(f); }

#ifdef FEATADAPT_X86_SIMD
FEATADAPT_SIMD_BEGIN_AVX2
namespace avx2 {
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void store(c10::BFloat16* p, Vec v) {
  // As store_float: add 0x7fff plus the lowest kept bit, keep the top half.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  // 32 -> 16 bits: packus works within 128-bit lanes; bring the two halves together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline Vec set1(float f) { return _mm256_set1_ps(f); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
}  // namespace avx2
FEATADAPT_SIMD_END

FEATADAPT_SIMD_BEGIN_AVX512
namespace avx512 {
using Vec = __m512;
constexpr int64_t kWidth = 16;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void store(c10::BFloat16* p, Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i top = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  top = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), top, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(top));
}
inline Vec set1(float f) { return _mm512_set1_ps(f); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
}  // namespace avx512
FEATADAPT_SIMD_END
#endif

// The instruction sets a kernel can use, widest last. FEATADAPT_CPU_CAPABILITY
// (default, avx2 or avx512) caps the choice, as ATEN_CPU_CAPABILITY does
// torch's, so that the tests run every loop this CPU has.
enum class Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kCapabilityNames[] = {"default", "avx2", "avx512"};

inline Capability best_capability() {
#ifdef FEATADAPT_X86_SIMD
  static const Capability best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Capability::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::kAvx2;
    return Capability::kDefault;
  }();
  return best;
#else
  return Capability::kDefault;
#endif
}

inline Capability capability() {
  const Capability best = best_capability();
  const char* requested = std::getenv("FEATADAPT_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') return best;
  for (int i = 0; i <= static_cast<int>(Capability::kAvx512); ++i) {
    if (std::strcmp(requested, kCapabilityNames[i]) == 0) return std::min(static_cast<Capability>(i), best);
  }
  STD_TORCH_CHECK(false, "FEATADAPT_CPU_CAPABILITY must be one of default, avx2, avx512, got '", requested, "'");
}

}  // namespace cpu
}  // namespace featadapt
