// The CPU L2 attention kernels for AVX2 + FMA (x86-64-v3), 32-byte vectors; called only on CPUs
// that have those features (acf_l2_cpu::cpu_has_avx2). Empty on other architectures and in
// -march=native builds.
#include "l2_attention_cpu.h"
#if ACF_L2_X86_VARIANTS
#define ACF_L2_VARIANT_AVX2
#include "l2_attention_cpu_kernels.h"
#endif
