// The blocked CPU L2 attention kernels (head dims above 16; l2_attention_cpu.cpp says where they
// run): fwd_blocked, bwd_blocked and bwd2_blocked, for one instruction-set variant.
//
// The math (stated in full at the top of l2_attention_cpu_kernels.h), as the products it takes here:
//     forward      S = Q Q^T, P_ij = 2^((2 S_ij - S_ii - S_jj) c log2(e) - lse2_i), O = P V
//     VJP          dP = G V^T, dS = P o (dP - delta), dV = P^T G, dQ = 2c [(dS + dS^T) Q - diag(r + k) Q]
//     double VJP   Q U^T (+ its transpose) for t', then O' = P' V + P W, dP' = G W^T, gV = P'^T G and
//                  gQ = 2c [(dS' + dS'^T) Q + (dS + dS^T) U - diag(r' + k') Q - diag(r + k) U]
//
// Every product is a batched BLAS GEMM (at::bmm_out / baddbmm_: MKL's packed kernels) into a
// per-thread buffer of heads x rows x N, and the elementwise steps are fused into one pass over each
// row of the buffer while it is in cache. Short sequences take a group of whole heads per block (one
// batched GEMM for all of them keeps the cost per call small at N = 49); long ones one head and a
// block of its rows. Buffers and outputs are dense matrices (column-major ones as transposes), the
// layouts that BLAS takes without a copy. No N x N matrix outlives a block.
//
#pragma once  // included by l2_attention_cpu_kernels.h: once per translation unit, one variant each
#ifndef ACF_L2_NS
#error "l2_attention_cpu_blocked.h is a part of l2_attention_cpu_kernels.h (which sets up the variant)"
#endif

namespace acf_l2_cpu {
namespace ACF_L2_NS {
namespace {

// A block holds at most about kBlockElems entries of each of its buffers (512 KiB in float32). While
// a head's N x N fits, a block takes whole heads: dS and dS^T are then one symmetric matrix,
// (dS + dS^T) Q, and q_i.u_j + u_i.q_j one GEMM plus its transpose (one GEMM fewer per VJP, three
// per double VJP). Longer sequences run one head at a time, in blocks of rows.
constexpr int64_t kBlockElems = int64_t(1) << 17;

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
