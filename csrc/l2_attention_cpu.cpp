// L2 self-attention with keys tied to queries on CPU: forward, VJP and double VJP.
//
// The math (paper eq. 9-10; one batch element and head; c = scale; Q: N x d, V: N x e):
//
//     t_ij = -c |q_i - q_j|^2        P = softmax_rows(t)        O = P V
//
// First order, given G = dL/dO:
//
//     dP = G V^T   delta_i = sum_j P_ij dP_ij   dS = P o (dP - delta)   dV = P^T G
//     dQ = 2c [dS Q + dS^T Q - diag(r + k) Q]   r, k: row and column sums of dS
//
// (r = 0 in exact arithmetic; subtracting it is the difference form sum_j dS_kj (q_j - q_k),
// which keeps the error low where softmax saturates.) Second order: for cotangents (U, W) of
// (dQ, dV) the double backward returns the tangents of (dQ, dV, O) in the direction (U, W):
//
//     t'_ij = -2c (q_i - q_j).(u_i - u_j)   mu_i = sum_j P_ij t'_ij   P' = P o (t' - mu)
//     O' = P' V + P W                      dP' = G W^T   delta'_i = sum_j P'_ij dP_ij + P_ij dP'_ij
//     dS' = P' o (dP - delta) + P o (dP' - delta')
//     gV = P'^T G    gQ = 2c [dS' Q + dS'^T Q - diag(r' + k') Q + dS U + dS^T U - diag(r + k) U]
//     gG = O'
//
// Layout: unlike the Triton kernels, the forward saves P (B*H x N x N): on a CPU, reading P back
// costs less than recomputing it (an exp per entry). The heads are split into chunks small enough
// that a chunk's N x N scratch matrices stay in a core's L2 cache; chunks run in parallel. Within
// a chunk, the products are batched matmuls (at::bmm_out: MKL / oneDNN) and the elementwise
// passes are `omp simd` loops (built with -fopenmp -march=native: see setup.py). A row-by-row
// variant without N x N scratch was measured 1.5x slower: with head dims of 4-16, the vector loops
// over one row cannot keep up with MKL's blocked products.
// Inputs: contiguous (B*H, N, dim) float32 or float64 tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

void check_heads(const at::Tensor& t, const char* name, int64_t bh, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "l2_attention (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "l2_attention (cpu): ", name, " must be (batch*heads, N, dim), got ", t.sizes());
  TORCH_CHECK(t.size(0) == bh && t.size(1) == n, "l2_attention (cpu): ", name, " has shape ", t.sizes(),
              "; expected (", bh, ", ", n, ", dim)");
  TORCH_CHECK(t.scalar_type() == dtype, "l2_attention (cpu): ", name, " has dtype ", t.scalar_type(),
              "; expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "l2_attention (cpu): ", name, " must be contiguous");
}

void check_q(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 3, "l2_attention (cpu): q must be (batch*heads, N, d), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "l2_attention (cpu): q must be float32 or float64, got ", q.scalar_type());
}

// Run f(h0, len, scratch) over chunks [h0, h0 + len) of the B*H heads in parallel. A chunk is
// sized so that its `slots` N x N scratch matrices plus P stay in a core's L2 cache (~1 MiB); it
// also spreads the per-call cost of the batched products over several heads.
template <typename F>
void for_each_chunk(const at::Tensor& q, int64_t slots, const F& f) {
  const int64_t bh = q.size(0), n = q.size(1);
  const int64_t bytes = (slots + 1) * n * n * (int64_t)q.element_size();
  const int64_t chunk = std::clamp<int64_t>((int64_t(1) << 20) / std::max<int64_t>(bytes, 1), 1, 16);
  at::parallel_for(0, (bh + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // per thread: plain products of plain tensors
    at::Tensor scratch = at::empty({std::max<int64_t>(slots, 1), chunk, n, n}, q.options());
    for (int64_t c = begin; c < end; ++c) {
      const int64_t h0 = c * chunk, len = std::min(chunk, bh - h0);
      f(h0, len, scratch.narrow(1, 0, len));
    }
  });
}

// exp(x) for float within ~2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial for e^r, then 2^n by the exponent bits), written without branches or library calls so
// that the compiler vectorises the loops that call it; x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38
// stands in for smaller values, which only ever multiply into sums of order 1 here).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + shifter;
  float n = t - shifter;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// sum_j a_j b_j
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// Row-wise softmax of t_ij = c (2 S_ij - |q_i|^2 - |q_j|^2), in place on S = Q Q^T. The loops are
// `omp simd`: the reductions may then be reassociated and the loops vectorise.
template <typename T>
void softmax_of_gram(T* s, const T* q, int64_t n, int64_t d, T c) {
  std::vector<T> sq(n);
  for (int64_t i = 0; i < n; ++i) sq[i] = dot(q + i * d, q + i * d, d);
  for (int64_t i = 0; i < n; ++i) {
    T* row = s + i * n;
    const T sqi = sq[i];
    T mx = -std::numeric_limits<T>::infinity(), sum = 0;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = c * (2 * row[j] - sqi - sq[j]);
      mx = row[j] > mx ? row[j] : mx;
    }
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = fast_exp(row[j] - mx);
      sum += row[j];
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

// dS = P o (dP - delta) in place on dP; r + k (row plus column sums of dS) into rk.
template <typename T>
void softmax_vjp(const T* p, T* dp, T* rk, int64_t n) {
  std::fill(rk, rk + n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* pr = p + i * n;
    T* dr = dp + i * n;
    const T delta = dot(pr, dr, n);
    T row = 0;
#pragma omp simd reduction(+ : row)
    for (int64_t j = 0; j < n; ++j) {
      dr[j] = pr[j] * (dr[j] - delta);
      row += dr[j];
      rk[j] += dr[j];
    }
    rk[i] += row;
  }
}

// P' = P o (t' - mu) from M = Q U^T (t'_ij = -2c (M_ii - M_ij - M_ji + M_jj)), written into pd.
template <typename T>
void softmax_tangent(const T* p, const T* m, T* pd, int64_t n, T c) {
  for (int64_t i = 0; i < n; ++i) {
    const T* pr = p + i * n;
    T* out = pd + i * n;
    const T mii = m[i * n + i];
    for (int64_t j = 0; j < n; ++j) out[j] = -2 * c * (mii - m[i * n + j] - m[j * n + i] + m[j * n + j]);
    const T mu = dot(pr, out, n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = pr[j] * (out[j] - mu);
  }
}

// From dP (in dp) and dP' (in dpd): dS into dp and dS' into dpd, with their r + k sums.
template <typename T>
void softmax_vjp_tangent(const T* p, const T* pd, T* dp, T* dpd, T* rk, T* rkd, int64_t n) {
  std::fill(rk, rk + n, T(0));
  std::fill(rkd, rkd + n, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T *pr = p + i * n, *pdr = pd + i * n;
    T *a = dp + i * n, *b = dpd + i * n;
    const T delta = dot(pr, a, n), delta_d = dot(pdr, a, n) + dot(pr, b, n);
    T row = 0, row_d = 0;
#pragma omp simd reduction(+ : row, row_d)
    for (int64_t j = 0; j < n; ++j) {
      b[j] = pdr[j] * (a[j] - delta) + pr[j] * (b[j] - delta_d);
      a[j] = pr[j] * (a[j] - delta);
      row += a[j];
      row_d += b[j];
      rk[j] += a[j];
      rkd[j] += b[j];
    }
    rk[i] += row;
    rkd[i] += row_d;
  }
}

// out_i = 2c (out_i - rk_i x_i - rk2_i x2_i) for each row i: the diag(r + k) terms of dQ (the
// second pair only in the double backward, else null), then the factor 2c.
template <typename T>
void subtract_diag(T* out, const T* rk, const T* x, const T* rk2, const T* x2, int64_t n, int64_t d, T c) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) {
      const T diag = rk[i] * x[i * d + k] + (rk2 ? rk2[i] * x2[i * d + k] : T(0));
      out[i * d + k] = 2 * c * (out[i * d + k] - diag);
    }
}

// out += A X + A^T X (batched over a chunk of heads)
void add_symmetric_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& x) {
  out.baddbmm_(a, x);
  out.baddbmm_(a.transpose(1, 2), x);
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

std::tuple<at::Tensor, at::Tensor> l2_attention_fwd(const at::Tensor& q, const at::Tensor& v, double scale) {
  check_q(q);
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2);
  check_heads(q, "q", bh, n, q.scalar_type());
  check_heads(v, "v", bh, n, q.scalar_type());
  at::Tensor p = at::empty({bh, n, n}, q.options()), o = at::empty({bh, n, v.size(2)}, v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_fwd", [&] {
    for_each_chunk(q, 0, [&](int64_t h0, int64_t len, const at::Tensor&) {
      at::Tensor pc = p.narrow(0, h0, len), qc = q.narrow(0, h0, len), oc = o.narrow(0, h0, len);
      at::bmm_out(pc, qc, qc.transpose(1, 2));
      for (int64_t h = 0; h < len; ++h)
        softmax_of_gram<scalar_t>(ptr<scalar_t>(pc[h]), ptr<scalar_t>(qc[h]), n, d, (scalar_t)scale);
      at::bmm_out(oc, pc, v.narrow(0, h0, len));
    });
  });
  return {o, p};
}

std::tuple<at::Tensor, at::Tensor> l2_attention_bwd(const at::Tensor& q, const at::Tensor& v, const at::Tensor& p,
                                                    const at::Tensor& g, double scale) {
  check_q(q);
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2);
  for (auto [t, name] : {std::pair{q, "q"}, {v, "v"}, {g, "g"}, {p, "p"}}) check_heads(t, name, bh, n, q.scalar_type());
  TORCH_CHECK(g.size(2) == v.size(2) && p.size(2) == n,
              "l2_attention (cpu): g must match v in its last dim, p must be (batch*heads, N, N)");
  at::Tensor dq = at::empty_like(q), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd", [&] {
    for_each_chunk(q, 1, [&](int64_t h0, int64_t len, const at::Tensor& scratch) {
      auto part = [&](const at::Tensor& t) { return t.narrow(0, h0, len); };
      at::Tensor ds = scratch[0], pc = part(p), qc = part(q), dqc = part(dq), dvc = part(dv);
      std::vector<scalar_t> rk(len * n);
      at::bmm_out(ds, part(g), part(v).transpose(1, 2));  // dP
      for (int64_t h = 0; h < len; ++h) softmax_vjp<scalar_t>(ptr<scalar_t>(pc[h]), ptr<scalar_t>(ds[h]), &rk[h * n], n);
      at::bmm_out(dvc, pc.transpose(1, 2), part(g));
      dqc.zero_();
      add_symmetric_product(dqc, ds, qc);
      subtract_diag<scalar_t>(ptr<scalar_t>(dqc), rk.data(), ptr<scalar_t>(qc), nullptr, nullptr, len * n, d,
                              (scalar_t)scale);
    });
  });
  return {dq, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> l2_attention_bwd2(const at::Tensor& q, const at::Tensor& v,
                                                                 const at::Tensor& p, const at::Tensor& g,
                                                                 const at::Tensor& u, const at::Tensor& w,
                                                                 double scale) {
  check_q(q);
  const int64_t bh = q.size(0), n = q.size(1), d = q.size(2);
  for (auto [t, name] : {std::pair{q, "q"}, {v, "v"}, {g, "g"}, {u, "u"}, {w, "w"}, {p, "p"}})
    check_heads(t, name, bh, n, q.scalar_type());
  TORCH_CHECK(u.size(2) == d && w.size(2) == v.size(2) && g.size(2) == v.size(2) && p.size(2) == n,
              "l2_attention (cpu): u must match q, g and w must match v in their last dim, p must be (B*H, N, N)");
  at::Tensor gq = at::empty_like(q), gv = at::empty_like(v), gg = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "l2_attention_bwd2", [&] {
    for_each_chunk(q, 3, [&](int64_t h0, int64_t len, const at::Tensor& scratch) {
      auto part = [&](const at::Tensor& t) { return t.narrow(0, h0, len); };
      at::Tensor a = scratch[0], pd = scratch[1], b = scratch[2];
      at::Tensor pc = part(p), qc = part(q), uc = part(u), gc = part(g), gqc = part(gq), gvc = part(gv), ggc = part(gg);
      const auto c = (scalar_t)scale;
      std::vector<scalar_t> rk(len * n), rkd(len * n);
      at::bmm_out(a, qc, uc.transpose(1, 2));  // M = Q U^T
      for (int64_t h = 0; h < len; ++h)
        softmax_tangent<scalar_t>(ptr<scalar_t>(pc[h]), ptr<scalar_t>(a[h]), ptr<scalar_t>(pd[h]), n, c);
      at::bmm_out(ggc, pd, part(v));  // O' = P' V + P W
      ggc.baddbmm_(pc, part(w));
      at::bmm_out(a, gc, part(v).transpose(1, 2));  // dP
      at::bmm_out(b, gc, part(w).transpose(1, 2));  // dP'
      for (int64_t h = 0; h < len; ++h)
        softmax_vjp_tangent<scalar_t>(ptr<scalar_t>(pc[h]), ptr<scalar_t>(pd[h]), ptr<scalar_t>(a[h]),
                                      ptr<scalar_t>(b[h]), &rk[h * n], &rkd[h * n], n);
      at::bmm_out(gvc, pd.transpose(1, 2), gc);
      gqc.zero_();
      add_symmetric_product(gqc, b, qc);
      add_symmetric_product(gqc, a, uc);
      subtract_diag<scalar_t>(ptr<scalar_t>(gqc), rkd.data(), ptr<scalar_t>(qc), rk.data(), ptr<scalar_t>(uc), len * n,
                              d, c);
    });
  });
  return {gq, gv, gg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(acf, m) {
  m.def("l2_attention_fwd(Tensor q, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("l2_attention_bwd(Tensor q, Tensor v, Tensor p, Tensor g, float scale) -> (Tensor, Tensor)");
  m.def("l2_attention_bwd2(Tensor q, Tensor v, Tensor p, Tensor g, Tensor u, Tensor w, float scale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(acf, CPU, m) {
  m.impl("l2_attention_fwd", &l2_attention_fwd);
  m.impl("l2_attention_bwd", &l2_attention_bwd);
  m.impl("l2_attention_bwd2", &l2_attention_bwd2);
}
