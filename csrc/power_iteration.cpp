// The power_iteration op of acf._C (torch.ops.acf.power_iteration): spectral norms of many operators
// (dense matrices and kxk 'same' convolutions at an input size) by power iteration, warm-started from
// and updating persistent u/v. Its Python face and reference are in acf/ops/power_iteration.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Batched power iteration
// ---------------------------------------------------------------------------------------------

// Divide each row of a (G, n) tensor by its 2-norm (clamped like acf.ops.power_iteration._normalize).
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

// CPU: one operator after the other, exactly the reference's steps (acf.ops.power_iteration.power_iteration),
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
// Returns (sigma = u^T op(v) per operator, steps per operator). Mirrors acf.ops.power_iteration.power_iteration.
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(acf, m) {
  m.def("power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol, "
        "int max_iter, int check_every, int strategy=0) -> (Tensor, Tensor)");
}

// Built from ATen ops: runs on any device.
TORCH_LIBRARY_IMPL(acf, CompositeExplicitAutograd, m) { m.impl("power_iteration", &power_iteration); }
