// The CPU L2 attention kernels, compiled once per instruction set, and what picks one at run time.
//
// csrc/l2_attention_cpu_kernels.h holds the kernels (the one copy of the math; it includes
// l2_attention_cpu_vec.h, l2_attention_cpu_tiled.h and l2_attention_cpu_blocked.h). It is compiled by
//   l2_attention_cpu_baseline.cpp  for the build's own target (x86-64: SSE2; aarch64: NEON;
//                                  -march=native with ACF_NATIVE=1),
//   l2_attention_cpu_avx2.cpp      under ACF_L2_AVX2_TARGET   (x86-64 only),
//   l2_attention_cpu_avx512.cpp    under ACF_L2_AVX512_TARGET (x86-64 only),
// each into its own namespace, and l2_attention_cpu.cpp registers the operators and calls the
// widest variant this CPU runs (cpu_has_avx2 / cpu_has_avx512 test exactly the features the
// targets enable).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

// The variants beyond the baseline: x86-64 builds that are not -march=native (ACF_NATIVE=1
// defines ACF_NATIVE_BUILD: the whole extension then has one variant, for the build machine).
#if (defined(__x86_64__) || defined(__amd64__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ACF_NATIVE_BUILD)
#define ACF_L2_X86_VARIANTS 1
#else
#define ACF_L2_X86_VARIANTS 0
#endif

// The features each variant is compiled for (x86-64-v3's and x86-64-v4's vector and bit-manipulation
// sets) and tested for at run time; keep the two lists in step.
#define ACF_L2_AVX2_TARGET "avx,avx2,fma,bmi,bmi2,popcnt"
#define ACF_L2_AVX512_TARGET ACF_L2_AVX2_TARGET ",avx512f,avx512cd,avx512vl,avx512bw,avx512dq"

namespace acf_l2_cpu {

#if ACF_L2_X86_VARIANTS
// __builtin_cpu_supports also checks that the OS saves the YMM / ZMM registers (XGETBV).
inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
inline bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
}
#endif

// The entry points of one variant: the register-tiled kernels (*_tiled) and the blocked ones
// (*_blocked); l2_attention_cpu.cpp says which runs where. The inputs are checked by the caller
// (l2_attention_cpu.cpp): (B*H, N, dim) CPU tensors of one floating dtype, lse contiguous.
#define ACF_L2_DECLARE_PASSES(suffix)                                                                      \
  std::tuple<at::Tensor, at::Tensor> fwd##suffix(const at::Tensor& q, const at::Tensor& v, double scale);  \
  std::tuple<at::Tensor, at::Tensor> bwd##suffix(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o, \
                                                 const at::Tensor& lse, const at::Tensor& g, double scale); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd2##suffix(                                              \
      const at::Tensor& q, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,                 \
      const at::Tensor& g, const at::Tensor& u, const at::Tensor& w, double scale);
#define ACF_L2_DECLARE_VARIANT(ns) \
  namespace ns {                   \
  ACF_L2_DECLARE_PASSES(_tiled)    \
  ACF_L2_DECLARE_PASSES(_blocked)  \
  }

ACF_L2_DECLARE_VARIANT(baseline)
#if ACF_L2_X86_VARIANTS
ACF_L2_DECLARE_VARIANT(avx2)
ACF_L2_DECLARE_VARIANT(avx512)
#endif

}  // namespace acf_l2_cpu
