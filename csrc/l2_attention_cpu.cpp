// L2 self-attention with keys tied to queries on CPU: the operators l2_attention_fwd / _bwd / _bwd2
// (forward, VJP and double VJP, fused per row; the math is stated in l2_attention_cpu_kernels.h,
// the kernels are in l2_attention_cpu_tiled.h and l2_attention_cpu_blocked.h) and cpu_isa().
//
// One build runs fast on every x86-64 CPU: the kernels are compiled three times from the one source,
// for AVX-512 (64-byte vectors), AVX2 + FMA (32 bytes) and the baseline (the build's own flags:
// SSE2 on x86-64, NEON on aarch64), and the first call picks the widest variant this CPU supports
// (__builtin_cpu_supports, checked once and cached). ACF_CPU_ISA=avx2 or baseline (read once, at
// the first call) forces a narrower one, for tests and measurements; torch.ops.acf.cpu_isa() names
// the variant in use. An extension built with ACF_NATIVE=1 (-march=native for the whole extension)
// has one variant, "native". Measured side by side (bench/bench_cpu_isa.py,
// bench/results/2026-11-30-cpu-isa-dispatch.md): the dispatched AVX-512 variant is within 5% of a
// -march=native build on every shape; the AVX2 variant takes 1.4-1.7x its time, the SSE2 one 3.2-4.2x.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <tuple>

#include "l2_attention_cpu.h"

namespace acf_l2_cpu {
namespace {

void check_head(const at::Tensor& t, const char* name, int64_t bh, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "l2_attention (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == bh && t.size(1) == n, "l2_attention (cpu): ", name,
              " must be (batch*heads, N, dim) = (", bh, ", ", n, ", dim), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "l2_attention (cpu): ", name, " has dtype ", t.scalar_type(),
              "; expected ", dtype);
}

void check_q(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 3, "l2_attention (cpu): q must be (batch*heads, N, d), got ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), "l2_attention (cpu): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "l2_attention (cpu): q must be float32 or float64, got ", q.scalar_type());
}

void check_dims(const at::Tensor& t, const char* name, int64_t dim, const char* like) {
  TORCH_CHECK(t.size(2) == dim, "l2_attention (cpu): ", name, " must match ", like, " in its last dim (", dim,
              "), got ", t.sizes());
}

void check_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.scalar_type() == q.scalar_type() && lse.device().is_cpu(),
              "l2_attention (cpu): lse must be (batch*heads, N) of q's dtype, got ", lse.sizes());
}


// One variant's entry points: the register-tiled kernels and the blocked ones.
struct Variant {
  const char* name;
  decltype(&baseline::fwd_tiled) fwd_tiled, fwd_blocked;
  decltype(&baseline::bwd_tiled) bwd_tiled, bwd_blocked;
  decltype(&baseline::bwd2_tiled) bwd2_tiled, bwd2_blocked;
};

#if defined(ACF_NATIVE_BUILD)
constexpr const char* kBaselineName = "native";
#else
constexpr const char* kBaselineName = "baseline";
#endif

// Widest first.
const Variant kVariants[] = {
#if ACF_L2_X86_VARIANTS
    {"avx512", &avx512::fwd_tiled, &avx512::fwd_blocked, &avx512::bwd_tiled, &avx512::bwd_blocked,
     &avx512::bwd2_tiled, &avx512::bwd2_blocked},
    {"avx2", &avx2::fwd_tiled, &avx2::fwd_blocked, &avx2::bwd_tiled, &avx2::bwd_blocked,
     &avx2::bwd2_tiled, &avx2::bwd2_blocked},
#endif
    {kBaselineName, &baseline::fwd_tiled, &baseline::fwd_blocked, &baseline::bwd_tiled, &baseline::bwd_blocked,
     &baseline::bwd2_tiled, &baseline::bwd2_blocked},
};

bool supported(const Variant& variant) {
  const std::string name = variant.name;
#if ACF_L2_X86_VARIANTS
  if (name == "avx512") return cpu_has_avx512();
  if (name == "avx2") return cpu_has_avx2();
#endif
  return true;  // the baseline
}

// The widest supported variant, or the one ACF_CPU_ISA names ("auto" or unset: the widest).
const Variant& choose() {
  const char* env = std::getenv("ACF_CPU_ISA");
  std::string want = env ? env : "";
  want.erase(std::remove_if(want.begin(), want.end(), [](unsigned char ch) { return std::isspace(ch); }), want.end());
  std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) { return std::tolower(ch); });
  std::string names, runnable;
  for (const Variant& variant : kVariants) {
    names += std::string(names.empty() ? "" : ", ") + variant.name;
    if (supported(variant)) runnable += std::string(runnable.empty() ? "" : ", ") + variant.name;
  }
  for (const Variant& variant : kVariants) {
    if (want.empty() || want == "auto") {
      if (supported(variant)) return variant;
    } else if (want == variant.name) {
      TORCH_CHECK(supported(variant), "ACF_CPU_ISA=", want, ": this CPU does not support it; it runs ", runnable);
      return variant;
    }
  }
  TORCH_CHECK(false, "ACF_CPU_ISA=", want, " is not a variant of this build of acf._C: auto, ", names);
}

const Variant& variant() {
  static const Variant& chosen = choose();  // once (an exception leaves it unset: the next call retries)
  return chosen;
}

std::string cpu_isa() { return variant().name; }

// Which kernels run: the register tiles while every product's inner dimension fits them
// (max(d, e) <= kTiledMaxDim), the blocked GEMMs above, where BLAS's packed kernels win (measured
// side by side over head dims 8-128: bench/bench_l2_attention.py --crossover). ACF_L2_CPU_KERNEL=tiled
// or blocked (read at every call) forces one, for tests and measurements.
constexpr int64_t kTiledMaxDim = 16;

bool blocked(const at::Tensor& q, const at::Tensor& v) {
  const char* env = std::getenv("ACF_L2_CPU_KERNEL");
  const std::string want = env ? env : "";
  if (want == "tiled") return false;
  if (want == "blocked") return true;
  TORCH_CHECK(want.empty() || want == "auto", "ACF_L2_CPU_KERNEL=", want, ": expected auto, tiled or blocked");
  return std::max(q.size(2), v.size(2)) > kTiledMaxDim;
}

std::tuple<at::Tensor, at::Tensor> l2_attention_fwd(const at::Tensor& q, const at::Tensor& v, double scale) {
  check_q(q);
  check_head(v, "v", q.size(0), q.size(1), q.scalar_type());
  return (blocked(q, v) ? variant().fwd_blocked : variant().fwd_tiled)(q, v, scale);
}

std::tuple<at::Tensor, at::Tensor> l2_attention_bwd(const at::Tensor& q, const at::Tensor& v, const at::Tensor& o,
                                                    const at::Tensor& lse, const at::Tensor& g, double scale) {
  check_q(q);
  for (auto [t, name] : {std::pair{v, "v"}, {o, "o"}, {g, "g"}}) {
    check_head(t, name, q.size(0), q.size(1), q.scalar_type());
    check_dims(t, name, v.size(2), "v");
  }
  check_lse(lse, q);
  return (blocked(q, v) ? variant().bwd_blocked : variant().bwd_tiled)(q, v, o, lse.contiguous(), g, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> l2_attention_bwd2(const at::Tensor& q, const at::Tensor& v,
                                                                 const at::Tensor& o, const at::Tensor& lse,
                                                                 const at::Tensor& g, const at::Tensor& u,
                                                                 const at::Tensor& w, double scale) {
  check_q(q);
  check_head(u, "u", q.size(0), q.size(1), q.scalar_type());
  check_dims(u, "u", q.size(2), "q");
  for (auto [t, name] : {std::pair{v, "v"}, {o, "o"}, {g, "g"}, {w, "w"}}) {
    check_head(t, name, q.size(0), q.size(1), q.scalar_type());
    check_dims(t, name, v.size(2), "v");
  }
  check_lse(lse, q);
  return (blocked(q, v) ? variant().bwd2_blocked : variant().bwd2_tiled)(q, v, o, lse.contiguous(), g, u, w, scale);
}

}  // namespace
}  // namespace acf_l2_cpu

TORCH_LIBRARY_FRAGMENT(acf, m) {
  m.def("l2_attention_fwd(Tensor q, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("l2_attention_bwd(Tensor q, Tensor v, Tensor o, Tensor lse, Tensor g, float scale) -> (Tensor, Tensor)");
  m.def("l2_attention_bwd2(Tensor q, Tensor v, Tensor o, Tensor lse, Tensor g, Tensor u, Tensor w, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // The kernel variant in use: "avx512", "avx2", "baseline" (or "native" in an ACF_NATIVE=1 build).
  m.def("cpu_isa() -> str", &acf_l2_cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(acf, CPU, m) {
  m.impl("l2_attention_fwd", &acf_l2_cpu::l2_attention_fwd);
  m.impl("l2_attention_bwd", &acf_l2_cpu::l2_attention_bwd);
  m.impl("l2_attention_bwd2", &acf_l2_cpu::l2_attention_bwd2);
}
