// Raw-pointer CUDA launchers of the fixed_point op (implemented in fixed_point_cuda.cu).
//
// This header deliberately includes no torch and no CUDA headers: fixed_point_cuda.cu compiles standalone
// with `nvcc -c csrc/fixed_point_cuda.cu`, and fixed_point.cpp binds them only when built WITH_CUDA.
// All tensors are row-major, contiguous, on the current device; `stream` is a cudaStream_t.
#pragma once
#include <cstdint>

#include "fixed_point_anderson.h"

namespace acf_cuda {

constexpr int kMaxAndersonMemory = acf_anderson::kMaxMemory;

// One Banach step for every sample b in [0, B) that has not converged yet (rows of length D):
//   residual[b] = max_i |x + gx - y|;  converged[b] = residual[b] <= thr[b];
//   else, if `update`, x = y - gx and counter[0] += 1 (number of samples still unconverged).
template <typename T>
void banach_step(T* x, const T* gx, const T* y, const T* thr, bool* converged, T* residual,
                 int32_t* counter, int64_t B, int64_t D, bool update, void* stream);

// One Anderson step (type II, memory m, ring-buffer slot `slot`, `filled` slots valid after this
// step) for every unconverged sample: residual check as above, then with f = y - gx - x:
//   xh[b, slot] = x, fh[b, slot] = f, gram[b, slot, j] = gram[b, j, slot] = <f, fh[b, j]>,
//   alpha = (G + reg I)^-1 1 / sum(...), x = sum_j alpha_j (xh_j + beta fh_j)  (if `update`).
template <typename T>
void anderson_step(T* x, const T* gx, const T* y, const T* thr, bool* converged, T* residual,
                   int32_t* counter, T* xh, T* fh, double* gram, int64_t B, int64_t D, int m,
                   int slot, int filled, double reg, double beta, bool update, void* stream);

// Human-readable description of the last CUDA error (empty if none); clears it.
const char* last_error();

}  // namespace acf_cuda
