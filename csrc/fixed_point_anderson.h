// The small per-sample solve of Anderson mixing, shared by the CPU (fixed_point.cpp) and CUDA
// (fixed_point_cuda.cu) steps. No torch and no CUDA headers: it compiles under g++ and nvcc alike.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define ACF_HOST_DEVICE __host__ __device__
#else
#define ACF_HOST_DEVICE
#endif

namespace acf_anderson {

constexpr int kMaxMemory = 16;

ACF_HOST_DEVICE inline double root(double v) {
#ifdef __CUDA_ARCH__
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

ACF_HOST_DEVICE inline bool finite(double v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Solve (G + reg * max(diag G) I) z = 1 by Cholesky (G is n x n inside an m-strided buffer,
// n <= kMaxMemory); alpha = z / sum(z). Falls back to alpha = e_slot (a plain Banach step) if the
// system is not positive definite or the weights are not finite.
//
// `L` is caller-provided scratch for the Cholesky factor (n * n <= kMaxMemory^2 doubles, 2 KiB), and z
// is solved in place in `alpha`. The CUDA kernel passes shared memory: as local arrays of this
// function, the factor and z were a 2,176-byte stack frame in local memory for every thread of the
// kernel (ptxas -v), although only thread 0 runs the solve, and the driver reserves local memory for
// the stack frame of every thread that can be resident on the GPU.
ACF_HOST_DEVICE inline void anderson_weights(const double* G, int m, int n, int slot, double reg, double* alpha,
                                             double* L) {
  double* z = alpha;
  double dmax = 0.0;
  for (int i = 0; i < n; ++i) dmax = G[i * m + i] > dmax ? G[i * m + i] : dmax;
  const double lam = reg * (dmax > 0.0 ? dmax : 1.0);
  bool ok = true;
  for (int i = 0; i < n && ok; ++i) {
    for (int j = 0; j <= i; ++j) {
      double s = G[i * m + j] + (i == j ? lam : 0.0);
      for (int k = 0; k < j; ++k) s -= L[i * n + k] * L[j * n + k];
      if (i == j) {
        if (!(s > 0.0)) {
          ok = false;
          break;
        }
        L[i * n + i] = root(s);
      } else {
        L[i * n + j] = s / L[j * n + j];
      }
    }
  }
  double total = 0.0;
  if (ok) {
    for (int i = 0; i < n; ++i) {  // L w = 1
      double s = 1.0;
      for (int k = 0; k < i; ++k) s -= L[i * n + k] * z[k];
      z[i] = s / L[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {  // L^T z = w
      double s = z[i];
      for (int k = i + 1; k < n; ++k) s -= L[k * n + i] * z[k];
      z[i] = s / L[i * n + i];
    }
    for (int i = 0; i < n; ++i) total += z[i];
    ok = finite(total) && total != 0.0;
  }
  for (int i = 0; i < n; ++i) alpha[i] = ok ? z[i] / total : (i == slot ? 1.0 : 0.0);
}

}  // namespace acf_anderson
