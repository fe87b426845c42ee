// The fixed_point ops of acf._C (torch.ops.acf.banach_step, anderson_step): one step of the inverse of
// x + g(x) = y for every unconverged sample, fused with its residual and convergence mask. CPU kernels
// here; CUDA kernels in fixed_point_cuda.cu, bound below when built WITH_CUDA. Python face and
// reference: acf/ops/fixed_point.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fixed_point_anderson.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "fixed_point_cuda.h"
#endif

namespace {

constexpr int kMaxAndersonMemory = acf_anderson::kMaxMemory;

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
        double chol[kMaxAndersonMemory * kMaxAndersonMemory];
        acf_anderson::anderson_weights(G, m, (int)filled, (int)slot, reg, alpha, chol);
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

TORCH_LIBRARY_FRAGMENT(acf, m) {
  m.def("banach_step(Tensor(a!) x, Tensor gx, Tensor y, Tensor thr, Tensor(b!) converged, "
        "Tensor(c!) residual, Tensor(d!) counter, bool update) -> ()");
  m.def("anderson_step(Tensor(a!) x, Tensor gx, Tensor y, Tensor thr, Tensor(b!) converged, "
        "Tensor(c!) residual, Tensor(d!) counter, Tensor(e!) xh, Tensor(f!) fh, Tensor(g!) gram, int slot, "
        "int filled, float reg, float beta, bool update) -> ()");
}

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
