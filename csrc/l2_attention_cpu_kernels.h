// L2 self-attention with keys tied to queries on CPU: forward, VJP and double VJP, fused per row block.
// The kernels of one instruction-set variant (see the end of this comment).
//
// The math (paper eq. 9-10; one batch element and head; c = scale; Q: N x d, V: N x e):
//
//     t_ij = -c |q_i - q_j|^2 = c (2 q_i.q_j - |q_i|^2 - |q_j|^2) <= 0     P = softmax_rows(t)     O = P V
//
// t_ii = 0 is the row maximum, so exp(t_ij) never overflows and every row sum is >= 1: the softmax
// needs no max pass (t is clamped at 0 from above, the side of the exact value). The exponentials
// are base 2 (2^(t log2 e)). The forward saves lse2_i = log2 sum_j exp(t_ij) and nothing of size
// N x N; the backward passes recompute P_ij = 2^(t_ij log2 e - lse2_i) row block by row block, in
// cache (flash-attention's trade, also the right one on a CPU: reading a saved P back from memory
// costs more than the Gram entry and the exponential, and writing it costs B H N^2 of page faults).
//
// First order, given G = dL/dO:
//
//     dP = G V^T   delta_i = g_i.o_i   dS = P o (dP - delta)   dV = P^T G
//     dQ = 2c [dS Q + dS^T Q - diag(r + k) Q]   r, k: row and column sums of dS
//
// (r = 0 in exact arithmetic; subtracting it is the difference form sum_j dS_kj (q_j - q_k),
// which keeps the error low where softmax saturates.) Second order: for cotangents (U, W) of
// (dQ, dV) the double backward returns the tangents of (dQ, dV, O) in the direction (U, W):
//
//     t'_ij = -2c (q_i - q_j).(u_i - u_j)   mu_i = sum_j P_ij t'_ij   P' = P o (t' - mu)
//     O' = P' V + P W                      dP' = G W^T   delta'_i = g_i.O'_i
//     dS' = P' o (dP - delta) + P o (dP' - delta')
//     gV = P'^T G    gQ = 2c [dS' Q + dS'^T Q - diag(r' + k') Q + dS U + dS^T U - diag(r + k) U]
//     gG = O'
//
// Layout of the register-tiled kernels. Each head's (N x dim) operands are first copied, transposed,
// into "panels" (dim x ld, ld = N rounded up to 16, zero-padded): a column j of Q is then a run of
// contiguous floats, so every inner loop runs over j in whole vectors. Rows are processed R = 8 at a
// time: the R x 16 tile of each product (q_i.q_j, g_i.v_j, ...) is accumulated in registers over the
// head dim, turned into P, dS, ... on the spot, and the column sums (dV, the key role of dQ) are
// updated once per R rows;
// the query role (dS Q) is a second, row-wise pass over the R rows of dS kept in L1. A row of ones
// stored after Q^T (it is also the mask of the padded columns, where P = 0) makes the same products
// return the row and column sums r and k. Heads run in parallel (at::parallel_for); the panels and
// row buffers of a head (tens of KiB at N = 196, d = 8) stay in L1/L2. Inputs may have any strides
// (the layer passes column-major heads, which load with unit stride); outputs take the layout of the
// input they match (empty_like). A tile row is a GCC/Clang vector (`Vec`) as wide as the widest
// register the variant targets (64 bytes in the AVX-512 variant, 32 in the AVX2 one, 16 in the
// baseline), which keeps the tiles in registers.
//
// This file is the one copy of the kernels: each csrc/l2_attention_cpu_<variant>.cpp includes it
// once, for one instruction set, into namespace acf_l2_cpu::<variant> (l2_attention_cpu.h says
// which, and l2_attention_cpu.cpp picks one at run time). The including file defines
// ACF_L2_VARIANT_AVX512 or ACF_L2_VARIANT_AVX2 (their code is compiled under `#pragma GCC target`,
// pushed after the library headers so that no inline function of torch or the standard library
// is compiled for a wider instruction set than the rest of the extension), or neither (the
// baseline: the build's own flags).
//
// Two sets of kernels share that math and layout of the inputs. The register-tiled ones (below) pay
// off while the head dim is small (products with an inner dimension of 8-16 leave BLAS idle); the
// blocked ones (after them) make every product a batched BLAS GEMM and fuse the elementwise steps
// around it, which wins from head dim 32 up (l2_attention_cpu.cpp picks by head dim;
// python bench/bench_l2_attention.py --crossover measures both against the reference).
#pragma once  // once per translation unit: one variant each

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__amd64__)
#include <immintrin.h>  // usable under a target pragma whatever the command-line flags
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "l2_attention_cpu.h"

// The variant: its namespace, its vector width in bytes, whether it has AVX-512, its target.
#if defined(ACF_L2_VARIANT_AVX512) || defined(ACF_L2_VARIANT_AVX2)
#if !ACF_L2_X86_VARIANTS
#error "the AVX2 / AVX-512 variants are built for x86-64 only, and not with ACF_NATIVE_BUILD"
#endif
#endif
#if defined(ACF_L2_VARIANT_AVX512)
#define ACF_L2_NS avx512
#define ACF_L2_VEC_BYTES 64
#define ACF_L2_AVX512 1
#define ACF_L2_TARGET ACF_L2_AVX512_TARGET
#elif defined(ACF_L2_VARIANT_AVX2)
#define ACF_L2_NS avx2
#define ACF_L2_VEC_BYTES 32
#define ACF_L2_AVX512 0
#define ACF_L2_TARGET ACF_L2_AVX2_TARGET
#else  // the baseline: as wide as the build's flags (-march=native with ACF_NATIVE=1) allow
#define ACF_L2_NS baseline
#if defined(__AVX512F__)
#define ACF_L2_VEC_BYTES 64
#define ACF_L2_AVX512 1
#elif defined(__AVX__)
#define ACF_L2_VEC_BYTES 32
#define ACF_L2_AVX512 0
#else
#define ACF_L2_VEC_BYTES 16
#define ACF_L2_AVX512 0
#endif
#endif

#if defined(ACF_L2_TARGET)  // every function defined from here on is compiled for the variant
#define ACF_L2_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define ACF_L2_TARGET_PUSH(t) ACF_L2_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define ACF_L2_TARGET_POP ACF_L2_PRAGMA(clang attribute pop)
#else
#define ACF_L2_TARGET_PUSH(t) ACF_L2_PRAGMA(GCC push_options) ACF_L2_PRAGMA(GCC target(t))
#define ACF_L2_TARGET_POP ACF_L2_PRAGMA(GCC pop_options)
#endif
ACF_L2_TARGET_PUSH(ACF_L2_TARGET)
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the deliberately undefined vectors of _mm512_reduce_add_ps/pd (`__Y = __Y` in
// _mm256_undefined_pd) as maybe-uninitialised once they are inlined under a target pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace acf_l2_cpu {
namespace ACF_L2_NS {
namespace {

constexpr int R = 8;            // rows per block
constexpr int64_t ALIGN = 16;   // ld is a multiple of this (the lanes of the widest Vec)

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
using Tile = Vec<T>[R];  // R rows x kLanes<T> columns

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

// panel[k * ld + j] = x_jk for j < n, 0 for n <= j < ld
template <typename T>
void load_panel(const Heads<T>& x, int64_t h, int64_t n, int64_t ld, T* panel) {
  for (int64_t k = 0; k < x.dim; ++k) {
    T* row = panel + k * ld;
    for (int64_t j = 0; j < n; ++j) row[j] = x.at(h, j, k);
    std::fill(row + n, row + ld, T(0));
  }
}

// out_jk = a * (m[k * ld + j] - x[j] y[k * ld + j] - x2[j] y2[k * ld + j]) (each term if given)
template <typename T>
void store_panel(const T* m, const T* x, const T* y, const T* x2, const T* y2, T a, int64_t n, int64_t ld,
                 const Heads<T>& out, int64_t h) {
  for (int64_t k = 0; k < out.dim; ++k)
    for (int64_t j = 0; j < n; ++j) {
      T val = m[k * ld + j];
      if (x) val -= x[j] * y[k * ld + j];
      if (x2) val -= x2[j] * y2[k * ld + j];
      out.at(h, j, k) = a * val;
    }
}

// out_j = sum_k a[k * ld + j] b[k * ld + j]: the row-wise dot products of two panels
template <typename T>
void column_dots(const T* a, const T* b, int64_t dim, int64_t ld, T* out) {
  std::fill(out, out + ld, T(0));
  for (int64_t k = 0; k < dim; ++k)
    for (int64_t j = 0; j < ld; j += kLanes<T>)
      store(out + j, load(out + j) + load(a + k * ld + j) * load(b + k * ld + j));
}

template <int NR, typename V>
inline void zero(V (&t)[R]) {
  for (int r = 0; r < NR; ++r) t[r] = V{};
}

template <int NR, typename T>
inline void load_tile(const T* rows, int64_t ld, int64_t j0, Tile<T>& t) {
  for (int r = 0; r < NR; ++r) t[r] = load(rows + r * ld + j0);
}

template <int NR, typename T>
inline void store_tile(const Tile<T>& t, T* rows, int64_t ld, int64_t j0) {
  for (int r = 0; r < NR; ++r) store(rows + r * ld + j0, t[r]);
}

// acc[r] = (sum_k A_{i0 + r, k} B_{j, k})_{j0 <= j < j0 + lanes}, with A and B given as panels
template <int NR, typename T>
inline void tile_product(const T* a, const T* b, int64_t dim, int64_t ld, int64_t i0, int64_t j0, Tile<T>& acc) {
  zero<NR>(acc);
  for (int64_t k = 0; k < dim; ++k) {
    const Vec<T> bk = load(b + k * ld + j0);
    for (int r = 0; r < NR; ++r) acc[r] += a[k * ld + i0 + r] * bk;
  }
}

// M_{j, k} += sum_r C_{i0 + r, k} x[r]_j for the tile's columns j: column sums (value and key roles)
template <int NR, typename T>
inline void tile_accumulate(T* m, const T* c, int64_t dim, int64_t ld, int64_t i0, int64_t j0, const Tile<T>& x) {
  for (int64_t k = 0; k < dim; ++k) {
    Vec<T> even = load(m + k * ld + j0), odd{};  // two chains: half the dependent latency
    for (int r = 0; r < NR; ++r) (r % 2 ? odd : even) += c[k * ld + i0 + r] * x[r];
    store(m + k * ld + j0, even + odd);
  }
}

// out[r * rs + k * ks] += sum_j rows[r * ld + j] B_{j, k} for k < dim: row products (the query role)
template <int NR, typename T>
inline void row_products(const T* rows, const T* b, int64_t dim, int64_t ld, T* out, int64_t rs, int64_t ks) {
  for (int64_t k = 0; k < dim; ++k) {
    Tile<T> acc;
    zero<NR>(acc);
    for (int64_t j0 = 0; j0 < ld; j0 += kLanes<T>) {
      const Vec<T> bk = load(b + k * ld + j0);
      for (int r = 0; r < NR; ++r) acc[r] += load(rows + r * ld + j0) * bk;
    }
    for (int r = 0; r < NR; ++r) out[r * rs + k * ks] += total(acc[r]);
  }
}

// The softmax of one head in base 2: with a = c log2(e), t_ij log2(e) = a (2 q_i.q_j - |q_i|^2 - |q_j|^2)
// and P_ij = 2^(t_ij log2(e) - lse2_i). The bracket is formed before scaling, so that its cancellation
// is as exact as the Gram entry allows (s_ii and |q_i|^2 are the same sum, so t_ii is 0 or a rounding).
template <typename T>
struct Softmax {
  T a;
  const T* sq;    // |q_j|^2, one row of ld
  const T* mask;  // 1 for the N real columns, 0 for the padding
  int64_t n;
};

// In place on the Gram tile s_ij = q_i.q_j: 2^(min(t_ij, 0) log2(e) - lse2_i) (lse2 = 0 when null:
// the unnormalised forward), 0 in padded columns. min(t, 0) keeps t on the side of its exact value;
// vmin(0, t) returns a NaN t, so NaN inputs give NaN outputs, as in the reference.
template <int NR, typename T>
inline void softmax_tile(Tile<T>& s, const Softmax<T>& sm, const T* lse2, int64_t i0, int64_t j0) {
  const Vec<T> sqj = load(sm.sq + j0), zero = Vec<T>{};
  for (int r = 0; r < NR; ++r) {
    s[r] = vexp2(vmin(zero, 2 * s[r] - sm.sq[i0 + r] - sqj) * sm.a - (lse2 ? lse2[r] : T(0)));
  }
  if (j0 + kLanes<T> > sm.n) {
    const Vec<T> keep = load(sm.mask + j0);
    for (int r = 0; r < NR; ++r) s[r] *= keep;
  }
}

// a = a + a^T in place (n x n, rows of ld), in tiles of 16 x 16.
template <typename T>
void symmetrise(T* a, int64_t n, int64_t ld) {
  for (int64_t i0 = 0; i0 < n; i0 += 16)
    for (int64_t j0 = i0; j0 < n; j0 += 16)
      for (int64_t i = i0; i < std::min(i0 + 16, n); ++i)
        for (int64_t j = std::max(j0, i); j < std::min(j0 + 16, n); ++j) {
          const T s = a[i * ld + j] + a[j * ld + i];
          a[i * ld + j] = s;
          a[j * ld + i] = s;
        }
}

// One thread's working memory for one head at a time: blocks of `rows` x ld, ld = N rounded up.
template <typename T>
struct Workspace {
  int64_t n, ld, used = 0;
  std::vector<T> buf;
  Workspace(int64_t n_, int64_t rows) : n(n_), ld((n_ + ALIGN - 1) / ALIGN * ALIGN), buf(rows * ld) {}
  T* take(int64_t rows) {
    TORCH_INTERNAL_ASSERT(used + rows * ld <= static_cast<int64_t>(buf.size()), "l2_attention (cpu): workspace");
    T* p = buf.data() + used;
    used += rows * ld;
    return p;
  }
  T* zeros(int64_t rows) {
    T* p = take(rows);
    std::fill(p, p + rows * ld, T(0));
    return p;
  }
  T* column_mask() {  // 1 for the N real columns, 0 for the padding
    T* p = take(1);
    std::fill(p, p + n, T(1));
    std::fill(p + n, p + ld, T(0));
    return p;
  }
};

// f(h, ws) for every head, in parallel; f takes at most `rows` rows of ld from ws per head.
template <typename T, typename F>
void for_each_head(int64_t bh, int64_t n, int64_t rows, const F& f) {
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(n, rows);
    for (int64_t h = begin; h < end; ++h) {
      ws.used = 0;
      f(h, ws);
    }
  });
}

// f(std::integral_constant<int, NR>, i0) over the rows: blocks of R rows, then of 4, then single rows.
template <typename F>
void for_each_row_block(int64_t n, const F& f) {
  int64_t i0 = 0;
  for (; i0 + R <= n; i0 += R) f(std::integral_constant<int, R>{}, i0);
  for (; i0 + 4 <= n; i0 += 4) f(std::integral_constant<int, 4>{}, i0);
  for (; i0 < n; ++i0) f(std::integral_constant<int, 1>{}, i0);
}

// What every pass starts from, taken from ws in this order: [Q^T; 1] (the row of ones after Q^T is
// also the column mask; in the backward passes it makes the query- and key-role products with dS
// return its row and column sums as well), V^T, |q_j|^2 and the softmax.
template <typename T>
struct HeadPanels {
  T *qt, *mask, *vt, *sq;
  Softmax<T> sm;
  HeadPanels(Workspace<T>& ws, const Heads<T>& Q, const Heads<T>& V, int64_t h, double scale)
      : qt(ws.take(Q.dim)), mask(ws.column_mask()), vt(ws.take(V.dim)), sq(ws.take(1)),
        sm{static_cast<T>(scale * M_LOG2E), sq, mask, ws.n} {
    load_panel(Q, h, ws.n, ws.ld, qt);
    load_panel(V, h, ws.n, ws.ld, vt);
    column_dots(qt, qt, Q.dim, ws.ld, sq);
  }
};

// ... and what both backward passes add: G^T, O^T, delta_j = g_j.o_j and the head's lse2.
template <typename T>
struct BackwardPanels : HeadPanels<T> {
  T *gt, *ot, *delta;
  const T* lse2;
  BackwardPanels(Workspace<T>& ws, const Heads<T>& Q, const Heads<T>& V, const Heads<T>& G, const Heads<T>& O,
                 const T* lse2_h, int64_t h, double scale)
      : HeadPanels<T>(ws, Q, V, h, scale), gt(ws.take(V.dim)), ot(ws.take(V.dim)), delta(ws.take(1)), lse2(lse2_h) {
    load_panel(G, h, ws.n, ws.ld, gt);
    load_panel(O, h, ws.n, ws.ld, ot);
    column_dots(gt, ot, V.dim, ws.ld, delta);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& v, double scale) {
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2), e = v.size(2);
  at::Tensor o = at::empty_like(v), lse = at::empty({bh, n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_fwd", [&] {
    using T = scalar_t;
    const Heads<T> Q(q), V(v), O(o);
    for_each_head<T>(bh, n, d + e + 2 + R, [&](int64_t h, Workspace<T>& ws) {
      const int64_t ld = ws.ld;
      const HeadPanels<T> in(ws, Q, V, h, scale);
      const T *qt = in.qt, *vt = in.vt;
      T *p = ws.take(R), *lse_h = lse.data_ptr<T>() + h * n;
      std::vector<T> o_rows(R * e);
      for_each_row_block(n, [&](auto nr, int64_t i0) {
        constexpr int NR = decltype(nr)::value;
        Tile<T> z;  // row sums of exp(t_ij)
        zero<NR>(z);
        for (int64_t j0 = 0; j0 < ld; j0 += kLanes<T>) {
          Tile<T> s;
          tile_product<NR>(qt, qt, d, ld, i0, j0, s);
          softmax_tile<NR>(s, in.sm, (const T*)nullptr, i0, j0);  // unnormalised: exp(t_ij)
          store_tile<NR>(s, p, ld, j0);
          for (int r = 0; r < NR; ++r) z[r] += s[r];
        }
        std::fill(o_rows.begin(), o_rows.end(), T(0));
        row_products<NR>(p, vt, e, ld, o_rows.data(), e, 1);
        for (int r = 0; r < NR; ++r) {
          const T zr = total(z[r]);
          lse_h[i0 + r] = std::log2(zr);
          for (int64_t k = 0; k < e; ++k) O.at(h, i0 + r, k) = o_rows[r * e + k] / zr;
        }
      });
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o,
                                       const at::Tensor& lse, const at::Tensor& g, double scale) {
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2), e = v.size(2);
  at::Tensor dq = at::empty_like(q), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd", [&] {
    using T = scalar_t;
    const Heads<T> Q(q), V(v), O(o), G(g), DQ(dq), DV(dv);
    const T c = static_cast<T>(scale);
    for_each_head<T>(bh, n, 2 * d + 4 * e + 4 + R, [&](int64_t h, Workspace<T>& ws) {
      const int64_t ld = ws.ld;
      const BackwardPanels<T> in(ws, Q, V, G, O, lse.data_ptr<T>() + h * n, h, scale);
      const T *qt = in.qt, *vt = in.vt, *gt = in.gt, *delta = in.delta, *lse_h = in.lse2;
      T *ds_rows = ws.take(R), *dvt = ws.zeros(e), *dqt = ws.zeros(d + 1);  // dqt's last row: r + k
      for_each_row_block(n, [&](auto nr, int64_t i0) {
        constexpr int NR = decltype(nr)::value;
        for (int64_t j0 = 0; j0 < ld; j0 += kLanes<T>) {
          Tile<T> p, ds;
          tile_product<NR>(qt, qt, d, ld, i0, j0, p);
          softmax_tile<NR>(p, in.sm, lse_h + i0, i0, j0);
          tile_product<NR>(gt, vt, e, ld, i0, j0, ds);  // dP
          for (int r = 0; r < NR; ++r) ds[r] = p[r] * (ds[r] - delta[i0 + r]);
          store_tile<NR>(ds, ds_rows, ld, j0);
          tile_accumulate<NR>(dvt, gt, e, ld, i0, j0, p);       // dV = P^T G
          tile_accumulate<NR>(dqt, qt, d + 1, ld, i0, j0, ds);  // dS^T [Q 1]: key role, k_j
        }
        row_products<NR>(ds_rows, qt, d + 1, ld, dqt + i0, 1, ld);  // dS [Q 1]: query role, r_i
      });
      store_panel(dqt, dqt + d * ld, qt, (T*)nullptr, (T*)nullptr, 2 * c, n, ld, DQ, h);
      store_panel(dvt, (T*)nullptr, (T*)nullptr, (T*)nullptr, (T*)nullptr, T(1), n, ld, DV, h);
    });
  });
  return {dq, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd2(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o,
                                                    const at::Tensor& lse, const at::Tensor& g, const at::Tensor& u,
                                                    const at::Tensor& w, double scale) {
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2), e = v.size(2);
  at::Tensor gq = at::empty_like(q), gv = at::empty_like(v), gg = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd2", [&] {
    using T = scalar_t;
    const Heads<T> Q(q), V(v), O(o), G(g), U(u), W(w), GQ(gq), GV(gv), GG(gg);
    const T c = static_cast<T>(scale);
    for_each_head<T>(bh, n, 4 * d + 5 * e + 7 + 4 * R, [&](int64_t h, Workspace<T>& ws) {
      const int64_t ld = ws.ld;
      const BackwardPanels<T> in(ws, Q, V, G, O, lse.data_ptr<T>() + h * n, h, scale);
      const T *qt = in.qt, *vt = in.vt, *gt = in.gt, *delta = in.delta, *lse_h = in.lse2;
      T* ut = ws.take(d);  // [U^T; 1], as [Q^T; 1]: gqt's and gut's last rows collect r' + k' and r + k
      ws.column_mask();
      T *wt = ws.take(e), *qu = ws.take(1), *p_rows = ws.take(R), *pd_rows = ws.take(R), *ds_rows = ws.take(R);
      T *dsd_rows = ws.take(R), *gvt = ws.zeros(e), *gqt = ws.zeros(d + 1), *gut = ws.zeros(d + 1);
      load_panel(U, h, n, ld, ut);
      load_panel(W, h, n, ld, wt);
      column_dots(qt, ut, d, ld, qu);
      std::vector<T> od_rows(R * e);
      for_each_row_block(n, [&](auto nr, int64_t i0) {
        constexpr int NR = decltype(nr)::value;
        // P and t'_ij = -2c (q_i.u_i - q_i.u_j - u_i.q_j + q_j.u_j)
        for (int64_t j0 = 0; j0 < ld; j0 += kLanes<T>) {
          Tile<T> p, tq, tu;
          tile_product<NR>(qt, qt, d, ld, i0, j0, p);
          softmax_tile<NR>(p, in.sm, lse_h + i0, i0, j0);
          tile_product<NR>(qt, ut, d, ld, i0, j0, tq);  // q_i.u_j
          tile_product<NR>(ut, qt, d, ld, i0, j0, tu);  // u_i.q_j
          const Vec<T> quj = load(qu + j0);
          for (int r = 0; r < NR; ++r) tq[r] = -2 * c * (qu[i0 + r] - tq[r] - tu[r] + quj);
          store_tile<NR>(p, p_rows, ld, j0);
          store_tile<NR>(tq, pd_rows, ld, j0);
        }
        // P' = P o (t' - mu), mu_i = sum_j P_ij t'_ij; O' = P' V + P W; delta'_i = g_i.O'_i
        for (int r = 0; r < NR; ++r) {
          T *pd = pd_rows + r * ld, *p = p_rows + r * ld;
          Vec<T> mu{};
          for (int64_t j = 0; j < ld; j += kLanes<T>) mu += load(p + j) * load(pd + j);
          const T m = total(mu);
          for (int64_t j = 0; j < ld; j += kLanes<T>) store(pd + j, load(p + j) * (load(pd + j) - m));
        }
        std::fill(od_rows.begin(), od_rows.end(), T(0));
        row_products<NR>(pd_rows, vt, e, ld, od_rows.data(), e, 1);
        row_products<NR>(p_rows, wt, e, ld, od_rows.data(), e, 1);
        T delta_d[R];
        for (int r = 0; r < NR; ++r) {
          delta_d[r] = 0;
          for (int64_t k = 0; k < e; ++k) {
            GG.at(h, i0 + r, k) = od_rows[r * e + k];
            delta_d[r] += gt[k * ld + i0 + r] * od_rows[r * e + k];
          }
        }
        // dS = P o (dP - delta), dS' = P' o (dP - delta) + P o (dP' - delta'); dP = G V^T, dP' = G W^T
        for (int64_t j0 = 0; j0 < ld; j0 += kLanes<T>) {
          Tile<T> ds, dsd, pd;
          tile_product<NR>(gt, vt, e, ld, i0, j0, ds);
          tile_product<NR>(gt, wt, e, ld, i0, j0, dsd);
          for (int r = 0; r < NR; ++r) {
            const Vec<T> p = load(p_rows + r * ld + j0), dp = ds[r] - delta[i0 + r];
            dsd[r] = load(pd_rows + r * ld + j0) * dp + p * (dsd[r] - delta_d[r]);
            ds[r] = p * dp;
          }
          store_tile<NR>(ds, ds_rows, ld, j0);
          store_tile<NR>(dsd, dsd_rows, ld, j0);
          tile_accumulate<NR>(gqt, qt, d + 1, ld, i0, j0, dsd);  // dS'^T [Q 1]
          tile_accumulate<NR>(gut, ut, d + 1, ld, i0, j0, ds);   // dS^T [U 1]
          load_tile<NR>(pd_rows, ld, j0, pd);
          tile_accumulate<NR>(gvt, gt, e, ld, i0, j0, pd);  // gV = P'^T G
        }
        row_products<NR>(dsd_rows, qt, d + 1, ld, gqt + i0, 1, ld);  // dS' [Q 1]
        row_products<NR>(ds_rows, ut, d + 1, ld, gut + i0, 1, ld);   // dS [U 1]
      });
      for (int64_t j = 0; j < d * ld; ++j) gqt[j] += gut[j];
      store_panel(gqt, gqt + d * ld, qt, gut + d * ld, ut, 2 * c, n, ld, GQ, h);
      store_panel(gvt, (T*)nullptr, (T*)nullptr, (T*)nullptr, (T*)nullptr, T(1), n, ld, GV, h);
    });
  });
  return {gq, gv, gg};
}


// ---------------------------------------------------------------------------------------------
// The blocked kernels (l2_attention_cpu.cpp says where they run): the same math, with every product
// a batched BLAS GEMM (at::bmm_out / baddbmm_: MKL's packed kernels) into a per-thread buffer of
// heads x rows x N, and the elementwise steps fused into one pass over each row of the buffer while
// it is in cache. Short sequences take a group of whole heads per block (one batched GEMM for all
// of them keeps the cost per call small at N = 49); long ones one head and a block of its rows.
// Buffers and outputs are dense matrices (column-major ones as transposes), the layouts that BLAS
// takes without a copy. No N x N matrix outlives a block.
// ---------------------------------------------------------------------------------------------

namespace {

// A block holds at most about kBlockElems entries of each of its buffers (512 KiB in float32). While
// a head's N x N fits, a block takes whole heads: dS and dS^T are then one symmetric matrix,
// (dS + dS^T) Q, and q_i.u_j + u_i.q_j one GEMM plus its transpose (one GEMM fewer per VJP, three
// per double VJP). Longer sequences run one head at a time, in blocks of rows.
constexpr int64_t kBlockElems = int64_t(1) << 17;

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

// A thread's scratch memory of at least `numel` entries, kept between calls (fresh memory of this
// size costs page faults at every call).
template <typename T>
T* scratch(int64_t numel) {
  thread_local std::vector<T> cache;
  if (static_cast<int64_t>(cache.size()) < numel) cache.resize(numel);
  return cache.data();
}

// x_j = a_j.b_j for the rows j of head h of two tensors (|q_j|^2, delta_j = g_j.o_j, q_j.u_j), in
// vectors along the rows (column-major heads) or along the head dim (row-major ones).
template <typename T>
void row_dots(const Heads<T>& a, const Heads<T>& b, int64_t h, int64_t n, T* x) {
  const T *pa = &a.at(h, 0, 0), *pb = &b.at(h, 0, 0);
  if (a.sn == 1 && b.sn == 1) {
    std::fill(x, x + n, T(0));
    for (int64_t k = 0; k < a.dim; ++k)
      each_vec<T>(n, [&](int64_t j, int64_t l) {
        storen(x + j, loadn(x + j, l) + loadn(pa + k * a.sd + j, l) * loadn(pb + k * b.sd + j, l), l);
      });
  } else if (a.sd == 1 && b.sd == 1) {
    for (int64_t j = 0; j < n; ++j) {
      Vec<T> acc{};
      each_vec<T>(a.dim, [&](int64_t k, int64_t l) {
        acc += loadn(pa + j * a.sn + k, l) * loadn(pb + j * b.sn + k, l);
      });
      x[j] = total(acc);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < a.dim; ++k) acc += a.at(h, j, k) * b.at(h, j, k);
      x[j] = acc;
    }
  }
}

// One thread's buffers: `count` blocks of (heads x rows x N) and, per head of the group, five N-long
// rows (|q_j|^2, delta_j, one more per-column value and two sums); plus an N x d accumulator of the
// key roles when heads run in blocks of rows.
template <typename T>
struct Blocks {
  enum Row { kSq, kDelta, kExtra, kSum, kSum2, kRows };
  int64_t n, br, hg;  // rows per block, heads per group
  at::Tensor buf, sums, kacc;
  T a;  // scale * log2(e)
  // (rows per block, heads per group) for B*H heads of N rows.
  static std::pair<int64_t, int64_t> shape(int64_t bh, int64_t n) {
    if (n * n <= kBlockElems)
      return {n, std::clamp<int64_t>(kBlockElems / std::max<int64_t>(1, n * n), 1,
                                     std::max<int64_t>(1, bh / at::get_num_threads()))};
    const int64_t blocks = (n * n + kBlockElems - 1) / kBlockElems;
    return {(n + blocks - 1) / blocks, 1};
  }
  Blocks(int count, std::pair<int64_t, int64_t> rows_heads, int64_t n_, int64_t dim, double scale,
         const at::TensorOptions& opts)
      : n(n_), br(rows_heads.first), hg(rows_heads.second), a(static_cast<T>(scale * M_LOG2E)) {
    const int64_t nbuf = count * hg * br * n, nsums = kRows * hg * n, nkacc = whole() ? 0 : hg * n * dim;
    const at::Tensor all = at::from_blob(scratch<T>(nbuf + nsums + nkacc), {nbuf + nsums + nkacc}, opts);
    buf = all.narrow(0, 0, nbuf).view({count, hg, br, n});
    sums = all.narrow(0, nbuf, nsums).view({kRows, hg, n});
    if (!whole()) kacc = all.narrow(0, nbuf + nsums, nkacc).view({hg, n, dim});
  }
  bool whole() const { return br == n; }
  // Buffer k of the block as (heads, m, N) for GEMMs, its row r of head g as a pointer.
  at::Tensor mat(int k, int64_t hn, int64_t m) const { return buf.select(0, k).narrow(0, 0, hn).narrow(1, 0, m); }
  T* row(int k, int64_t g, int64_t r) const { return buf.data_ptr<T>() + ((k * hg + g) * br + r) * n; }
  T* vec(Row which, int64_t g) const { return sums.data_ptr<T>() + (which * hg + g) * n; }
  at::Tensor col(Row which, int64_t hn) const { return sums.select(0, which).narrow(0, 0, hn).unsqueeze(2); }
  // The heads h0 + g, g < hn, start: the sums zeroed, each row `to` of `dots` set to a_j.b_j.
  struct Dots {
    Row to;
    const Heads<T>&a, &b;
  };
  void start(int64_t h0, int64_t hn, std::initializer_list<Dots> dots) {
    for (int64_t g = 0; g < hn; ++g) {
      std::fill(vec(kSum, g), vec(kSum, g) + n, T(0));
      std::fill(vec(kSum2, g), vec(kSum2, g) + n, T(0));
      for (const Dots& x : dots) row_dots(x.a, x.b, h0 + g, n, vec(x.to, g));
    }
  }
  // Row i of head g at p (the Gram row q_i.q_j) becomes 2^(min(t_ij, 0) log2 e - lse2); returns its sum.
  T softmax_row(T* p, int64_t g, int64_t i, T lse2) const {
    const T* sq = vec(kSq, g);
    const Vec<T> zero{};
    Vec<T> z{};
    each_vec<T>(n, [&](int64_t j, int64_t k) {
      const Vec<T> s = vexp2(vmin(zero, 2 * loadn(p + j, k) - sq[i] - loadn(sq + j, k)) * a - lse2);
      storen(p + j, s, k);
      z += k == kLanes<T> ? s : s * first_lanes<T>(k);
    });
    return total(z);
  }
  // f(h0, hn, i0, m) for every block (heads [h0, h0 + hn), rows [i0, i0 + m)) of the heads [begin, end).
  template <typename F>
  void each_block(int64_t begin, int64_t end, const F& f) {
    for (int64_t h0 = begin; h0 < end; h0 += hg) {
      const int64_t hn = std::min(hg, end - h0);
      for (int64_t i0 = 0; i0 < n; i0 += br) f(h0, hn, i0, std::min(br, n - i0));
    }
  }
};

// out = a b, or out += a b (accumulate), batched over heads; a column-major `out` as
// out^T = b^T a^T, so that BLAS writes it in place.
void product(at::Tensor out, at::Tensor a, at::Tensor b, bool accumulate) {
  if (!out.is_contiguous() && out.transpose(1, 2).is_contiguous()) {
    out = out.transpose(1, 2);
    std::swap(a, b);
    a = a.transpose(1, 2);
    b = b.transpose(1, 2);
  }
  if (accumulate)
    out.baddbmm_(a, b);
  else
    at::bmm_out(out, a, b);
}

// rk_i += sum_j x_ij (row sums) and rk_j += sum_i x_ij (column sums) for row i of a block.
template <typename T>
inline void add_sums(const T* x, int64_t i, int64_t n, T* rk) {
  Vec<T> r{};
  each_vec<T>(n, [&](int64_t j, int64_t k) {
    const Vec<T> xj = loadn(x + j, k);
    r += xj;
    storen(rk + j, loadn(rk + j, k) + xj, k);
  });
  rk[i] += total(r);
}

// f(begin, end, blocks) over the heads in parallel (whole groups per thread), one Blocks per thread.
template <typename T, typename F>
void for_heads_blocked(const at::Tensor& q, int count, int64_t dim, double scale, const F& f) {
  const int64_t bh = q.size(0), n = q.size(1);
  const auto rows_heads = Blocks<T>::shape(bh, n);
  at::parallel_for(0, bh, rows_heads.second, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: the GEMMs below run on tensors that
    // may require grad, below autograd as the op itself does.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Blocks<T> blocks(count, rows_heads, n, dim, scale, q.options());
    f(begin, end, blocks);
  });
}

at::Tensor rows(const at::Tensor& x, int64_t h0, int64_t hn, int64_t i0, int64_t m) {
  return x.narrow(0, h0, hn).narrow(1, i0, m);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fwd_blocked(const at::Tensor& q, const at::Tensor& v, double scale) {
  const int64_t n = q.size(1);
  at::Tensor o = at::empty_like(v), lse = at::empty({q.size(0), n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_fwd", [&] {
    using T = scalar_t;
    using B = Blocks<T>;
    const Heads<T> Q(q);
    for_heads_blocked<T>(q, 1, 0, scale, [&](int64_t begin, int64_t end, B& b) {
      b.each_block(begin, end, [&](int64_t h0, int64_t hn, int64_t i0, int64_t m) {
        const at::Tensor p = b.mat(0, hn, m);
        if (i0 == 0) b.start(h0, hn, {{B::kSq, Q, Q}});
        product(p, rows(q, h0, hn, i0, m), q.narrow(0, h0, hn).transpose(1, 2), false);  // q_i.q_j
        for (int64_t g = 0; g < hn; ++g)
          for (int64_t r = 0; r < m; ++r) {
            T* row = b.row(0, g, r);
            const T z = b.softmax_row(row, g, i0 + r, T(0));
            const Vec<T> inv = splat(T(1) / z);
            lse.data_ptr<T>()[(h0 + g) * n + i0 + r] = std::log2(z);
            each_vec<T>(n, [&](int64_t j, int64_t k) { storen(row + j, loadn(row + j, k) * inv, k); });
          }
        product(rows(o, h0, hn, i0, m), p, v.narrow(0, h0, hn), false);  // O = P V
      });
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> bwd_blocked(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o,
                                               const at::Tensor& lse, const at::Tensor& g, double scale) {
  const int64_t n = q.size(1);
  at::Tensor dq = at::empty_like(q), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd", [&] {
    using T = scalar_t;
    using B = Blocks<T>;
    const Heads<T> Q(q), G(g), O(o);
    for_heads_blocked<T>(q, 2, q.size(2), scale, [&](int64_t begin, int64_t end, B& b) {
      b.each_block(begin, end, [&](int64_t h0, int64_t hn, int64_t i0, int64_t m) {
        const at::Tensor qg = q.narrow(0, h0, hn), qi = rows(q, h0, hn, i0, m), gi = rows(g, h0, hn, i0, m),
                         p = b.mat(0, hn, m), ds = b.mat(1, hn, m), dqg = dq.narrow(0, h0, hn);
        if (i0 == 0) b.start(h0, hn, {{B::kSq, Q, Q}, {B::kDelta, G, O}});
        product(p, qi, qg.transpose(1, 2), false);
        product(ds, gi, v.narrow(0, h0, hn).transpose(1, 2), false);  // dP = G V^T
        for (int64_t k = 0; k < hn; ++k) {
          const T *dl = b.vec(B::kDelta, k), *lse_h = lse.data_ptr<T>() + (h0 + k) * n;
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            T *pr = b.row(0, k, r), *dr = b.row(1, k, r);
            b.softmax_row(pr, k, i, lse_h[i]);
            each_vec<T>(n, [&](int64_t j, int64_t l) {
              storen(dr + j, loadn(pr + j, l) * (loadn(dr + j, l) - dl[i]), l);
            });
            add_sums(dr, i, n, b.vec(B::kSum, k));  // r_i + k_j
          }
          if (b.whole()) symmetrise(b.row(1, k, 0), n, n);  // dS + dS^T
        }
        product(dv.narrow(0, h0, hn), p.transpose(1, 2), gi, i0 > 0);    // dV = P^T G
        if (!b.whole()) product(b.kacc, ds.transpose(1, 2), qi, i0 > 0);  // key role: dS^T Q
        product(rows(dq, h0, hn, i0, m), ds, qg, false);  // query role dS Q (whole heads: both roles)
        if (i0 + m == n) {  // dQ = 2c [dS Q + dS^T Q - diag(r + k) Q]
          if (!b.whole()) dqg.add_(b.kacc);
          dqg.addcmul_(qg, b.col(B::kSum, hn), -1).mul_(2 * scale);
        }
      });
    });
  });
  return {dq, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd2_blocked(const at::Tensor& q, const at::Tensor& v,
                                                            const at::Tensor& o, const at::Tensor& lse,
                                                            const at::Tensor& g, const at::Tensor& u,
                                                            const at::Tensor& w, double scale) {
  const int64_t n = q.size(1);
  at::Tensor gq = at::empty_like(q), gv = at::empty_like(v), gg = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd2", [&] {
    using T = scalar_t;
    using B = Blocks<T>;
    const Heads<T> Q(q), G(g), O(o), U(u);
    const T c = static_cast<T>(scale);
    for_heads_blocked<T>(q, 4, q.size(2), scale, [&](int64_t begin, int64_t end, B& b) {
      b.each_block(begin, end, [&](int64_t h0, int64_t hn, int64_t i0, int64_t m) {
        const at::Tensor qg = q.narrow(0, h0, hn), ug = u.narrow(0, h0, hn), vg = v.narrow(0, h0, hn),
                         wg = w.narrow(0, h0, hn), qi = rows(q, h0, hn, i0, m), ui = rows(u, h0, hn, i0, m),
                         gi = rows(g, h0, hn, i0, m), ggi = rows(gg, h0, hn, i0, m), gqg = gq.narrow(0, h0, hn),
                         p = b.mat(0, hn, m), pd = b.mat(1, hn, m), ds = b.mat(2, hn, m), dsd = b.mat(3, hn, m);
        if (i0 == 0) b.start(h0, hn, {{B::kSq, Q, Q}, {B::kDelta, G, O}, {B::kExtra, Q, U}});  // kExtra: q_j.u_j
        product(p, qi, qg.transpose(1, 2), false);
        product(pd, qi, ug.transpose(1, 2), false);  // q_i.u_j + u_i.q_j
        if (!b.whole()) product(pd, ui, qg.transpose(1, 2), true);
        // t'_ij = -2c (q_i.u_i - q_i.u_j - u_i.q_j + q_j.u_j); P' = P o (t' - mu), mu_i = sum_j P_ij t'_ij
        for (int64_t k = 0; k < hn; ++k) {
          const T *qu_h = b.vec(B::kExtra, k), *lse_h = lse.data_ptr<T>() + (h0 + k) * n;
          if (b.whole()) symmetrise(b.row(1, k, 0), n, n);
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            T *pr = b.row(0, k, r), *tr = b.row(1, k, r);
            b.softmax_row(pr, k, i, lse_h[i]);
            Vec<T> mu{};
            each_vec<T>(n, [&](int64_t j, int64_t l) {
              const Vec<T> t = -2 * c * (qu_h[i] - loadn(tr + j, l) + loadn(qu_h + j, l));
              storen(tr + j, t, l);
              mu += loadn(pr + j, l) * t;  // 0 beyond the row
            });
            const T mi = total(mu);
            each_vec<T>(n, [&](int64_t j, int64_t l) {
              storen(tr + j, loadn(pr + j, l) * (loadn(tr + j, l) - mi), l);
            });
          }
        }
        product(ggi, pd, vg, false);  // O' = P' V + P W
        product(ggi, p, wg, true);
        const at::Tensor delta_d = (gi * ggi).sum(2).contiguous();  // delta'_i = g_i.O'_i, (hn, m)
        product(ds, gi, vg.transpose(1, 2), false);   // dP = G V^T
        product(dsd, gi, wg.transpose(1, 2), false);  // dP' = G W^T
        for (int64_t k = 0; k < hn; ++k) {
          const T *dl = b.vec(B::kDelta, k), *dd = delta_d.data_ptr<T>() + k * m;
          for (int64_t r = 0; r < m; ++r) {
            const int64_t i = i0 + r;
            const T *pr = b.row(0, k, r), *pdr = b.row(1, k, r);
            T *dr = b.row(2, k, r), *ddr = b.row(3, k, r);
            each_vec<T>(n, [&](int64_t j, int64_t l) {
              const Vec<T> pj = loadn(pr + j, l), dp = loadn(dr + j, l) - dl[i];
              storen(ddr + j, loadn(pdr + j, l) * dp + pj * (loadn(ddr + j, l) - dd[r]), l);  // dS'
              storen(dr + j, pj * dp, l);                                                   // dS
            });
            add_sums(dr, i, n, b.vec(B::kSum, k));    // r + k of dS
            add_sums(ddr, i, n, b.vec(B::kSum2, k));  // r' + k' of dS'
          }
          if (b.whole()) {
            symmetrise(b.row(2, k, 0), n, n);
            symmetrise(b.row(3, k, 0), n, n);
          }
        }
        product(gv.narrow(0, h0, hn), pd.transpose(1, 2), gi, i0 > 0);  // gV = P'^T G
        if (!b.whole()) {                                                // key roles: dS'^T Q + dS^T U
          product(b.kacc, dsd.transpose(1, 2), qi, i0 > 0);
          product(b.kacc, ds.transpose(1, 2), ui, true);
        }
        product(rows(gq, h0, hn, i0, m), dsd, qg, false);  // query roles dS' Q + dS U (whole heads: both roles)
        product(rows(gq, h0, hn, i0, m), ds, ug, true);
        if (i0 + m == n) {  // gQ = 2c [dS' Q + dS'^T Q - diag(r' + k') Q + dS U + dS^T U - diag(r + k) U]
          if (!b.whole()) gqg.add_(b.kacc);
          gqg.addcmul_(qg, b.col(B::kSum2, hn), -1).addcmul_(ug, b.col(B::kSum, hn), -1).mul_(2 * scale);
        }
      });
    });
  });
  return {gq, gv, gg};
}

}  // namespace ACF_L2_NS
}  // namespace acf_l2_cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#if defined(ACF_L2_TARGET)
ACF_L2_TARGET_POP
#endif
