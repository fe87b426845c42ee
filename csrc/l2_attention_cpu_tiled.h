// The register-tiled CPU L2 attention kernels (head dims up to 16; l2_attention_cpu.cpp says where
// they run): fwd_tiled, bwd_tiled and bwd2_tiled, for one instruction-set variant.
//
// The math (stated in full at the top of l2_attention_cpu_kernels.h), tile by tile of R rows i:
//     forward      s_ij = q_i.q_j, P_ij = 2^((2 s_ij - s_ii - s_jj) c log2(e) - lse2_i), o_i = sum_j P_ij v_j
//     VJP          dS_ij = P_ij (g_i.v_j - delta_i); dv_j += sum_i P_ij g_i and dq_j += dS_ij [q_i 1] (key
//                  role, column sums), dq_i += sum_j dS_ij [q_j 1] (query role, row sums); dq = 2c (...)
//     double VJP   t'_ij from q_i.u_j and u_i.q_j, P' = P o (t' - mu), O' = P' V + P W, then dS, dS' and
//                  the same column and row passes over [Q 1] and [U 1]
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
#pragma once  // included by l2_attention_cpu_kernels.h: once per translation unit, one variant each
#ifndef ACF_L2_NS
#error "l2_attention_cpu_tiled.h is a part of l2_attention_cpu_kernels.h (which sets up the variant)"
#endif

namespace acf_l2_cpu {
namespace ACF_L2_NS {
namespace {

constexpr int R = 8;            // rows per block
constexpr int64_t ALIGN = 16;   // ld is a multiple of this (the lanes of the widest Vec)

template <typename T>
using Tile = Vec<T>[R];  // R rows x kLanes<T> columns

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

std::tuple<at::Tensor, at::Tensor> fwd_tiled(const at::Tensor& q, const at::Tensor& v, double scale) {
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

std::tuple<at::Tensor, at::Tensor> bwd_tiled(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd2_tiled(const at::Tensor& q, const at::Tensor& v,
                                                          const at::Tensor& o, const at::Tensor& lse,
                                                          const at::Tensor& g, const at::Tensor& u,
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

}  // namespace ACF_L2_NS
}  // namespace acf_l2_cpu
