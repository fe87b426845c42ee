// The CPU L2 attention kernels for the build's own target (x86-64: SSE2, 16-byte vectors; aarch64:
// NEON; with ACF_NATIVE=1 the build machine's widest): the variant every CPU runs.
#include "l2_attention_cpu_kernels.h"
