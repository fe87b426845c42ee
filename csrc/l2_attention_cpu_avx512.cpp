// The CPU L2 attention kernels for AVX-512 (F, CD, VL, BW, DQ: x86-64-v4), 64-byte vectors and the
// vscalefps exponential; called only on CPUs that have those features
// (acf_l2_cpu::cpu_has_avx512). Empty on other architectures and in -march=native builds.
#include "l2_attention_cpu.h"
#if ACF_L2_X86_VARIANTS
#define ACF_L2_VARIANT_AVX512
#include "l2_attention_cpu_kernels.h"
#endif
