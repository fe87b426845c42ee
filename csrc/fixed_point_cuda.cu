// CUDA kernels of acf._C: fused fixed-point steps (Banach, Anderson) with a per-sample
// convergence mask and a device-side count of unconverged samples (no host synchronisation).
// Raw pointers only: this file includes no torch header and compiles with plain `nvcc -c`.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fixed_point_cuda.h"

namespace acf_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// NaN-propagating max: a NaN residual must never count as converged.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max; every thread gets the result.
template <typename T>
__device__ T block_max(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = nan_max(r, smem[w]);
  __syncthreads();
  return r;
}

template <typename T>
__global__ void banach_kernel(T* __restrict__ x, const T* __restrict__ gx, const T* __restrict__ y,
                              const T* __restrict__ thr, bool* __restrict__ converged,
                              T* __restrict__ residual, int32_t* __restrict__ counter, int64_t D,
                              bool update) {
  __shared__ T smem[kWarps];
  const int64_t b = blockIdx.x;
  if (converged[b]) return;  // frozen: the same for every thread of the block
  T* xb = x + b * D;
  const T* gb = gx + b * D;
  const T* yb = y + b * D;
  T m = T(0);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) m = nan_max(m, T(fabs(xb[i] + gb[i] - yb[i])));
  m = block_max(m, smem);
  const bool done = m <= thr[b];
  if (threadIdx.x == 0) {
    residual[b] = m;
    if (done) converged[b] = true;
    else atomicAdd(counter, 1);
  }
  if (done || !update) return;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) xb[i] = yb[i] - gb[i];
}

template <typename T>
__global__ void anderson_kernel(T* __restrict__ x, const T* __restrict__ gx, const T* __restrict__ y,
                                const T* __restrict__ thr, bool* __restrict__ converged,
                                T* __restrict__ residual, int32_t* __restrict__ counter,
                                T* __restrict__ xh, T* __restrict__ fh, double* __restrict__ gram,
                                int64_t D, int m, int slot, int filled, double reg, double beta,
                                bool update) {
  __shared__ T smax[kWarps];
  __shared__ double sdot[kMaxAndersonMemory][kWarps];
  __shared__ double salpha[kMaxAndersonMemory];
  __shared__ double schol[kMaxAndersonMemory * kMaxAndersonMemory];  // thread 0's Cholesky factor
  const int64_t b = blockIdx.x;
  if (converged[b]) return;
  T* xb = x + b * D;
  const T* gb = gx + b * D;
  const T* yb = y + b * D;
  T* xhb = xh + b * (int64_t)m * D;
  T* fhb = fh + b * (int64_t)m * D;
  double* G = gram + b * (int64_t)m * m;

  // 1. residual and convergence (f = y - gx - x = -(x + gx - y))
  T mx = T(0);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) mx = nan_max(mx, T(fabs(yb[i] - gb[i] - xb[i])));
  mx = block_max(mx, smax);
  const bool done = mx <= thr[b];
  if (threadIdx.x == 0) {
    residual[b] = mx;
    if (done) converged[b] = true;
    else atomicAdd(counter, 1);
  }
  if (done || !update) return;

  // 2. push (x, f) into the ring buffer; inner products of f with every stored residual. The loops
  // over j run to the compile-time maximum (guarded by j < filled) and are unrolled, so that acc is
  // indexed by constants and lives in registers (56 per thread instead of 34): with a run-time bound
  // it was a 128-byte stack frame in local memory (ptxas -v), read and written for every element.
  double acc[kMaxAndersonMemory];
#pragma unroll
  for (int j = 0; j < kMaxAndersonMemory; ++j) acc[j] = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const T f = yb[i] - gb[i] - xb[i];
    xhb[slot * D + i] = xb[i];
    fhb[slot * D + i] = f;
    const double fd = (double)f;
#pragma unroll
    for (int j = 0; j < kMaxAndersonMemory; ++j)
      if (j < filled) acc[j] += fd * (double)(j == slot ? f : fhb[j * D + i]);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kMaxAndersonMemory; ++j) {
    if (j >= filled) break;  // filled is the same for the whole block: the shuffles stay converged
    const double s = warp_sum(acc[j]);
    if (lane == 0) sdot[j][warp] = s;
  }
  __syncthreads();

  // 3. thread 0: update the Gram matrix, solve (G + reg I) z = 1 by Cholesky, alpha = z / sum z
  if (threadIdx.x == 0) {
    for (int j = 0; j < filled; ++j) {
      double s = 0.0;
      for (int w = 0; w < kWarps; ++w) s += sdot[j][w];
      G[slot * m + j] = s;
      G[j * m + slot] = s;
    }
    acf_anderson::anderson_weights(G, m, filled, slot, reg, salpha, schol);
  }
  __syncthreads();

  // 4. x = xk + beta fk + sum_j alpha_j ((xh_j + beta fh_j) - (xk + beta fk))  (sum alpha = 1)
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double base = (double)xhb[slot * D + i] + beta * (double)fhb[slot * D + i];
    double s = base;
    for (int j = 0; j < filled; ++j) {
      if (j == slot) continue;
      s += salpha[j] * ((double)xhb[j * D + i] + beta * (double)fhb[j * D + i] - base);
    }
    xb[i] = (T)s;
  }
}

}  // namespace

template <typename T>
void banach_step(T* x, const T* gx, const T* y, const T* thr, bool* converged, T* residual,
                 int32_t* counter, int64_t B, int64_t D, bool update, void* stream) {
  if (B == 0) return;
  banach_kernel<T><<<(unsigned)B, kThreads, 0, (cudaStream_t)stream>>>(x, gx, y, thr, converged, residual,
                                                                      counter, D, update);
}

template <typename T>
void anderson_step(T* x, const T* gx, const T* y, const T* thr, bool* converged, T* residual,
                   int32_t* counter, T* xh, T* fh, double* gram, int64_t B, int64_t D, int m,
                   int slot, int filled, double reg, double beta, bool update, void* stream) {
  if (B == 0) return;
  anderson_kernel<T><<<(unsigned)B, kThreads, 0, (cudaStream_t)stream>>>(
      x, gx, y, thr, converged, residual, counter, xh, fh, gram, D, m, slot, filled, reg, beta, update);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

template void banach_step<float>(float*, const float*, const float*, const float*, bool*, float*, int32_t*,
                                 int64_t, int64_t, bool, void*);
template void banach_step<double>(double*, const double*, const double*, const double*, bool*, double*,
                                  int32_t*, int64_t, int64_t, bool, void*);
template void anderson_step<float>(float*, const float*, const float*, const float*, bool*, float*, int32_t*,
                                   float*, float*, double*, int64_t, int64_t, int, int, int, double, double,
                                   bool, void*);
template void anderson_step<double>(double*, const double*, const double*, const double*, bool*, double*,
                                    int32_t*, double*, double*, double*, int64_t, int64_t, int, int, int,
                                    double, double, bool, void*);

}  // namespace acf_cuda
