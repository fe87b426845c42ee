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
// Where the code is. This file sets up one instruction-set variant and includes its parts:
//   l2_attention_cpu_vec.h      the vector helpers (Vec, loads and stores, lane sums, 2^x) and Heads;
//   l2_attention_cpu_tiled.h    the register-tiled kernels fwd_tiled, bwd_tiled, bwd2_tiled, which pay off
//                               while the head dim is small (products with an inner dimension of 8-16
//                               leave BLAS idle);
//   l2_attention_cpu_blocked.h  the blocked kernels fwd_blocked, bwd_blocked, bwd2_blocked, which make
//                               every product a batched BLAS GEMM and fuse the elementwise steps around
//                               it, and win above.
// Both kernels compute that math on the same layout of the inputs; l2_attention_cpu.cpp picks one by
// head dim (its kTiledMaxDim says where; python bench/bench_l2_attention.py --crossover measures both
// against the reference).
// The parts include nothing themselves: every library header is included here, before the variant's
// target is pushed, so that no library code is compiled for a wider instruction set.
//
// These files are the one copy of the kernels: each csrc/l2_attention_cpu_<variant>.cpp includes this
// one once, for one instruction set, into namespace acf_l2_cpu::<variant> (l2_attention_cpu.h says
// which, and l2_attention_cpu.cpp picks one at run time). The including file defines
// ACF_L2_VARIANT_AVX512 or ACF_L2_VARIANT_AVX2 (their code is compiled under `#pragma GCC target`,
// pushed after the library headers so that no inline function of torch or the standard library
// is compiled for a wider instruction set than the rest of the extension), or neither (the
// baseline: the build's own flags).
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

#include "l2_attention_cpu_vec.h"
#include "l2_attention_cpu_tiled.h"
#include "l2_attention_cpu_blocked.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#if defined(ACF_L2_TARGET)
ACF_L2_TARGET_POP
#endif
