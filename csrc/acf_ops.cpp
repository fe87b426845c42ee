// acf._C: batched power iteration and fused fixed-point steps.
//
// Operators are registered with the PyTorch dispatcher as torch.ops.acf.* (no pybind11: this file
// includes only ATen and torch/library.h, which keeps the build short). The CPU kernels live here;
// the CUDA kernels are raw-pointer launchers in acf_cuda.cu, bound below when built WITH_CUDA.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "anderson.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "acf_cuda.h"
#endif

namespace {

constexpr int kMaxAndersonMemory = acf_anderson::kMaxMemory;

// ---------------------------------------------------------------------------------------------
// Batched power iteration
// ---------------------------------------------------------------------------------------------

// Divide each row of a (G, n) tensor by its 2-norm (clamped like acf.spectral_norm._normalize).
at::Tensor normalize_rows(const at::Tensor& a) {
  return a / at::linalg_vector_norm(a, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
}

// A group of operators of identical shape: dense matrices (G, m, n) or convolutions stacked as
// one grouped convolution (G * Cout, Cin, k, k) at spatial size (H, W).
struct Group {
  std::vector<int64_t> members;  // indices into the input lists
  bool conv = false;
  int64_t padding = 0;
  at::Tensor W;           // dense: (G, m, n); conv: (G * Cout, Cin, k, k)
  at::Tensor u, v;        // dense: (G, m), (G, n); conv: (1, G * Cout, H, W), (1, G * Cin, H, W)
  at::Tensor sigma_prev;  // (G,)
  at::Tensor active;      // (G,) bool, tolerance mode
  at::Tensor steps;       // (G,) int64
  at::Tensor sigma;       // (G,) ||op(v)|| of the last step: equals u^T op(v) since u = op(v) / ||op(v)||
  bool any_active = true;

  int64_t size() const { return (int64_t)members.size(); }

  // Convolutions: one grouped convolution for the whole group; op_t (the adjoint, conv_transpose2d)
  // is computed as a forward convolution with each kernel transposed and flipped (stride 1,
  // padding k // 2: the same map).
  at::Tensor Wt;                      // conv: (G * Cin, Cout, k, k), transposed and flipped per member

  static at::Tensor conv_same(const at::Tensor& x, const at::Tensor& w, int64_t padding, int64_t groups) {
    return at::conv2d(x, w, {}, 1, padding, 1, groups);
  }
  at::Tensor op(const at::Tensor& x) const {  // x in v-layout -> u-layout
    if (!conv) return at::bmm(W, x.unsqueeze(2)).squeeze(2);
    return Group::conv_same(x, W, padding, size());
  }
  at::Tensor op_t(const at::Tensor& y) const {  // y in u-layout -> v-layout
    if (!conv) return at::bmm(W.transpose(1, 2), y.unsqueeze(2)).squeeze(2);
    return Group::conv_same(y, Wt, padding, size());
  }
  // Per-member rows (G, numel) of a u- or v-layout tensor (a view).
  at::Tensor rows(const at::Tensor& a) const { return a.reshape({size(), -1}); }
  at::Tensor unrows(const at::Tensor& r, const at::Tensor& like) const { return r.reshape(like.sizes()); }
  at::Tensor normalize(const at::Tensor& a) const { return unrows(normalize_rows(rows(a)), a); }
};

void check_power_inputs(const at::TensorList& weights, const at::TensorList& us, const at::TensorList& vs) {
  TORCH_CHECK(!weights.empty(), "power_iteration: weights is empty");
  TORCH_CHECK(us.size() == weights.size() && vs.size() == weights.size(),
              "power_iteration: got ", weights.size(), " weights but ", us.size(), " us and ", vs.size(), " vs");
  const auto dev = weights[0].device();
  const auto dt = weights[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "power_iteration: weights[0] has dtype ", dt,
              "; expected float32 or float64");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.device() == dev, "power_iteration: weights[", i, "] is on ", w.device(), " but weights[0] is on ",
                dev, " (mixed devices)");
    TORCH_CHECK(w.scalar_type() == dt, "power_iteration: weights[", i, "] has dtype ", w.scalar_type(),
                " but weights[0] has ", dt, " (dtype mismatch)");
    TORCH_CHECK(w.is_contiguous(), "power_iteration: weights[", i, "] is not contiguous");
    TORCH_CHECK(w.dim() == 2 || (w.dim() == 4 && w.size(2) == w.size(3) && w.size(2) % 2 == 1),
                "power_iteration: weights[", i, "] must be a matrix (2-D) or an odd square conv kernel "
                "(Cout, Cin, k, k), got shape ", w.sizes());
    for (const auto* name : {"us", "vs"}) {
      const auto& t = name[0] == 'u' ? us[i] : vs[i];
      TORCH_CHECK(t.device() == dev, "power_iteration: ", name, "[", i, "] is on ", t.device(),
                  " but the weights are on ", dev, " (mixed devices)");
      TORCH_CHECK(t.scalar_type() == dt, "power_iteration: ", name, "[", i, "] has dtype ", t.scalar_type(),
                  " but the weights have ", dt, " (dtype mismatch)");
      TORCH_CHECK(t.is_contiguous(), "power_iteration: ", name, "[", i, "] is not contiguous");
    }
    if (w.dim() == 2) {
      TORCH_CHECK(us[i].numel() == w.size(0) && vs[i].numel() == w.size(1), "power_iteration: weights[", i,
                  "] has shape ", w.sizes(), " but us[", i, "] has ", us[i].numel(), " and vs[", i, "] has ",
                  vs[i].numel(), " elements");
    } else {
      TORCH_CHECK(us[i].dim() == 4 && vs[i].dim() == 4 && us[i].size(0) == 1 && vs[i].size(0) == 1 &&
                      us[i].size(1) == w.size(0) && vs[i].size(1) == w.size(1) &&
                      us[i].size(2) == vs[i].size(2) && us[i].size(3) == vs[i].size(3),
                  "power_iteration: conv weights[", i, "] of shape ", w.sizes(), " needs us[", i,
                  "] of shape (1, Cout, H, W) and vs[", i, "] of shape (1, Cin, H, W); got ", us[i].sizes(),
                  " and ", vs[i].sizes());
    }
  }
}

// CPU: one operator after the other, exactly the reference's steps (acf.spectral_norm.power_iteration),
// without the Python interpreter in between and with op_t as a forward convolution (faster on CPU
// than conv_transpose2d at batch 1). The host decides convergence per operator (no device to sync).
std::pair<at::Tensor, int64_t> power_iteration_one(const at::Tensor& w, const at::Tensor& u_buf,
                                                   const at::Tensor& v_buf, int64_t n_iter, double tol,
                                                   int64_t max_iter) {
  const bool conv = w.dim() == 4;
  const int64_t pad = conv ? w.size(2) / 2 : 0;
  const at::Tensor wt = conv ? w.transpose(0, 1).flip({2, 3}).contiguous() : w.t();
  auto op = [&](const at::Tensor& x) { return conv ? at::conv2d(x, w, {}, 1, pad) : at::mv(w, x); };
  auto op_t = [&](const at::Tensor& y) { return conv ? at::conv2d(y, wt, {}, 1, pad) : at::mv(wt, y); };
  auto normalize = [](const at::Tensor& a) { return a / at::linalg_vector_norm(a).clamp_min(1e-12); };
  const bool tol_mode = tol > 0;
  at::Tensor v = normalize(conv ? v_buf : v_buf.reshape({-1}));
  const at::Tensor wv0 = op(v);
  at::Tensor sigma, sigma_prev = at::linalg_vector_norm(wv0);  // the warm start's estimate
  at::Tensor u = wv0 / sigma_prev.clamp_min(1e-12);
  const int64_t steps = tol_mode ? max_iter : n_iter;
  int64_t done = 0;
  for (int64_t it = 1; it <= steps; ++it) {
    done = it;
    v = normalize(op_t(u));
    const at::Tensor wv = op(v);
    sigma = at::linalg_vector_norm(wv);
    u = wv / sigma.clamp_min(1e-12);
    if (tol_mode && sigma_prev.defined() &&
        (sigma - sigma_prev).abs().item<double>() <= tol * sigma.item<double>())
      break;
    sigma_prev = sigma;
  }
  // After a step, u = op(v) / ||op(v)||, so u^T op(v) = ||op(v)||: no extra operator application.
  if (!sigma.defined()) sigma = (u * op(v)).sum();
  u_buf.copy_(u.view(u_buf.sizes()));
  v_buf.copy_(v.view(v_buf.sizes()));
  return {sigma, done};
}

// Strategy 0 (auto): CPU per operator (above), other devices batched; 1 / 2 force either.
// Batched: power iteration on op^T op for every operator at once, warm-started from (us, vs), which are
// updated in place. Fixed mode (tol <= 0): n_iter steps. Tolerance mode: per operator, stop after
// the step where |sigma - sigma_prev| <= tol * sigma, sigma_prev being the previous step's estimate or,
// at the first step, the warm start's ||op(v)|| (at most max_iter steps); converged operators
// are frozen on the device by a mask, and the host looks at the mask only every `check_every` steps.
// Returns (sigma = u^T op(v) per operator, steps per operator). Mirrors acf.spectral_norm.power_iteration.
std::tuple<at::Tensor, at::Tensor> power_iteration(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                                   int64_t n_iter, double tol, int64_t max_iter,
                                                   int64_t check_every, int64_t strategy) {
  at::NoGradGuard no_grad;
  check_power_inputs(weights, us, vs);
  const bool tol_mode = tol > 0;
  TORCH_CHECK(tol_mode ? max_iter >= 1 : n_iter >= 0, "power_iteration: ",
              tol_mode ? "max_iter must be >= 1" : "n_iter must be >= 0");
  TORCH_CHECK(check_every >= 1, "power_iteration: check_every must be >= 1");
  const int64_t total = (int64_t)weights.size();
  const auto opts = weights[0].options();
  TORCH_CHECK(strategy >= 0 && strategy <= 2, "power_iteration: strategy must be 0 (auto), 1 (per operator) "
              "or 2 (batched), got ", strategy);
  if (strategy == 1 || (strategy == 0 && weights[0].is_cpu())) {
    at::Tensor sigmas = at::empty({total}, opts);
    at::Tensor step_counts = at::empty({total}, opts.dtype(at::kLong));
    for (int64_t i = 0; i < total; ++i) {
      auto [s, k] = power_iteration_one(weights[i], us[i], vs[i], n_iter, tol, max_iter);
      sigmas[i].copy_(s);
      step_counts[i] = k;
    }
    return {sigmas, step_counts};
  }

  // Group operators of identical shape (and spatial size, for convolutions).
  std::map<std::vector<int64_t>, int64_t> index;
  std::vector<Group> groups;
  for (int64_t i = 0; i < total; ++i) {
    std::vector<int64_t> key(weights[i].sizes().begin(), weights[i].sizes().end());
    if (weights[i].dim() == 4) {
      key.push_back(us[i].size(2));
      key.push_back(us[i].size(3));
    }
    auto it = index.find(key);
    if (it == index.end()) {
      it = index.emplace(key, (int64_t)groups.size()).first;
      groups.emplace_back();
      groups.back().conv = weights[i].dim() == 4;
      groups.back().padding = weights[i].dim() == 4 ? weights[i].size(2) / 2 : 0;
    }
    groups[it->second].members.push_back(i);
  }
  for (auto& g : groups) {
    std::vector<at::Tensor> ws, uu, vv;
    for (auto i : g.members) {
      ws.push_back(weights[i]);
      uu.push_back(us[i]);
      vv.push_back(vs[i]);
    }
    if (g.conv) {
      std::vector<at::Tensor> wts;
      for (const auto& w : ws) wts.push_back(w.transpose(0, 1).flip({2, 3}));
      g.W = at::cat(ws, 0);
      g.Wt = at::cat(wts, 0);
      g.u = at::cat(uu, 1);
      g.v = at::cat(vv, 1);
    } else {
      g.W = at::stack(ws, 0);
      g.u = at::stack(uu, 0).reshape({g.size(), -1});
      g.v = at::stack(vv, 0).reshape({g.size(), -1});
    }
    g.v = g.normalize(g.v);
    const at::Tensor wv0 = g.op(g.v);
    g.u = g.normalize(wv0);
    g.steps = at::zeros({g.size()}, opts.dtype(at::kLong));
    if (tol_mode) {
      g.active = at::ones({g.size()}, opts.dtype(at::kBool));
      g.sigma_prev = at::linalg_vector_norm(g.rows(wv0), 2, {1});  // the warm start's estimates
    }
  }

  const int64_t steps = tol_mode ? max_iter : n_iter;
  for (int64_t it = 1; it <= steps; ++it) {
    bool any = false;
    for (auto& g : groups) {
      if (!g.any_active) continue;
      any = true;
      const at::Tensor v_new = g.normalize(g.op_t(g.u));
      const at::Tensor w = g.op(v_new);
      const at::Tensor sigma = at::linalg_vector_norm(g.rows(w), 2, {1});
      const at::Tensor u_new = g.unrows(g.rows(w) / sigma.clamp_min(1e-12).unsqueeze(1), w);
      if (!tol_mode) {
        g.u = u_new;
        g.v = v_new;
        g.sigma = sigma;
        continue;
      }
      // Per-operator mask: frozen operators keep u, v, sigma_prev and their step count.
      const at::Tensor act = g.active.unsqueeze(1);
      g.u = g.unrows(at::where(act, g.rows(u_new), g.rows(g.u)), g.u);
      g.v = g.unrows(at::where(act, g.rows(v_new), g.rows(g.v)), g.v);
      g.steps.add_(g.active.to(at::kLong));
      g.sigma = g.sigma.defined() ? at::where(g.active, sigma, g.sigma) : sigma;
      // The first step compares with the warm start's estimate (as in the reference).
      const at::Tensor conv = (sigma - g.sigma_prev).abs() <= tol * sigma;
      g.sigma_prev = at::where(g.active, sigma, g.sigma_prev);
      g.active = g.active & conv.logical_not();
      if (it % check_every == 0) g.any_active = g.active.any().item<bool>();
    }
    if (!any) break;
  }

  at::Tensor sigmas = at::empty({total}, opts);
  at::Tensor step_counts = at::empty({total}, opts.dtype(at::kLong));
  for (auto& g : groups) {
    // After at least one step sigma = ||op(v)|| = u^T op(v) (no extra operator application).
    const at::Tensor s = g.sigma.defined() ? g.sigma : (g.rows(g.u) * g.rows(g.op(g.v))).sum(1);
    const at::Tensor idx = at::tensor(g.members, at::TensorOptions().dtype(at::kLong)).to(opts.device());
    sigmas.index_copy_(0, idx, s);
    step_counts.index_copy_(0, idx, tol_mode ? g.steps : at::full({g.size()}, steps, g.steps.options()));
    for (int64_t j = 0; j < g.size(); ++j) {
      const int64_t i = g.members[j];
      if (g.conv) {
        us[i].copy_(g.u.narrow(1, j * us[i].size(1), us[i].size(1)));
        vs[i].copy_(g.v.narrow(1, j * vs[i].size(1), vs[i].size(1)));
      } else {
        us[i].copy_(g.u[j].view(us[i].sizes()));
        vs[i].copy_(g.v[j].view(vs[i].sizes()));
      }
    }
  }
  return {sigmas, step_counts};
}

// ---------------------------------------------------------------------------------------------
// Fixed-point steps: the update, the per-sample residual and the convergence mask in one pass
// ---------------------------------------------------------------------------------------------

void check_step_inputs(const char* op, const at::Tensor& x, const at::Tensor& gx, const at::Tensor& y,
                       const at::Tensor& thr, const at::Tensor& converged, const at::Tensor& residual,
                       const at::Tensor& counter) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (batch, features), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": x has dtype ",
              x.scalar_type(), "; expected float32 or float64");
  const std::pair<const char*, const at::Tensor*> same[] = {{"g(x)", &gx}, {"y", &y}, {"thr", &thr},
                                                            {"residual", &residual}};
  for (const auto& p : same) {
    TORCH_CHECK(p.second->device() == x.device(), op, ": ", p.first, " is on ", p.second->device(),
                " but x is on ", x.device(), " (mixed devices)");
    TORCH_CHECK(p.second->scalar_type() == x.scalar_type(), op, ": ", p.first, " has dtype ",
                p.second->scalar_type(), " but x has ", x.scalar_type(), " (dtype mismatch)");
    TORCH_CHECK(p.second->is_contiguous(), op, ": ", p.first, " is not contiguous");
  }
  TORCH_CHECK(x.is_contiguous(), op, ": x is not contiguous");
  TORCH_CHECK(gx.sizes() == x.sizes(), op, ": g(x) has shape ", gx.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": y has shape ", y.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK(thr.dim() == 1 && thr.size(0) == x.size(0) && residual.dim() == 1 && residual.size(0) == x.size(0),
              op, ": thr and residual must have shape (", x.size(0), ",)");
  TORCH_CHECK(converged.scalar_type() == at::kBool && converged.dim() == 1 && converged.size(0) == x.size(0) &&
                  converged.device() == x.device() && converged.is_contiguous(),
              op, ": converged must be a contiguous bool tensor of shape (", x.size(0), ",) on ", x.device());
  TORCH_CHECK(counter.scalar_type() == at::kInt && counter.numel() >= 1 && counter.device() == x.device() &&
                  counter.is_contiguous(),
              op, ": counter must be a contiguous int32 tensor on ", x.device());
}

template <typename T>
T row_residual(const T* x, const T* gx, const T* y, int64_t D) {
  T m = T(0);
  for (int64_t i = 0; i < D; ++i) {
    const T a = std::abs(x[i] + gx[i] - y[i]);
    if (a > m || std::isnan(a)) m = a;
    if (std::isnan(m)) break;
  }
  return m;
}

// Residual of sample b, stored; marks it converged when within its tolerance. Returns whether the
// sample stays open (the bookkeeping shared by the Banach and Anderson steps).
template <typename T>
bool row_stays_open(const T* xb, const T* gb, const T* yb, int64_t D, T thr, T* residual, bool* converged) {
  const T r = row_residual(xb, gb, yb, D);
  *residual = r;
  if (r <= thr) {
    *converged = true;
    return false;
  }
  return true;
}

void banach_step_cpu(at::Tensor& x, const at::Tensor& gx, const at::Tensor& y, const at::Tensor& thr,
                     at::Tensor& converged, at::Tensor& residual, at::Tensor& counter, bool update) {
  check_step_inputs("banach_step", x, gx, y, thr, converged, residual, counter);
  const int64_t B = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "banach_step", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gx.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* tp = thr.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    bool* cp = converged.data_ptr<bool>();
    std::vector<int32_t> open(B, 0);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (cp[b]) continue;
        scalar_t* xb = xp + b * D;
        const scalar_t* gb = gp + b * D;
        const scalar_t* yb = yp + b * D;
        if (!row_stays_open(xb, gb, yb, D, tp[b], rp + b, cp + b)) continue;
        open[b] = 1;
        if (update)
          for (int64_t i = 0; i < D; ++i) xb[i] = yb[i] - gb[i];
      }
    });
    int32_t n = 0;
    for (auto o : open) n += o;
    counter.data_ptr<int32_t>()[0] += n;
  });
}

void check_anderson_state(const at::Tensor& x, const at::Tensor& xh, const at::Tensor& fh, const at::Tensor& gram,
                          int64_t slot, int64_t filled) {
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(xh.dim() == 3 && xh.size(0) == B && xh.size(2) == D && fh.sizes() == xh.sizes(),
              "anderson_step: history must be (batch, memory, features) = (", B, ", m, ", D, "), got ",
              xh.sizes(), " and ", fh.sizes());
  const int64_t m = xh.size(1);
  TORCH_CHECK(m >= 1 && m <= kMaxAndersonMemory, "anderson_step: memory must be in [1, ", kMaxAndersonMemory,
              "], got ", m);
  TORCH_CHECK(slot >= 0 && slot < m && filled >= 1 && filled <= m && slot < filled,
              "anderson_step: bad ring-buffer position slot=", slot, " filled=", filled, " memory=", m);
  for (const auto* t : {&xh, &fh}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
                "anderson_step: history tensors must be contiguous, on ", x.device(), ", of dtype ", x.scalar_type());
  }
  TORCH_CHECK(gram.scalar_type() == at::kDouble && gram.dim() == 3 && gram.size(0) == B && gram.size(1) == m &&
                  gram.size(2) == m && gram.device() == x.device() && gram.is_contiguous(),
              "anderson_step: gram must be a contiguous float64 tensor of shape (", B, ", ", m, ", ", m, ") on ",
              x.device());
}

void anderson_step_cpu(at::Tensor& x, const at::Tensor& gx, const at::Tensor& y, const at::Tensor& thr,
                       at::Tensor& converged, at::Tensor& residual, at::Tensor& counter, at::Tensor& xh,
                       at::Tensor& fh, at::Tensor& gram, int64_t slot, int64_t filled, double reg, double beta,
                       bool update) {
  check_step_inputs("anderson_step", x, gx, y, thr, converged, residual, counter);
  check_anderson_state(x, xh, fh, gram, slot, filled);
  const int64_t B = x.size(0), D = x.size(1);
  const int m = (int)xh.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anderson_step", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gx.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* tp = thr.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    scalar_t* xhp = xh.data_ptr<scalar_t>();
    scalar_t* fhp = fh.data_ptr<scalar_t>();
    double* gp2 = gram.data_ptr<double>();
    bool* cp = converged.data_ptr<bool>();
    std::vector<int32_t> open(B, 0);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (cp[b]) continue;
        scalar_t* xb = xp + b * D;
        const scalar_t* gb = gp + b * D;
        const scalar_t* yb = yp + b * D;
        if (!row_stays_open(xb, gb, yb, D, tp[b], rp + b, cp + b)) continue;
        open[b] = 1;
        if (!update) continue;
        scalar_t* xs = xhp + (b * m + slot) * D;
        scalar_t* fs = fhp + (b * m + slot) * D;
        for (int64_t i = 0; i < D; ++i) {
          xs[i] = xb[i];
          fs[i] = yb[i] - gb[i] - xb[i];
        }
        double* G = gp2 + b * m * m;
        for (int j = 0; j < filled; ++j) {
          const scalar_t* fj = fhp + (b * m + j) * D;
          double s = 0.0;
          for (int64_t i = 0; i < D; ++i) s += (double)fs[i] * (double)fj[i];
          G[slot * m + j] = s;
          G[j * m + slot] = s;
        }
        double alpha[kMaxAndersonMemory];
        acf_anderson::anderson_weights(G, m, (int)filled, (int)slot, reg, alpha);
        for (int64_t i = 0; i < D; ++i) {
          const double base = (double)xs[i] + beta * (double)fs[i];
          double s = base;
          for (int j = 0; j < filled; ++j) {
            if (j == slot) continue;
            const int64_t o = (b * m + j) * D + i;
            s += alpha[j] * ((double)xhp[o] + beta * (double)fhp[o] - base);
          }
          xb[i] = (scalar_t)s;
        }
      }
    });
    int32_t n = 0;
    for (auto o : open) n += o;
    counter.data_ptr<int32_t>()[0] += n;
  });
}

#ifdef WITH_CUDA
void check_cuda_launch(const char* op) {
  const char* err = acf_cuda::last_error();
  TORCH_CHECK(err[0] == '\0', op, ": CUDA kernel launch failed: ", err);
}

void banach_step_cuda(at::Tensor& x, const at::Tensor& gx, const at::Tensor& y, const at::Tensor& thr,
                      at::Tensor& converged, at::Tensor& residual, at::Tensor& counter, bool update) {
  check_step_inputs("banach_step", x, gx, y, thr, converged, residual, counter);
  const c10::cuda::CUDAGuard guard(x.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (x.scalar_type() == at::kFloat) {
    acf_cuda::banach_step<float>(x.data_ptr<float>(), gx.data_ptr<float>(), y.data_ptr<float>(),
                                 thr.data_ptr<float>(), converged.data_ptr<bool>(), residual.data_ptr<float>(),
                                 counter.data_ptr<int32_t>(), x.size(0), x.size(1), update, stream);
  } else {
    acf_cuda::banach_step<double>(x.data_ptr<double>(), gx.data_ptr<double>(), y.data_ptr<double>(),
                                  thr.data_ptr<double>(), converged.data_ptr<bool>(), residual.data_ptr<double>(),
                                  counter.data_ptr<int32_t>(), x.size(0), x.size(1), update, stream);
  }
  check_cuda_launch("banach_step");
}

void anderson_step_cuda(at::Tensor& x, const at::Tensor& gx, const at::Tensor& y, const at::Tensor& thr,
                        at::Tensor& converged, at::Tensor& residual, at::Tensor& counter, at::Tensor& xh,
                        at::Tensor& fh, at::Tensor& gram, int64_t slot, int64_t filled, double reg, double beta,
                        bool update) {
  check_step_inputs("anderson_step", x, gx, y, thr, converged, residual, counter);
  check_anderson_state(x, xh, fh, gram, slot, filled);
  const c10::cuda::CUDAGuard guard(x.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int m = (int)xh.size(1);
  if (x.scalar_type() == at::kFloat) {
    acf_cuda::anderson_step<float>(x.data_ptr<float>(), gx.data_ptr<float>(), y.data_ptr<float>(),
                                   thr.data_ptr<float>(), converged.data_ptr<bool>(), residual.data_ptr<float>(),
                                   counter.data_ptr<int32_t>(), xh.data_ptr<float>(), fh.data_ptr<float>(),
                                   gram.data_ptr<double>(), x.size(0), x.size(1), m, (int)slot, (int)filled, reg,
                                   beta, update, stream);
  } else {
    acf_cuda::anderson_step<double>(x.data_ptr<double>(), gx.data_ptr<double>(), y.data_ptr<double>(),
                                    thr.data_ptr<double>(), converged.data_ptr<bool>(),
                                    residual.data_ptr<double>(), counter.data_ptr<int32_t>(), xh.data_ptr<double>(),
                                    fh.data_ptr<double>(), gram.data_ptr<double>(), x.size(0), x.size(1), m,
                                    (int)slot, (int)filled, reg, beta, update, stream);
  }
  check_cuda_launch("anderson_step");
}
#endif

}  // namespace

TORCH_LIBRARY(acf, m) {
  m.def("power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol, "
        "int max_iter, int check_every, int strategy=0) -> (Tensor, Tensor)");
  m.def("banach_step(Tensor(a!) x, Tensor gx, Tensor y, Tensor thr, Tensor(b!) converged, "
        "Tensor(c!) residual, Tensor(d!) counter, bool update) -> ()");
  m.def("anderson_step(Tensor(a!) x, Tensor gx, Tensor y, Tensor thr, Tensor(b!) converged, "
        "Tensor(c!) residual, Tensor(d!) counter, Tensor(e!) xh, Tensor(f!) fh, Tensor(g!) gram, int slot, "
        "int filled, float reg, float beta, bool update) -> ()");
}

// power_iteration is built from ATen ops and runs on any device.
TORCH_LIBRARY_IMPL(acf, CompositeExplicitAutograd, m) { m.impl("power_iteration", &power_iteration); }

TORCH_LIBRARY_IMPL(acf, CPU, m) {
  m.impl("banach_step", &banach_step_cpu);
  m.impl("anderson_step", &anderson_step_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(acf, CUDA, m) {
  m.impl("banach_step", &banach_step_cuda);
  m.impl("anderson_step", &anderson_step_cuda);
}
#endif

// A minimal Python module so that `import acf._C` loads the library (and registers the ops).
static struct PyModuleDef acf_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                          "ACF compiled extension: operators under torch.ops.acf", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&acf_c_module);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  PyModule_AddIntConstant(mod, "MAX_ANDERSON_MEMORY", kMaxAndersonMemory);
  return mod;
}
