// The vector helpers of the CPU L2 attention kernels, for one instruction-set variant: `Vec`, a
// GCC/Clang vector as wide as the widest register the variant targets (64 bytes in the AVX-512
// variant, 32 in the AVX2 one, 16 in the baseline), its loads and stores (whole or the first k
// lanes), lane sums, 2^x and min, and `Heads`, the strided view of a (B*H, N, dim) operand that both
// kernels (l2_attention_cpu_tiled.h, l2_attention_cpu_blocked.h) read and write.
//
// The math these helpers serve: P_ij = 2^(t_ij log2(e) - lse2_i) with t_ij = -c |q_i - q_j|^2 <= 0
// (l2_attention_cpu_kernels.h states it in full); vexp2 is only ever called with x <= 0.
//
#pragma once  // included by l2_attention_cpu_kernels.h: once per translation unit, one variant each
#ifndef ACF_L2_NS
#error "l2_attention_cpu_vec.h is a part of l2_attention_cpu_kernels.h (which sets up the variant)"
#endif

namespace acf_l2_cpu {
namespace ACF_L2_NS {
namespace {

constexpr int kVecBytes = ACF_L2_VEC_BYTES;

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename Simd<T>::V;
template <typename T>
constexpr int64_t kLanes = kVecBytes / sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}
// The sum of the lanes of a Vec (a horizontal reduction: one AVX-512 instruction sequence).
#if ACF_L2_AVX512
inline float total(const Vec<float>& v) { return _mm512_reduce_add_ps(v); }
inline double total(const Vec<double>& v) { return _mm512_reduce_add_pd(v); }
#else
template <typename V>
inline auto total(const V& v) {
  std::remove_cv_t<std::remove_reference_t<decltype(v[0])>> s = 0;
  for (size_t l = 0; l < sizeof(V) / sizeof(s); ++l) s += v[l];
  return s;
}
#endif

// 2^x for float (Cephes' exp2f: x = n + f, |f| <= 1/2, a degree-6 polynomial for 2^f, relative
// error 1.7e-7, then 2^n), lane by lane on a Vec. Only ever called with x <= 0. With AVX-512, n is
// one rounding and 2^n one vscalefps (underflow goes smoothly to 0); otherwise x is clamped to
// >= -126 (2^-126 stands in for smaller values, which only multiply into sums >= 1) and 2^n is built
// in the exponent bits.
inline Vec<float> exp2_poly(Vec<float> f) {
  Vec<float> p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}
#if ACF_L2_AVX512
inline Vec<float> vexp2(Vec<float> x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_poly(x - n), n);
}
inline Vec<float> vmin(Vec<float> a, Vec<float> b) { return _mm512_min_ps(a, b); }  // b if either is NaN
#else
inline Vec<float> vexp2(Vec<float> x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  const Vec<float> shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec<float> n = (x + shifter) - shifter;
  const Simd<float>::I bits = (__builtin_convertvector(n, Simd<float>::I) + 127) << 23;
  return exp2_poly(x - n) * (Vec<float>)bits;
}
inline Vec<float> vmin(Vec<float> a, Vec<float> b) { return a < b ? a : b; }
#endif
inline Vec<double> vmin(Vec<double> a, Vec<double> b) { return a < b ? a : b; }
inline Vec<double> vexp2(Vec<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp2(x[l]);
  return x;
}

// The heads of a (B*H, N, dim) tensor of any strides.
template <typename T>
struct Heads {
  T* data;
  int64_t sh, sn, sd, dim;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<T>()), sh(t.stride(0)), sn(t.stride(1)), sd(t.stride(2)), dim(t.size(2)) {}
  T& at(int64_t h, int64_t i, int64_t k) const { return data[h * sh + i * sn + k * sd]; }
};

// f(j, k) over [0, n) in steps of one Vec: k = kLanes, or what is left at the end.
template <typename T, typename F>
inline void each_vec(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>) f(j, kLanes<T>);
  if (j < n) f(j, n - j);
}
// The first k entries at p, zeros after them (AVX-512: one masked load); store the first k lanes.
#if ACF_L2_AVX512
inline Vec<float> loadn(const float* p, int64_t k) { return _mm512_maskz_loadu_ps((__mmask16)((1u << k) - 1), p); }
inline Vec<double> loadn(const double* p, int64_t k) { return _mm512_maskz_loadu_pd((__mmask8)((1u << k) - 1), p); }
inline void storen(float* p, const Vec<float>& v, int64_t k) {
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << k) - 1), v);
}
inline void storen(double* p, const Vec<double>& v, int64_t k) {
  _mm512_mask_storeu_pd(p, (__mmask8)((1u << k) - 1), v);
}
#else
template <typename T>
inline Vec<T> loadn(const T* p, int64_t k) {
  if (k == kLanes<T>) return load(p);
  Vec<T> v{};
  std::memcpy(&v, p, k * sizeof(T));
  return v;
}
template <typename T>
inline void storen(T* p, const Vec<T>& v, int64_t k) {
  if (k == kLanes<T>)
    store(p, v);
  else
    std::memcpy(p, &v, k * sizeof(T));
}
#endif
// 1 in the first k lanes, 0 after them.
template <typename T>
inline Vec<T> first_lanes(int64_t k) {
  Vec<T> iota;
  for (int64_t l = 0; l < kLanes<T>; ++l) iota[l] = T(l);
  return iota < splat(T(k)) ? splat(T(1)) : splat(T(0));
}

}  // namespace
}  // namespace ACF_L2_NS
}  // namespace acf_l2_cpu
