// Kernel K1, CPU backend (OpenMP): fused channel + patch statistics and their closed-form backward.
//
// Forward. Statistics are accumulated per tile: a tile is one p x p patch of one (b, c) plane for an
// NCHW x, or one p x p patch over all channels of one sample for a channels_last x (patch == 0: the
// whole plane / one pixel row of a sample). Each tile is read twice while it sits in L1 (memory
// traffic: one read of x): pass 1 sums it in registers (float; double for float64 x) to get a
// provisional mean m; pass 2 accumulates e = x - m and e^2, giving the tile's exact
// (mean = m + sum(e)/n, M2 = sum(e^2) - sum(e)^2/n) without the cancellation of a raw sum of
// squares. Channels_last tiles also center every channel on its own provisional mean within the
// tile, for the channel statistics. Tile (count, mean, M2) triples are merged in double with Chan's
// formula (provisional mean and correction kept apart until then): per plane / sample, then per
// fixed group of consecutive planes / samples, then across groups. Groups do not depend on the
// thread count and every sum runs in a fixed order, so results are bitwise reproducible for any
// number of threads (groups are handed out dynamically, which only changes who computes them).
//
// Backward: dx = (A[c] + P[hw]) + S[c]*(x - cmean[c]) + Q[hw]*(x - pmean[k(hw)]) with per-channel
// constants A = g_cmean/count_c, S = 2 g_cvar/count_c and per-pixel maps P = g_pmean/count_p,
// Q = 2 g_pvar/count_p (H*W entries each). Keeping the (x - mean) differences instead of folding the
// means into the constants keeps dx accurate for inputs with a large mean. dx comes from the
// page-resident buffer cache (csrc/buffer_cache.cpp).
//
// Patch p > 0 not dividing H or W: the channel statistics stay those of x, the patch statistics are
// those of x' = R_h x R_wᵀ, the bilinear resize to H' = ceil(H/p) p, W' = ceil(W/p) p exactly as
// F.interpolate(mode="bilinear", align_corners=False) (a dimension that already is a multiple keeps
// R = identity), with K' = (H'/p)(W'/p) patches. x' is never materialised: per (b, c) plane (either
// layout) the kernels gather the plane into per-thread scratch, take its channel partial, form x'
// centered on the plane mean from the 2 x 2 taps and feed it to the same tile-row kernels; a
// group's tile triples are merged in two passes in double (see forward_resize). Backward: dx = A[c] + S[c](x - cmean[c]) + R_hᵀ [P + Q (x' - pmean[k])] R_w per
// plane, the adjoint as gathers with fixed tap order (backward_resize). Planes are tiny here (7 x 7,
// 14 x 14), so both kernels take 8 (float accumulation) / 4 (float64) planes at a time, one per SIMD
// lane of a plane-interleaved scratch, lanes never mixing: a plane's results are bitwise the same
// whichever planes share its block (see "plane blocks").
//
// Layouts: contiguous NCHW and channels_last (NHWC) are read in place, in memory order; any other
// strides are made contiguous with x.contiguous() first (one extra copy; dx is then contiguous).
//
// ISA: the kernels below the "kernel part" marker are compiled twice, for the build's baseline ISA
// (x86-64-v2, SSE4.2) and with AVX2+FMA+F16C (this file includes itself once per ISA, each copy in
// its own namespace with internal linkage); the AVX2 copy is used when the CPU supports it.
// Environment variable DDFAST_STAT_MATCH_ISA=base forces the baseline copy (read on every call; the
// tests use it). Vector code uses GCC vector extensions (32-byte vectors), so it builds for both.
#ifndef DDFAST_STAT_MATCH_KERNEL_PART
// No fused multiply-adds where the source has none: the vectorised body and the scalar tail of a
// loop then round identically, so an element's result does not depend on its position in the
// batch and whole-batch and --segment runs stay bit-identical (DESIGN §5).
#pragma GCC optimize("fp-contract=off")

#include "stat_match.h"

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "buffer_cache.h"
#include "parallel.h"

// The kernels pass 32-byte GCC vectors between inlined helpers only; no ABI is exposed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ddfast {
namespace sm_common {

template <typename T>
using acc_t_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Upper bound on the number of unit groups (planes for NCHW, samples for NHWC) whose patch
// partials are merged separately; fixed so that results do not depend on the thread count.
constexpr int64_t kMaxGroups = 256;
// Cap on groups * K (double entries per partial array) so that tiny patches stay cheap in memory.
constexpr int64_t kMaxGroupEntries = int64_t(1) << 20;

inline double nonneg(double v) { return v < 0.0 ? 0.0 : v; }  // NaN passes through

// One dimension of the bilinear resize to the next multiple of the patch, as F.interpolate(...,
// mode="bilinear", align_corners=False) computes it: output i = wlo[i] * in[lo[i]] + whi[i] * in[hi[i]]
// with src = max(0, (i + 1/2) * n_in / n_out - 1/2), lo = floor(src), hi = min(lo + 1, n_in - 1),
// whi = src - lo (weights in double). A size that already is a multiple is left alone (identity).
struct Resize1D {
  int64_t n_in = 0, n_out = 0;
  std::vector<int32_t> lo, hi;
  std::vector<double> wlo, whi;
  bool identity() const { return n_in == n_out; }
};

inline Resize1D make_resize(int64_t n_in, int64_t p) {
  Resize1D r;
  r.n_in = n_in;
  r.n_out = (n_in + p - 1) / p * p;
  const double scale = double(n_in) / double(r.n_out);
  for (int64_t i = 0; i < r.n_out; ++i) {
    const double src = std::max(0.0, (double(i) + 0.5) * scale - 0.5);
    const int64_t lo = std::min<int64_t>(int64_t(std::floor(src)), n_in - 1);
    r.lo.push_back(int32_t(lo));
    r.hi.push_back(int32_t(std::min<int64_t>(lo + 1, n_in - 1)));
    r.whi.push_back(src - double(lo));
    r.wlo.push_back(1.0 - (src - double(lo)));
  }
  return r;
}

}  // namespace sm_common
}  // namespace ddfast

#define DDFAST_STAT_MATCH_KERNEL_PART 1

#define SM_ATTR
#define SM_F16C 0
namespace ddfast {
namespace sm_base {
namespace {  // internal linkage: no PLT calls, no symbol clashes with other kernels
#include "stat_match.cpp"  // NOLINT(build/include): kernel part, baseline ISA
}  // namespace
}  // namespace sm_base
}  // namespace ddfast
#undef SM_ATTR
#undef SM_F16C

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDFAST_SM_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SM_ATTR __attribute__((target("avx2,fma,f16c")))
#define SM_F16C 1
namespace ddfast {
namespace sm_avx2 {
namespace {
#include "stat_match.cpp"  // NOLINT(build/include): kernel part, AVX2 + FMA
}  // namespace
}  // namespace sm_avx2
}  // namespace ddfast
#undef SM_ATTR
#undef SM_F16C
#pragma GCC pop_options
#endif

namespace ddfast {
namespace {

using sm_common::acc_t_of;

bool use_avx2() {
#ifdef DDFAST_SM_HAVE_AVX2
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  const char* env = std::getenv("DDFAST_STAT_MATCH_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return false;
  return cpu;
#else
  return false;
#endif
}

enum class Layout { NCHW, NHWC };

// Returns the tensor to read (x itself when NCHW- or NHWC-contiguous, else x.contiguous()).
at::Tensor pick_layout(const at::Tensor& x, Layout* layout) {
  if (x.is_contiguous()) {
    *layout = Layout::NCHW;
    return x;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *layout = Layout::NHWC;
    return x;
  }
  *layout = Layout::NCHW;
  return x.contiguous();
}

void check_input(const at::Tensor& x, int64_t patch, const char* fn) {
  TORCH_CHECK(x.defined(), fn, ": x is undefined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor (got ", x.device(), ")");
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D [B, C, H, W], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, fn,
              ": x must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(x.numel() > 0, fn, ": x must be non-empty, got shape ", x.sizes());
  TORCH_CHECK(patch >= 0, fn, ": patch must be >= 0, got ", patch);
}

// Patch statistics of the bilinear resize (patch > 0 not dividing H or W): x' is never materialised.
bool needs_resize(const at::Tensor& x, int64_t patch) {
  return patch > 0 && (x.size(2) % patch != 0 || x.size(3) % patch != 0);
}

// Element offsets (channel to channel, pixel to pixel) of a plane of x in its layout.
void plane_strides(const at::Tensor& x, Layout layout, int64_t* sc, int64_t* ps) {
  *sc = layout == Layout::NCHW ? x.size(2) * x.size(3) : 1;
  *ps = layout == Layout::NCHW ? 1 : x.size(1);
}

// Small per-channel / per-patch vector as a contiguous double tensor of n entries.
at::Tensor vec_as_double(const at::Tensor& t, int64_t n, const char* name, const char* what) {
  TORCH_CHECK(t.defined(), "stat_match_backward: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "stat_match_backward: ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "stat_match_backward: ", name,
              " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, "stat_match_backward: ", name, " must have ", n, " entries (", what,
              "), got shape ", t.sizes());
  return t.reshape({n}).to(at::kDouble).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_match_forward(const at::Tensor& x_in,
                                                                             int64_t patch) {
  check_input(x_in, patch, "stat_match_forward");
  Layout layout;
  const at::Tensor x = pick_layout(x_in, &layout);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool patches = patch > 0, resize = needs_resize(x, patch);
  const int64_t K = patches ? ((H + patch - 1) / patch) * ((W + patch - 1) / patch) : 0;
  // Units: planes (NCHW, and either layout when resizing) or samples (NHWC), in fixed groups of
  // consecutive units.
  const bool plane_units = layout == Layout::NCHW || resize;
  const int64_t U = plane_units ? B * C : B;
  // Planes are small units: at least 8 per group (fewer, larger partials to merge).
  int64_t G = std::min<int64_t>(plane_units ? std::max<int64_t>(1, U / 8) : U, sm_common::kMaxGroups);
  if (patches) G = std::max<int64_t>(1, std::min<int64_t>(G, sm_common::kMaxGroupEntries / K));
  // Group g holds units [gb[g], gb[g + 1]). The resize kernels take planes in blocks of 8 (float) / 4
  // (float64), so their groups are whole blocks of 8 (only the last block of x is partial).
  const int64_t align = resize ? 8 : 1, NA = (U + align - 1) / align;
  std::vector<int64_t> gbv(G + 1);
  for (int64_t g = 0; g <= G; ++g) gbv[g] = std::min(U, align * (g * NA / G));
  const int64_t* gb = gbv.data();
  const int64_t unit_count = plane_units ? patch * patch : C * patch * patch;

  auto dopt = x.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor umean = at::empty({B * C}, dopt), um2 = at::empty({B * C}, dopt);
  at::Tensor gmean = at::empty({patches ? G * K : 0}, dopt), gm2 = at::empty({patches ? G * K : 0}, dopt);
  double* umean_p = umean.data_ptr<double>();
  double* um2_p = um2.data_ptr<double>();
  double* gmean_p = gmean.data_ptr<double>();
  double* gm2_p = gm2.data_ptr<double>();
  const bool avx2 = use_avx2();
  sm_common::Resize1D rh, rw;
  int64_t sc = 0, ps = 0;
  if (resize) {
    rh = sm_common::make_resize(H, patch);
    rw = sm_common::make_resize(W, patch);
    plane_strides(x, layout, &sc, &ps);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_match_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (resize) {
#ifdef DDFAST_SM_HAVE_AVX2
      if (avx2) {
        sm_avx2::forward_resize<scalar_t>(xp, B, C, H, W, sc, ps, patch, rh, rw, umean_p, um2_p, gmean_p, gm2_p, gb, G);
        return;
      }
#endif
      sm_base::forward_resize<scalar_t>(xp, B, C, H, W, sc, ps, patch, rh, rw, umean_p, um2_p, gmean_p, gm2_p, gb, G);
      return;
    }
#ifdef DDFAST_SM_HAVE_AVX2
    if (avx2) {
      if (layout == Layout::NCHW)
        sm_avx2::forward_nchw<scalar_t>(xp, B, C, H, W, patch, umean_p, um2_p, gmean_p, gm2_p, gb, G);
      else
        sm_avx2::forward_nhwc<scalar_t>(xp, B, C, H, W, patch, umean_p, um2_p, gmean_p, gm2_p, gb, G);
      return;
    }
#endif
    if (layout == Layout::NCHW)
      sm_base::forward_nchw<scalar_t>(xp, B, C, H, W, patch, umean_p, um2_p, gmean_p, gm2_p, gb, G);
    else
      sm_base::forward_nhwc<scalar_t>(xp, B, C, H, W, patch, umean_p, um2_p, gmean_p, gm2_p, gb, G);
  });

  // Statistics leave in float64 whatever x's dtype: the merge already runs in double, and a
  // whole batch then agrees with its segments merged in float64 to ~1e-16 (the --segment contract).
  at::Tensor cmean = at::empty({C}, dopt), cm2 = at::empty({C}, dopt);
  at::Tensor pmean = at::empty({K}, dopt), pm2 = at::empty({K}, dopt);
  const double n_unit = double(H * W);  // elements of one (b, c) pair
  sm_base::merge_partials<double>(umean_p, um2_p, gmean_p, gm2_p, B, C, K, U, gb, G, n_unit, double(unit_count),
                                  cmean.data_ptr<double>(), cm2.data_ptr<double>(), pmean.data_ptr<double>(),
                                  pm2.data_ptr<double>());
  return std::make_tuple(cmean, cm2, pmean, pm2);
}

at::Tensor stat_match_backward(const at::Tensor& x_in, const at::Tensor& cmean, const at::Tensor& g_cmean,
                               const at::Tensor& g_cvar, const at::Tensor& pmean,
                               const at::Tensor& g_pmean, const at::Tensor& g_pvar, int64_t patch,
                               double count_c, double count_p) {
  check_input(x_in, patch, "stat_match_backward");
  Layout layout;
  const at::Tensor x = pick_layout(x_in, &layout);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const bool patches = patch > 0, resize = needs_resize(x, patch);
  TORCH_CHECK(count_c > 0, "stat_match_backward: count_c must be > 0, got ", count_c);
  if (patches) TORCH_CHECK(count_p > 0, "stat_match_backward: count_p must be > 0, got ", count_p);
  const int64_t K = patches ? ((H + patch - 1) / patch) * ((W + patch - 1) / patch) : 0;

  const at::Tensor cm = vec_as_double(cmean, C, "cmean", "C");
  const at::Tensor gcm = vec_as_double(g_cmean, C, "g_cmean", "C");
  const at::Tensor gcv = vec_as_double(g_cvar, C, "g_cvar", "C");
  at::Tensor pm, gpm, gpv;
  if (patches) {
    pm = vec_as_double(pmean, K, "pmean", "K = ceil(H/patch)*ceil(W/patch)");
    gpm = vec_as_double(g_pmean, K, "g_pmean", "K = ceil(H/patch)*ceil(W/patch)");
    gpv = vec_as_double(g_pvar, K, "g_pvar", "K = ceil(H/patch)*ceil(W/patch)");
  }

  at::Tensor dx = cached_empty(x.sizes(), x.options(),
                               layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const bool avx2 = use_avx2();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stat_match_backward", [&] {
    using acc_t = acc_t_of<scalar_t>;
    const double ic = 1.0 / count_c;
    std::vector<acc_t> A(C), S(C), M(C);
    const double* cm_p = cm.data_ptr<double>();
    const double* gcm_p = gcm.data_ptr<double>();
    const double* gcv_p = gcv.data_ptr<double>();
    // The kernels form S·(x − M) with M the mean rounded to acc_t; the rounding residual
    // S·(μ − M) goes into the constant term in double, so a large mean costs no accuracy.
    for (int64_t c = 0; c < C; ++c) {
      M[c] = static_cast<acc_t>(cm_p[c]);
      S[c] = static_cast<acc_t>(2.0 * gcv_p[c] * ic);
      A[c] = static_cast<acc_t>(gcm_p[c] * ic - 2.0 * gcv_p[c] * ic * (cm_p[c] - double(M[c])));
    }
    if (resize) {
      // Per-pixel map of x' [H', W'] and per-(channel, patch) constants: x' is formed centered on M[c], so
      // the patch term P + Q (x' - pmean) = Q (x' - M[c]) + (P - Q (pmean - M[c])), the constant in double.
      const sm_common::Resize1D rh = sm_common::make_resize(H, patch), rw = sm_common::make_resize(W, patch);
      const int64_t W2 = rw.n_out, HW2 = rh.n_out * W2, Kw = W2 / patch;
      std::vector<acc_t> QM(HW2), RK(C * K);
      std::vector<int32_t> kmap(HW2);
      const double ip = 1.0 / count_p;
      const double* pm_p = pm.data_ptr<double>();
      const double* gpm_p = gpm.data_ptr<double>();
      const double* gpv_p = gpv.data_ptr<double>();
      for (int64_t i = 0; i < HW2; ++i) {
        kmap[i] = int32_t((i / W2 / patch) * Kw + (i % W2) / patch);
        QM[i] = static_cast<acc_t>(2.0 * gpv_p[kmap[i]] * ip);
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < K; ++k)
          RK[c * K + k] = static_cast<acc_t>(gpm_p[k] * ip - 2.0 * gpv_p[k] * ip * (pm_p[k] - double(M[c])));
      int64_t sc, ps;
      plane_strides(x, layout, &sc, &ps);
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* dp = dx.data_ptr<scalar_t>();
#ifdef DDFAST_SM_HAVE_AVX2
      if (avx2) {
        sm_avx2::backward_resize<scalar_t, acc_t>(xp, dp, B, C, H, W, sc, ps, rh, rw, A.data(), S.data(), M.data(),
                                                  QM.data(), RK.data(), kmap.data(), K);
        return;
      }
#endif
      sm_base::backward_resize<scalar_t, acc_t>(xp, dp, B, C, H, W, sc, ps, rh, rw, A.data(), S.data(), M.data(),
                                                QM.data(), RK.data(), kmap.data(), K);
      return;
    }
    std::vector<acc_t> P, Q, PM;
    if (patches) {
      P.resize(HW);
      Q.resize(HW);
      PM.resize(HW);
      const double ip = 1.0 / count_p;
      const double* pm_p = pm.data_ptr<double>();
      const double* gpm_p = gpm.data_ptr<double>();
      const double* gpv_p = gpv.data_ptr<double>();
      const int64_t Wp = W / patch;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t k = (h / patch) * Wp + (w / patch);
          PM[h * W + w] = static_cast<acc_t>(pm_p[k]);
          Q[h * W + w] = static_cast<acc_t>(2.0 * gpv_p[k] * ip);
          P[h * W + w] = static_cast<acc_t>(gpm_p[k] * ip - 2.0 * gpv_p[k] * ip * (pm_p[k] - double(PM[h * W + w])));
        }
      }
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
#ifdef DDFAST_SM_HAVE_AVX2
    if (avx2) {
      if (layout == Layout::NCHW)
        sm_avx2::backward_nchw<scalar_t, acc_t>(xp, dp, B, C, HW, A.data(), S.data(), M.data(),
                                                P.data(), Q.data(), PM.data(), patches);
      else
        sm_avx2::backward_nhwc<scalar_t, acc_t>(xp, dp, B, C, HW, A.data(), S.data(), M.data(),
                                                P.data(), Q.data(), PM.data(), patches);
      return;
    }
#endif
    if (layout == Layout::NCHW)
      sm_base::backward_nchw<scalar_t, acc_t>(xp, dp, B, C, HW, A.data(), S.data(), M.data(), P.data(),
                                              Q.data(), PM.data(), patches);
    else
      sm_base::backward_nhwc<scalar_t, acc_t>(xp, dp, B, C, HW, A.data(), S.data(), M.data(), P.data(),
                                              Q.data(), PM.data(), patches);
  });
  return dx;
}

}  // namespace ddfast

#else  // DDFAST_STAT_MATCH_KERNEL_PART ===========================================================
// Kernel part: included once per ISA inside namespace ddfast::sm_<isa>; SM_ATTR carries the ISA.

using sm_common::acc_t_of;
using sm_common::nonneg;

// Streaming Chan merge: (gm, gm2) hold j items of `cnt` elements each; merge item (m, m2) of the
// same count, elementwise over n entries.
SM_ATTR inline void chan_merge_equal(double* __restrict gm, double* __restrict gm2,
                                     const double* __restrict m, const double* __restrict m2, int64_t n,
                                     int64_t j, double cnt) {
  if (j == 0) {
    for (int64_t i = 0; i < n; ++i) {
      gm[i] = m[i];
      gm2[i] = m2[i];
    }
    return;
  }
  const double r = 1.0 / double(j + 1);
  const double w = cnt * double(j) * r;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double d = m[i] - gm[i];
    gm[i] += d * r;
    gm2[i] += m2[i] + d * d * w;
  }
}

// Software prefetch of [p, p + bytes) (hint only: never faults, also past the end of x). The NCHW
// kernels read x in short two-pass bursts (one tile-row / plane at a time), which the hardware
// prefetchers alone do not keep ahead of; prefetching kPrefetchBytes ahead keeps DRAM streaming.
constexpr int64_t kPrefetchBytes = 8192;
SM_ATTR inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// ---- NCHW --------------------------------------------------------------------------------------
// 32-byte vectors (GCC vector extensions: one ymm with AVX2, two xmm on the baseline).
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t itype __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

typedef uint32_t v8u __attribute__((vector_size(32)));

// 8 (float) / 4 (double) elements of x as an accumulation vector; half via F16C in the AVX2 copy,
// bfloat16 by widening its bits.
template <typename scalar_t, typename acc_t>
SM_ATTR inline __attribute__((always_inline)) typename Vec<acc_t>::type vload(const scalar_t* __restrict p) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    std::memcpy(&v, p, sizeof(v));
#if SM_F16C
  } else if constexpr (std::is_same<scalar_t, c10::Half>::value && std::is_same<acc_t, float>::value) {
    v = (typename Vec<acc_t>::type)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = (typename Vec<acc_t>::type)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#endif
  } else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    uint16_t raw[8];
    std::memcpy(raw, p, sizeof(raw));
    v8u u;
    for (int l = 0; l < 8; ++l) u[l] = uint32_t(raw[l]) << 16;
    std::memcpy(&v, &u, sizeof(v));
  } else {
    for (int l = 0; l < Vec<acc_t>::L; ++l) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

// Sum within aligned groups of G lanes (G a power of 2, <= L); the sum lands in every lane of the group.
template <int G, typename acc_t>
SM_ATTR inline __attribute__((always_inline)) typename Vec<acc_t>::type group_sum(typename Vec<acc_t>::type v) {
  typedef typename Vec<acc_t>::itype I;
  constexpr int L = Vec<acc_t>::L;
  if constexpr (L == 8) {
    if constexpr (G >= 2) v += __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6});
    if constexpr (G >= 4) v += __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5});
    if constexpr (G >= 8) v += __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3});
  } else {
    if constexpr (G >= 2) v += __builtin_shuffle(v, I{1, 0, 3, 2});
    if constexpr (G >= 4) v += __builtin_shuffle(v, I{2, 3, 0, 1});
  }
  return v;
}

// One column block of a tile-row: NV vectors (NV * L columns; tiles of TW columns) x th rows from
// x0 (row stride W), accumulated in registers. Per tile writes the provisional mean tm, the
// correction tc = sum(e)/n and tv = M2 (tile mean = tm + tc, kept apart to stay exact).
template <int NV, int TW, typename scalar_t, typename acc_t>
SM_ATTR inline void nchw_vblock(const scalar_t* __restrict x0, int64_t W, int64_t th, acc_t inv_nf,
                                acc_t* __restrict tm, acc_t* __restrict tc, acc_t* __restrict tv) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  constexpr int GV = TW > L ? TW / L : 1;  // vectors per tile
  constexpr int GL = TW > L ? L : TW;      // lanes per tile within one vector
  static_assert(NV % GV == 0, "block must hold whole tiles");
  V s[NV];
  for (int v = 0; v < NV; ++v) s[v] = vload<scalar_t, acc_t>(x0 + v * L);
  for (int64_t r = 1; r < th; ++r)
    for (int v = 0; v < NV; ++v) s[v] += vload<scalar_t, acc_t>(x0 + r * W + v * L);
  V mb[NV];
  for (int v = 0; v < NV; v += GV) {
    V a = s[v];
    for (int i = 1; i < GV; ++i) a += s[v + i];
    a = group_sum<GL, acc_t>(a) * inv_nf;
    for (int i = 0; i < GV; ++i) mb[v + i] = a;
  }
  V e1[NV], e2[NV];
  for (int v = 0; v < NV; ++v) {
    const V e = vload<scalar_t, acc_t>(x0 + v * L) - mb[v];
    e1[v] = e;
    e2[v] = e * e;
  }
  for (int64_t r = 1; r < th; ++r) {
    for (int v = 0; v < NV; ++v) {
      const V e = vload<scalar_t, acc_t>(x0 + r * W + v * L) - mb[v];
      e1[v] += e;
      e2[v] += e * e;
    }
  }
  int t = 0;
  for (int v = 0; v < NV; v += GV) {
    V a = e1[v], b = e2[v];
    for (int i = 1; i < GV; ++i) {
      a += e1[v + i];
      b += e2[v + i];
    }
    a = group_sum<GL, acc_t>(a);
    b = group_sum<GL, acc_t>(b);
    const V c = a * inv_nf;
    const V m2 = b - a * c;
    for (int q = 0; q < L; q += GL, ++t) {
      tm[t] = mb[v][q];
      tc[t] = c[q];
      tv[t] = m2[q] < acc_t(0) ? acc_t(0) : m2[q];
    }
  }
}

// TW == 4 with float accumulation: 32-column blocks (4 vectors, 8 tiles). Per-tile sums come from a
// transposing reduction (3 pairwise "hadd"s over the 4 vectors) that leaves the 8 tiles in lane
// order {0,2,4,6,1,3,5,7}; means are broadcast back with one permute per vector and the tile
// results are stored as whole vectors (no per-tile scalar work).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

SM_ATTR inline __attribute__((always_inline)) v8f hadd8(v8f a, v8f b) {
  return __builtin_shuffle(a, b, v8i{0, 2, 8, 10, 4, 6, 12, 14}) +
         __builtin_shuffle(a, b, v8i{1, 3, 9, 11, 5, 7, 13, 15});
}

// NV full vectors (8 columns each) plus, with HALF, one half vector (4 columns, upper lanes zero):
// 2 * NV + HALF <= 8 tiles. Writes 8 tile entries (the ones past 2 * NV + HALF are scratch).
template <int NV, bool HALF, typename scalar_t>
SM_ATTR inline __attribute__((always_inline)) v8f f4_load(const scalar_t* __restrict p, int j) {
  if (j < NV) return vload<scalar_t, float>(p + 8 * j);
  v8f v = {};
  if (HALF && j == NV)
    for (int l = 0; l < 4; ++l) v[l] = static_cast<float>(p[8 * j + l]);
  return v;
}

template <int NV, bool HALF, typename scalar_t>
SM_ATTR inline void nchw_f4_block(const scalar_t* __restrict x0, int64_t W, int64_t th, float inv_nf,
                                  float* __restrict tm, float* __restrict tc, float* __restrict tv) {
  v8f s0 = f4_load<NV, HALF>(x0, 0), s1 = f4_load<NV, HALF>(x0, 1);
  v8f s2 = f4_load<NV, HALF>(x0, 2), s3 = f4_load<NV, HALF>(x0, 3);
  for (int64_t r = 1; r < th; ++r) {
    const scalar_t* __restrict xr = x0 + r * W;
    s0 += f4_load<NV, HALF>(xr, 0);
    s1 += f4_load<NV, HALF>(xr, 1);
    s2 += f4_load<NV, HALF>(xr, 2);
    s3 += f4_load<NV, HALF>(xr, 3);
  }
  const v8f hm = hadd8(hadd8(s0, s1), hadd8(s2, s3)) * inv_nf;  // tiles {0,2,4,6,1,3,5,7}
  const v8f m0 = __builtin_shuffle(hm, v8i{0, 0, 0, 0, 4, 4, 4, 4});
  const v8f m1 = __builtin_shuffle(hm, v8i{1, 1, 1, 1, 5, 5, 5, 5});
  const v8f m2 = __builtin_shuffle(hm, v8i{2, 2, 2, 2, 6, 6, 6, 6});
  const v8f m3 = __builtin_shuffle(hm, v8i{3, 3, 3, 3, 7, 7, 7, 7});
  v8f a0 = f4_load<NV, HALF>(x0, 0) - m0, a1 = f4_load<NV, HALF>(x0, 1) - m1;
  v8f a2 = f4_load<NV, HALF>(x0, 2) - m2, a3 = f4_load<NV, HALF>(x0, 3) - m3;
  v8f b0 = a0 * a0, b1 = a1 * a1, b2 = a2 * a2, b3 = a3 * a3;
  for (int64_t r = 1; r < th; ++r) {
    const scalar_t* __restrict xr = x0 + r * W;
    const v8f e0 = f4_load<NV, HALF>(xr, 0) - m0, e1 = f4_load<NV, HALF>(xr, 1) - m1;
    const v8f e2 = f4_load<NV, HALF>(xr, 2) - m2, e3 = f4_load<NV, HALF>(xr, 3) - m3;
    a0 += e0;
    a1 += e1;
    a2 += e2;
    a3 += e3;
    b0 += e0 * e0;
    b1 += e1 * e1;
    b2 += e2 * e2;
    b3 += e3 * e3;
  }
  const v8f sa = hadd8(hadd8(a0, a1), hadd8(a2, a3));
  const v8f sb = hadd8(hadd8(b0, b1), hadd8(b2, b3));
  const v8f c = sa * inv_nf;
  v8f v = sb - sa * c;
  const v8f zero = {};
  v = (v < zero) ? zero : v;  // NaN passes through
  const v8i unperm = {0, 4, 1, 5, 2, 6, 3, 7};
  const v8f om = __builtin_shuffle(hm, unperm), oc = __builtin_shuffle(c, unperm),
            ov = __builtin_shuffle(v, unperm);
  std::memcpy(tm, &om, sizeof(om));
  std::memcpy(tc, &oc, sizeof(oc));
  std::memcpy(tv, &ov, sizeof(ov));
}

// Tile-row with 4-column tiles, float accumulation, any W (multiple of 4). tm/tc/tv need 8
// entries of slack past the row's W / 4 tiles.
template <typename scalar_t>
SM_ATTR void nchw_tilerow_f4(const scalar_t* __restrict r0, int64_t W, int64_t th, float inv_nf,
                             float* __restrict tm, float* __restrict tc, float* __restrict tv) {
  int64_t w = 0;
  for (; w + 32 <= W; w += 32) nchw_f4_block<4, false>(r0 + w, W, th, inv_nf, tm + w / 4, tc + w / 4, tv + w / 4);
  const int64_t rem = W - w;
  const scalar_t* x0 = r0 + w;
  float *a = tm + w / 4, *b = tc + w / 4, *c = tv + w / 4;
  switch (rem) {
    case 4: nchw_f4_block<0, true>(x0, W, th, inv_nf, a, b, c); break;
    case 8: nchw_f4_block<1, false>(x0, W, th, inv_nf, a, b, c); break;
    case 12: nchw_f4_block<1, true>(x0, W, th, inv_nf, a, b, c); break;
    case 16: nchw_f4_block<2, false>(x0, W, th, inv_nf, a, b, c); break;
    case 20: nchw_f4_block<2, true>(x0, W, th, inv_nf, a, b, c); break;
    case 24: nchw_f4_block<3, false>(x0, W, th, inv_nf, a, b, c); break;
    case 28: nchw_f4_block<3, true>(x0, W, th, inv_nf, a, b, c); break;
    default: break;
  }
}

// One tile-row (th rows x W, W >= L) with compile-time tile width TW (power of 2 <= 32).
template <int TW, typename scalar_t, typename acc_t>
SM_ATTR void nchw_tilerow_vec(const scalar_t* __restrict r0, int64_t W, int64_t th, acc_t inv_nf,
                              acc_t* __restrict tm, acc_t* __restrict tc, acc_t* __restrict tv) {
  constexpr int L = Vec<acc_t>::L;
  constexpr int BW = TW > 16 ? TW : 16;
  constexpr int NV = BW / L;
  int64_t w = 0;
  for (; w + BW <= W; w += BW)
    nchw_vblock<NV, TW, scalar_t, acc_t>(r0 + w, W, th, inv_nf, tm + w / TW, tc + w / TW, tv + w / TW);
  if constexpr (TW > L) {  // remainder: whole tiles of TW / L vectors
    constexpr int GV = TW > L ? TW / L : 1;
    for (; w + TW <= W; w += TW)
      nchw_vblock<GV, (TW > L ? TW : L), scalar_t, acc_t>(r0 + w, W, th, inv_nf, tm + w / TW,
                                                           tc + w / TW, tv + w / TW);
  } else {  // remainder: single vectors, the last one overlapping the previous block
    constexpr int TL = TW > L ? L : TW;
    constexpr int NT = L / TL;
    while (w < W) {
      const int64_t start = std::min<int64_t>(w, W - L);
      acc_t bm[NT], bc[NT], bv[NT];
      nchw_vblock<1, TL, scalar_t, acc_t>(r0 + start, W, th, inv_nf, bm, bc, bv);
      for (int64_t t = (w - start) / TL; t < NT; ++t) {
        tm[start / TL + t] = bm[t];
        tc[start / TL + t] = bc[t];
        tv[start / TL + t] = bv[t];
      }
      w = start + L;
    }
  }
}

// Any tile width / narrow rows: column sums through W-entry scratch rows s1, s2, mrow.
template <typename scalar_t, typename acc_t>
SM_ATTR void nchw_tilerow_generic(const scalar_t* __restrict r0, int64_t W, int64_t th, int64_t tw,
                                  acc_t inv_nf, acc_t* __restrict s1, acc_t* __restrict s2,
                                  acc_t* __restrict mrow, acc_t* __restrict tm, acc_t* __restrict tc,
                                  acc_t* __restrict tv) {
  const int64_t ntw = W / tw;
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) s1[w] = static_cast<acc_t>(r0[w]);
  for (int64_t r = 1; r < th; ++r) {
    const scalar_t* __restrict rp = r0 + r * W;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) s1[w] += static_cast<acc_t>(rp[w]);
  }
  for (int64_t j = 0; j < ntw; ++j) {
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t q = 0; q < tw; ++q) s += s1[j * tw + q];
    const acc_t m = s * inv_nf;
    for (int64_t q = 0; q < tw; ++q) mrow[j * tw + q] = m;
  }
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) {
    const acc_t e = static_cast<acc_t>(r0[w]) - mrow[w];
    s1[w] = e;
    s2[w] = e * e;
  }
  for (int64_t r = 1; r < th; ++r) {
    const scalar_t* __restrict rp = r0 + r * W;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const acc_t e = static_cast<acc_t>(rp[w]) - mrow[w];
      s1[w] += e;
      s2[w] += e * e;
    }
  }
  for (int64_t j = 0; j < ntw; ++j) {
    acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t q = 0; q < tw; ++q) {
      a += s1[j * tw + q];
      b += s2[j * tw + q];
    }
    const acc_t c = a * inv_nf, m2 = b - a * c;
    tm[j] = mrow[j * tw];
    tc[j] = c;
    tv[j] = m2 < acc_t(0) ? acc_t(0) : m2;
  }
}

// Tile stats of one tile-row (p rows x W, row stride W) into tm/tc/tv (8 entries of slack): the
// fastest kernel for p, W and the accumulation type. vec: W >= L and p a power of 2 <= 32.
template <typename scalar_t, typename acc_t>
SM_ATTR inline __attribute__((always_inline)) void nchw_tilerow(const scalar_t* __restrict r0, int64_t W, int64_t p,
                                                                acc_t inv_nf, bool vec, acc_t* __restrict s1,
                                                                acc_t* __restrict s2, acc_t* __restrict mrow,
                                                                acc_t* __restrict a, acc_t* __restrict b,
                                                                acc_t* __restrict c) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (p == 4) {
      nchw_tilerow_f4<scalar_t>(r0, W, p, inv_nf, a, b, c);
      return;
    }
  }
  if (!vec) {
    nchw_tilerow_generic<scalar_t, acc_t>(r0, W, p, p, inv_nf, s1, s2, mrow, a, b, c);
    return;
  }
  switch (p) {
    case 1: nchw_tilerow_vec<1, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
    case 2: nchw_tilerow_vec<2, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
    case 4: nchw_tilerow_vec<4, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
    case 8: nchw_tilerow_vec<8, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
    case 16: nchw_tilerow_vec<16, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
    default: nchw_tilerow_vec<32, scalar_t, acc_t>(r0, W, p, inv_nf, a, b, c); break;
  }
}

// Whole plane (patch == 0): two passes over n contiguous elements with 4 vector accumulators each;
// pass 2 flushes its lanes into double every 4096 elements.
template <typename scalar_t, typename acc_t>
SM_ATTR void plane_twopass(const scalar_t* __restrict x, int64_t n, double* mean, double* m2, int64_t pf) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  constexpr int BL = 4 * L;
  constexpr int64_t CH = 4096;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + BL <= n; i += BL) {
    if (pf > 0) prefetch_range(x + i + pf, BL * int64_t(sizeof(scalar_t)));
    a0 += vload<scalar_t, acc_t>(x + i);
    a1 += vload<scalar_t, acc_t>(x + i + L);
    a2 += vload<scalar_t, acc_t>(x + i + 2 * L);
    a3 += vload<scalar_t, acc_t>(x + i + 3 * L);
  }
  acc_t s = group_sum<L, acc_t>((a0 + a1) + (a2 + a3))[0];
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]);
  const acc_t m = s / acc_t(n);
  double se = 0.0, see = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += CH) {
    const int64_t c1 = std::min(n, c0 + CH);
    V e0 = {}, e1 = {}, f0 = {}, f1 = {};
    i = c0;
    for (; i + 2 * L <= c1; i += 2 * L) {
      const V d0 = vload<scalar_t, acc_t>(x + i) - m, d1 = vload<scalar_t, acc_t>(x + i + L) - m;
      e0 += d0;
      e1 += d1;
      f0 += d0 * d0;
      f1 += d1 * d1;
    }
    acc_t t1 = group_sum<L, acc_t>(e0 + e1)[0], t2 = group_sum<L, acc_t>(f0 + f1)[0];
    for (; i < c1; ++i) {
      const acc_t e = static_cast<acc_t>(x[i]) - m;
      t1 += e;
      t2 += e * e;
    }
    se += t1;
    see += t2;
  }
  const double dn = double(n);
  *mean = double(m) + se / dn;
  *m2 = nonneg(see - se * se / dn);
}

template <typename scalar_t>
SM_ATTR void forward_nchw(const scalar_t* __restrict x, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t p, double* __restrict umean, double* __restrict um2,  // [B*C]
                          double* __restrict gmean, double* __restrict gm2,  // [G*K]
                          const int64_t* __restrict gb, int64_t G) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t U = B * C, HW = H * W;
  if (p == 0) {
    const int64_t pf = kPrefetchBytes / int64_t(sizeof(scalar_t));
#pragma omp parallel for schedule(dynamic, std::max<int64_t>(1, U / 256))
    for (int64_t u = 0; u < U; ++u) plane_twopass<scalar_t, acc_t>(x + u * HW, HW, umean + u, um2 + u, pf);
    return;
  }
  const int64_t nth = H / p, ntw = W / p, T = nth * ntw;  // T == K
  const double tn = double(p * p);
  const acc_t inv_nf = acc_t(1) / acc_t(p * p);
  const int64_t pf = kPrefetchBytes / int64_t(sizeof(scalar_t));
  const bool vec = W >= Vec<acc_t>::L && (p == 1 || p == 2 || p == 4 || p == 8 || p == 16 || p == 32);
#pragma omp parallel
  {
    std::vector<acc_t> s1(W), s2(W), mrow(W), tmv(T + 8), tcv(T + 8), tvv(T + 8);
    acc_t* __restrict tm = tmv.data();
    acc_t* __restrict tc = tcv.data();
    acc_t* __restrict tv = tvv.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t u0 = gb[g], u1 = gb[g + 1];
      for (int64_t u = u0; u < u1; ++u) {
        const scalar_t* __restrict xp = x + u * HW;
        for (int64_t i = 0; i < nth; ++i) {
          const scalar_t* r0 = xp + i * p * W;
          prefetch_range(r0 + pf, p * W * int64_t(sizeof(scalar_t)));
          nchw_tilerow<scalar_t, acc_t>(r0, W, p, inv_nf, vec, s1.data(), s2.data(), mrow.data(), tm + i * ntw,
                                        tc + i * ntw, tv + i * ntw);
        }
        // One pass over the plane's T tiles: the plane (union of its equal-count tiles, centered on
        // the first tile's provisional mean, sums in double) and the streaming Chan merge of the
        // tiles into the group's patch partials.
        const acc_t shift = tm[0];
        double ps1 = 0.0, ps2 = 0.0, psv = 0.0;
        double* __restrict gmu = gmean + g * T;
        double* __restrict gvu = gm2 + g * T;
        const int64_t j = u - u0;
        const double r = 1.0 / double(j + 1), wgt = tn * double(j) * r;
#pragma omp simd reduction(+ : ps1, ps2, psv)
        for (int64_t t = 0; t < T; ++t) {
          const double d = double(tm[t] - shift) + double(tc[t]);
          const double v = double(tv[t]);
          ps1 += d;
          ps2 += d * d;
          psv += v;
          const double mt = double(tm[t]) + double(tc[t]);
          const double dg = j == 0 ? 0.0 : mt - gmu[t];
          gmu[t] = j == 0 ? mt : gmu[t] + dg * r;
          gvu[t] = j == 0 ? v : gvu[t] + v + dg * dg * wgt;
        }
        umean[u] = double(shift) + ps1 / double(T);
        um2[u] = psv + tn * nonneg(ps2 - ps1 * ps1 / double(T));
      }
    }
  }
}

// ---- NHWC --------------------------------------------------------------------------------------
// Double-accumulation variant (float64 input). One sample [H, W, C] (contiguous), processed in
// strips of th rows; tiles th x tw pixels x all channels; channels are centered on their strip
// means. Channel statistics of the sample go to cmean/cm2 [C]; with kPatches, tile stats to
// tmean/tm2 [(H/th)*(W/tw)].
template <typename scalar_t, typename acc_t, bool kPatches>
SM_ATTR void sample_nhwc(const scalar_t* __restrict xb, int64_t H, int64_t W, int64_t C, int64_t th,
                         int64_t tw, acc_t* __restrict ptmp /*[ntw*C]*/, acc_t* __restrict mch /*[C]*/,
                         acc_t* __restrict sd /*[C]*/, acc_t* __restrict sdd /*[C]*/,
                         acc_t* __restrict mt /*[ntw]*/, double* __restrict scratch /*[2C+2ntw]*/,
                         double* __restrict cmean, double* __restrict cm2, double* __restrict tmean,
                         double* __restrict tm2) {
  const int64_t nth = H / th, ntw = W / tw;
  const acc_t inv_tile = acc_t(1) / acc_t(C * th * tw);
  const acc_t inv_strip = acc_t(1) / acc_t(th * W);
  const double n_strip = double(th * W), n_tile = double(C * th * tw);
  double* __restrict smean = scratch;        // [C]
  double* __restrict sm2 = scratch + C;      // [C]
  double* __restrict tse = scratch + 2 * C;  // [ntw]
  double* __restrict tsee = tse + ntw;       // [ntw]
  for (int64_t i = 0; i < nth; ++i) {
    const scalar_t* __restrict s0 = xb + i * th * W * C;
    // pass 1: per (tile, channel) sums
    for (int64_t j = 0; j < ntw * C; ++j) ptmp[j] = 0;
    for (int64_t r = 0; r < th; ++r) {
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* __restrict px = s0 + (r * W + w) * C;
        acc_t* __restrict pt = ptmp + (w / tw) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) pt[c] += static_cast<acc_t>(px[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) mch[c] = 0;
    for (int64_t j = 0; j < ntw; ++j) {
      const acc_t* __restrict pt = ptmp + j * C;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) {
        mch[c] += pt[c];
        s += pt[c];
      }
      mt[j] = s * inv_tile;
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      mch[c] *= inv_strip;
      sd[c] = 0;
      sdd[c] = 0;
    }
    // pass 2: centered sums, per channel (channel stats) and per tile (patch stats)
    if (kPatches)
      for (int64_t j = 0; j < 2 * ntw; ++j) tse[j] = 0.0;
    for (int64_t r = 0; r < th; ++r) {
      for (int64_t j = 0; j < ntw; ++j) {
        const acc_t m = mt[j];
        acc_t se = 0, see = 0;
        for (int64_t q = 0; q < tw; ++q) {
          const scalar_t* __restrict px = s0 + (r * W + j * tw + q) * C;
          if (kPatches) {
#pragma omp simd reduction(+ : se, see)
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = static_cast<acc_t>(px[c]);
              const acc_t d = v - mch[c];
              sd[c] += d;
              sdd[c] += d * d;
              const acc_t e = v - m;
              se += e;
              see += e * e;
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(px[c]) - mch[c];
              sd[c] += d;
              sdd[c] += d * d;
            }
          }
        }
        if (kPatches) {
          tse[j] += se;
          tsee[j] += see;
        }
      }
    }
    if (kPatches) {
      for (int64_t j = 0; j < ntw; ++j) {
        tmean[i * ntw + j] = double(mt[j]) + tse[j] / n_tile;
        tm2[i * ntw + j] = nonneg(tsee[j] - tse[j] * tse[j] / n_tile);
      }
    }
    // strip channel triples -> running per-sample channel stats
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double a = sd[c], b = sdd[c];
      smean[c] = double(mch[c]) + a / n_strip;
      sm2[c] = nonneg(b - a * a / n_strip);
    }
    chan_merge_equal(cmean, cm2, smean, sm2, C, i, n_strip);
  }
}

// Float-accumulation variant (float / half / bfloat16 input): one tile (th x tw pixels x all C
// channels, contiguous rows of tw * C elements) at a time, so both passes hit L1. Channels go in
// blocks of 16 held in registers: pass 1 gives the per-(tile, channel) provisional means and the
// tile mean; pass 2 centers every element on its channel's tile mean (channel stats) and on the tile
// mean (patch stats). Per-(tile, channel) triples are Chan-merged into the sample's channel stats
// in double. ws: 3 * C floats.
template <typename scalar_t, bool kPatches>
SM_ATTR __attribute__((noinline)) void sample_nhwc_f(const scalar_t* __restrict xb, int64_t H, int64_t W, int64_t C, int64_t th,
                           int64_t tw, float* __restrict ws, double* __restrict cmean,
                           double* __restrict cm2, double* __restrict tmean, double* __restrict tm2) {
  constexpr int CB = 16;
  const int64_t nth = H / th, ntw = W / tw, np = th * tw, Cv = C / CB * CB;
  float* __restrict mc = ws;         // provisional channel means of the tile
  float* __restrict cc = ws + C;     // corrections sum(d) / np
  float* __restrict cv = ws + 2 * C; // channel M2 within the tile
  const float inv_np = 1.0f / float(np);
  const float inv_tile = 1.0f / float(C * np);
  const double n_tile = double(C * np);
  int64_t tile = 0;
  for (int64_t i = 0; i < nth; ++i) {
    for (int64_t j = 0; j < ntw; ++j, ++tile) {
      const scalar_t* __restrict t0 = xb + (i * th * W + j * tw) * C;
      // pass 1
      v8f tsum = {};
      for (int64_t cb = 0; cb < Cv; cb += CB) {
        v8f a0 = {}, a1 = {};
        for (int64_t r = 0; r < th; ++r) {
          const scalar_t* __restrict rp = t0 + r * W * C + cb;
          const scalar_t* const re = rp + tw * C;
          for (; rp != re; rp += C) {
            a0 += vload<scalar_t, float>(rp);
            a1 += vload<scalar_t, float>(rp + 8);
          }
        }
        tsum += a0 + a1;
        const v8f b0 = a0 * inv_np, b1 = a1 * inv_np;
        std::memcpy(mc + cb, &b0, sizeof(b0));
        std::memcpy(mc + cb + 8, &b1, sizeof(b1));
      }
      float ts = group_sum<8, float>(tsum)[0];
      for (int64_t c = Cv; c < C; ++c) {
        float a = 0.0f;
        for (int64_t r = 0; r < th; ++r)
          for (int64_t q = 0; q < tw; ++q) a += static_cast<float>(t0[(r * W + q) * C + c]);
        mc[c] = a * inv_np;
        ts += a;
      }
      const float m = ts * inv_tile;
      // pass 2
      v8f e1 = {}, e2 = {};
      for (int64_t cb = 0; cb < Cv; cb += CB) {
        v8f m0, m1;
        std::memcpy(&m0, mc + cb, sizeof(m0));
        std::memcpy(&m1, mc + cb + 8, sizeof(m1));
        v8f s0 = {}, s1 = {}, q0 = {}, q1 = {};
        for (int64_t r = 0; r < th; ++r) {
          const scalar_t* __restrict rp = t0 + r * W * C + cb;
          const scalar_t* const re = rp + tw * C;
          for (; rp != re; rp += C) {
            const v8f v0 = vload<scalar_t, float>(rp), v1 = vload<scalar_t, float>(rp + 8);
            const v8f d0 = v0 - m0, d1 = v1 - m1;
            s0 += d0;
            s1 += d1;
            q0 += d0 * d0;
            q1 += d1 * d1;
            if (kPatches) {
              const v8f f0 = v0 - m, f1 = v1 - m;
              e1 += f0 + f1;
              e2 += f0 * f0 + f1 * f1;
            }
          }
        }
        const v8f c0 = s0 * inv_np, c1 = s1 * inv_np;
        const v8f zero = {};
        v8f w0 = q0 - s0 * c0, w1 = q1 - s1 * c1;
        w0 = (w0 < zero) ? zero : w0;  // NaN passes through
        w1 = (w1 < zero) ? zero : w1;
        std::memcpy(cc + cb, &c0, sizeof(c0));
        std::memcpy(cc + cb + 8, &c1, sizeof(c1));
        std::memcpy(cv + cb, &w0, sizeof(w0));
        std::memcpy(cv + cb + 8, &w1, sizeof(w1));
      }
      float se = group_sum<8, float>(e1)[0], see = group_sum<8, float>(e2)[0];
      for (int64_t c = Cv; c < C; ++c) {
        float s = 0.0f, qq = 0.0f;
        for (int64_t r = 0; r < th; ++r) {
          for (int64_t q = 0; q < tw; ++q) {
            const float v = static_cast<float>(t0[(r * W + q) * C + c]);
            const float d = v - mc[c];
            s += d;
            qq += d * d;
            if (kPatches) {
              const float f = v - m;
              se += f;
              see += f * f;
            }
          }
        }
        cc[c] = s * inv_np;
        const float w = qq - s * cc[c];
        cv[c] = w < 0.0f ? 0.0f : w;
      }
      if (kPatches) {
        const double a = se, b = see;
        tmean[tile] = double(m) + a / n_tile;
        tm2[tile] = nonneg(b - a * a / n_tile);
      }
      // Chan-merge the tile's channel triples (np elements each) into the sample's channel stats
      if (tile == 0) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          cmean[c] = double(mc[c]) + double(cc[c]);
          cm2[c] = double(cv[c]);
        }
      } else {
        const double r = 1.0 / double(tile + 1), wgt = double(np) * double(tile) * r;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = (double(mc[c]) + double(cc[c])) - cmean[c];
          cmean[c] += d * r;
          cm2[c] += double(cv[c]) + d * d * wgt;
        }
      }
    }
  }
}

template <typename scalar_t>
SM_ATTR void forward_nhwc(const scalar_t* __restrict x, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t p, double* __restrict umean, double* __restrict um2,  // [B*C]
                          double* __restrict gmean, double* __restrict gm2,  // [G*K]
                          const int64_t* __restrict gb, int64_t G) {
  using acc_t = acc_t_of<scalar_t>;
  const bool patches = p > 0;
  const int64_t th = patches ? p : 1, tw = patches ? p : W;
  const int64_t ntw = W / tw, T = (H / th) * ntw;
  const double tn = double(C * th * tw);
  const int64_t HWC = H * W * C;
#pragma omp parallel
  {
    std::vector<acc_t> ptmp(ntw * C), mch(C), sd(C), sdd(C), mt(ntw);
    std::vector<double> scratch(2 * C + 2 * ntw), tmean(T), tm2(T);
    std::vector<float> ws(3 * C);
    constexpr bool kFloatAcc = std::is_same<acc_t, float>::value;
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b0 = gb[g], b1 = gb[g + 1];
      for (int64_t b = b0; b < b1; ++b) {
        if (kFloatAcc && patches) {
          sample_nhwc_f<scalar_t, true>(x + b * HWC, H, W, C, th, tw, ws.data(), umean + b * C,
                                        um2 + b * C, tmean.data(), tm2.data());
          chan_merge_equal(gmean + g * T, gm2 + g * T, tmean.data(), tm2.data(), T, b - b0, tn);
        } else if (kFloatAcc) {
          sample_nhwc_f<scalar_t, false>(x + b * HWC, H, W, C, th, tw, ws.data(), umean + b * C,
                                         um2 + b * C, nullptr, nullptr);
        } else if (patches) {
          sample_nhwc<scalar_t, acc_t, true>(x + b * HWC, H, W, C, th, tw, ptmp.data(), mch.data(),
                                              sd.data(), sdd.data(), mt.data(), scratch.data(),
                                              umean + b * C, um2 + b * C, tmean.data(), tm2.data());
          chan_merge_equal(gmean + g * T, gm2 + g * T, tmean.data(), tm2.data(), T, b - b0, tn);
        } else {
          sample_nhwc<scalar_t, acc_t, false>(x + b * HWC, H, W, C, th, tw, ptmp.data(), mch.data(),
                                               sd.data(), sdd.data(), mt.data(), scratch.data(),
                                               umean + b * C, um2 + b * C, nullptr, nullptr);
        }
      }
    }
  }
}

// Final merge: channels from B per-(b, c) partials of n_unit elements each; patches from G group
// partials ((gb[g + 1] - gb[g]) * unit_count elements each). Two-pass (mean, then M2 + between-term) in double.
// Serial unless large: a second parallel region costs more than the merge under CPU contention.
template <typename out_t>
SM_ATTR void merge_partials(const double* __restrict umean, const double* __restrict um2,
                            const double* __restrict gmean, const double* __restrict gm2, int64_t B,
                            int64_t C, int64_t K, int64_t U, const int64_t* __restrict gb, int64_t G,
                            double n_unit, double unit_count,
                            out_t* __restrict cmean, out_t* __restrict cm2, out_t* __restrict pmean,
                            out_t* __restrict pm2) {
  std::vector<double> gunits(G);  // units per group
  for (int64_t g = 0; g < G; ++g) gunits[g] = double(gb[g + 1] - gb[g]);
#pragma omp parallel if (B * C + G * K > (int64_t(1) << 18))
  {
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < C; ++c) {
      double m = 0.0;
      for (int64_t b = 0; b < B; ++b) m += umean[b * C + c];
      m /= double(B);
      double m2 = 0.0, between = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const double d = umean[b * C + c] - m;
        m2 += um2[b * C + c];
        between += d * d;
      }
      cmean[c] = static_cast<out_t>(m);
      cm2[c] = static_cast<out_t>(m2 + n_unit * between);
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      double m = 0.0;
      for (int64_t g = 0; g < G; ++g) m += gunits[g] * gmean[g * K + k];
      m /= double(U);
      double m2 = 0.0, between = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        const double d = gmean[g * K + k] - m;
        m2 += gm2[g * K + k];
        between += gunits[g] * d * d;
      }
      pmean[k] = static_cast<out_t>(m);
      pm2[k] = static_cast<out_t>(m2 + unit_count * between);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------
typedef uint32_t u32_alias __attribute__((may_alias));
typedef uint16_t u16_alias __attribute__((may_alias));

// n elements of a reduced-precision x to float (exact).
template <typename scalar_t>
SM_ATTR inline void load_to_float(float* __restrict dst, const scalar_t* __restrict src, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    const u16_alias* s = reinterpret_cast<const u16_alias*>(src);
    u32_alias* d = reinterpret_cast<u32_alias*>(dst);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) d[k] = uint32_t(s[k]) << 16;
    return;
  }
#if SM_F16C
  if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// n floats to a reduced-precision dx, round to nearest even (as c10's conversions).
template <typename scalar_t>
SM_ATTR inline void store_from_float(scalar_t* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    const u32_alias* s = reinterpret_cast<const u32_alias*>(src);
    u16_alias* d = reinterpret_cast<u16_alias*>(dst);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t u = s[k];
      const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      d[k] = src[k] != src[k] ? uint16_t(0x7FC0) : uint16_t(r);
    }
    return;
  }
#if SM_F16C
  if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Reduced-precision x / dx go through float chunks of this many elements (stack buffers).
constexpr int64_t kBwdChunk = 512;

template <typename scalar_t, typename acc_t>
SM_ATTR void backward_nchw(const scalar_t* __restrict x, scalar_t* __restrict dx, int64_t B, int64_t C,
                           int64_t HW, const acc_t* __restrict A, const acc_t* __restrict S,
                           const acc_t* __restrict M, const acc_t* __restrict P,
                           const acc_t* __restrict Q, const acc_t* __restrict PM, bool patches) {
  const int64_t U = B * C;
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
#pragma omp parallel for schedule(dynamic, std::max<int64_t>(1, U / 256))
  for (int64_t u = 0; u < U; ++u) {
    const int64_t c = u % C;
    const acc_t a = A[c], s = S[c], m = M[c];
    const scalar_t* __restrict xp = x + u * HW;
    scalar_t* __restrict dp = dx + u * HW;
    if constexpr (kDirect) {
      if (patches) {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) {
          const acc_t v = xp[i];
          dp[i] = (a + P[i]) + s * (v - m) + Q[i] * (v - PM[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) dp[i] = a + s * (xp[i] - m);
      }
    } else {
      float xf[kBwdChunk], rf[kBwdChunk];
      for (int64_t i0 = 0; i0 < HW; i0 += kBwdChunk) {
        const int64_t n = std::min(kBwdChunk, HW - i0);
        load_to_float<scalar_t>(xf, xp + i0, n);
        if (patches) {
          const acc_t* __restrict Pi = P + i0;
          const acc_t* __restrict Qi = Q + i0;
          const acc_t* __restrict PMi = PM + i0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const float v = xf[i];
            rf[i] = (a + Pi[i]) + s * (v - m) + Qi[i] * (v - PMi[i]);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) rf[i] = a + s * (xf[i] - m);
        }
        store_from_float<scalar_t>(dp + i0, rf, n);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
SM_ATTR void backward_nhwc(const scalar_t* __restrict x, scalar_t* __restrict dx, int64_t B, int64_t C,
                           int64_t HW, const acc_t* __restrict A, const acc_t* __restrict S,
                           const acc_t* __restrict M, const acc_t* __restrict P,
                           const acc_t* __restrict Q, const acc_t* __restrict PM, bool patches) {
  const int64_t R = B * HW;  // pixels
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
#pragma omp parallel for schedule(dynamic, std::max<int64_t>(1, R / 256))
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hw = r % HW;
    const scalar_t* __restrict xp = x + r * C;
    scalar_t* __restrict dp = dx + r * C;
    const acc_t pp = patches ? P[hw] : acc_t(0), q = patches ? Q[hw] : acc_t(0),
                pm = patches ? PM[hw] : acc_t(0);
    if constexpr (kDirect) {
      if (patches) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = xp[c];
          dp[c] = (A[c] + pp) + S[c] * (v - M[c]) + q * (v - pm);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dp[c] = A[c] + S[c] * (xp[c] - M[c]);
      }
    } else {
      float xf[kBwdChunk], rf[kBwdChunk];
      for (int64_t c0 = 0; c0 < C; c0 += kBwdChunk) {
        const int64_t n = std::min(kBwdChunk, C - c0);
        load_to_float<scalar_t>(xf, xp + c0, n);
        const acc_t* __restrict Ac = A + c0;
        const acc_t* __restrict Sc = S + c0;
        const acc_t* __restrict Mc = M + c0;
        if (patches) {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const float v = xf[c];
            rf[c] = (Ac[c] + pp) + Sc[c] * (v - Mc[c]) + q * (v - pm);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) rf[c] = Ac[c] + Sc[c] * (xf[c] - Mc[c]);
        }
        store_from_float<scalar_t>(dp + c0, rf, n);
      }
    }
  }
}

// ---- bilinear resize (patch > 0 not dividing H or W) ------------------------------------------
// Unit: one (b, c) plane in either layout (sc: element offset between channels, ps: between pixels),
// gathered into acc_t scratch. Forward: the plane's channel partial (plane_twopass), then x' - s =
// R_h (x - s) R_wᵀ with s the plane mean (centered, so a large mean costs no precision; a non-finite
// mean gives s = 0 so NaN/Inf reach only the patches their taps feed), tile stats of x' - s with the
// tile-row kernels and the streaming Chan merge into the group's patch partials. Planes are numbered
// b * C + c in both layouts, so NCHW and channels_last give identical results. x' lives only in
// per-thread scratch ([H', W'] per plane). The per-plane functions here run the tile shapes that the
// block path below does not take. The patch partial of a group comes from its planes' tile triples in
// two passes (group_patches), not a streaming merge: measured on [100, 128, 7, 7] (1 thread), the
// per-plane scalar Chan merge of the 8 lanes of a block was ~45% of the forward.
// Adjoint taps: input i gathers ta entries (at[i * ta + t] of out, weight aw[i * ta + t]) instead of
// a scatter's dependent read-modify-writes; unused taps read entry n_out (a zero pad) with weight 0.
template <typename acc_t>
struct ResizeTab {
  const int32_t* lo;
  const int32_t* hi;
  std::vector<acc_t> wl, wh, aw;
  std::vector<int32_t> at;
  int64_t n_in, n_out, ta = 0;
  bool id;
  explicit ResizeTab(const sm_common::Resize1D& r)
      : lo(r.lo.data()), hi(r.hi.data()), wl(r.wlo.begin(), r.wlo.end()), wh(r.whi.begin(), r.whi.end()),
        n_in(r.n_in), n_out(r.n_out), id(r.identity()) {
    std::vector<int64_t> n(n_in, 0);
    for (int64_t j = 0; j < n_out; ++j) {
      ++n[lo[j]];
      ++n[hi[j]];
    }
    for (int64_t i = 0; i < n_in; ++i) ta = std::max(ta, n[i]);
    at.assign(n_in * ta, int32_t(n_out));
    aw.assign(n_in * ta, acc_t(0));
    std::fill(n.begin(), n.end(), 0);
    for (int64_t j = 0; j < n_out; ++j) {  // increasing j: a fixed summation order
      at[lo[j] * ta + n[lo[j]]] = int32_t(j);
      aw[lo[j] * ta + n[lo[j]]++] = wl[j];
      at[hi[j] * ta + n[hi[j]]] = int32_t(j);
      aw[hi[j] * ta + n[hi[j]]++] = wh[j];
    }
  }
};

template <typename scalar_t, typename acc_t>
SM_ATTR inline void load_plane(acc_t* __restrict dst, const scalar_t* __restrict src, int64_t n, int64_t ps) {
  if (ps == 1) {
    if constexpr (std::is_same<scalar_t, acc_t>::value)
      std::memcpy(dst, src, n * sizeof(acc_t));
    else
      load_to_float<scalar_t>(dst, src, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * ps]);
}

template <typename scalar_t, typename acc_t>
SM_ATTR inline void store_plane(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t n, int64_t ps) {
  if (ps == 1) {
    if constexpr (std::is_same<scalar_t, acc_t>::value)
      std::memcpy(dst, src, n * sizeof(acc_t));
    else
      store_from_float<scalar_t>(dst, src, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * ps] = static_cast<scalar_t>(src[i]);
}

// R_h · d · R_wᵀ of one plane d [H, W]: along W into tmp [H, W'], then along H into out [H', W'].
// Returns the result (tmp when H needs no resize).
template <typename acc_t>
SM_ATTR acc_t* resize_plane(acc_t* __restrict d, const ResizeTab<acc_t>& rh, const ResizeTab<acc_t>& rw,
                            acc_t* __restrict tmp, acc_t* __restrict out) {
  const int64_t W = rw.n_in, W2 = rw.n_out;
  acc_t* rows = d;
  if (!rw.id) {
    const acc_t* __restrict wl = rw.wl.data();
    const acc_t* __restrict wh = rw.wh.data();
    for (int64_t h = 0; h < rh.n_in; ++h) {
      const acc_t* __restrict dr = d + h * W;
      acc_t* __restrict tr = tmp + h * W2;
      for (int64_t j = 0; j < W2; ++j) tr[j] = wl[j] * dr[rw.lo[j]] + wh[j] * dr[rw.hi[j]];
    }
    rows = tmp;
  }
  if (rh.id) return rows;
  for (int64_t i = 0; i < rh.n_out; ++i) {
    const acc_t* __restrict a = rows + rh.lo[i] * W2;
    const acc_t* __restrict b = rows + rh.hi[i] * W2;
    const acc_t wa = rh.wl[i], wb = rh.wh[i];
    acc_t* __restrict o = out + i * W2;
#pragma omp simd
    for (int64_t j = 0; j < W2; ++j) o[j] = wa * a[j] + wb * b[j];
  }
  return out;
}

// ---- plane blocks: L planes side by side, one per vector lane ----------------------------------
// The resize kernels take L consecutive planes (8 for float accumulation, 4 for double) at a time,
// plane-interleaved in scratch ([pixel][L]: one vector per pixel, plane l in lane l), so every
// resize tap, tile sum and adjoint tap is one vector operation with a broadcast scalar weight
// instead of a scalar gather. Lanes never mix: a plane's results are bitwise the same whatever planes
// share its block (padding lanes are zero and discarded). The block kernels have their own fixed
// order (fused multiply-adds in the AVX2 copy, one-pass tiles), so they do not round as the per-plane
// path does; a call takes one of the two for all its planes. forward_resize uses blocks for power-of-2
// patches up to 32 (block_resize_tiles' instantiations), the per-plane path for the others;
// backward_resize always uses blocks.
// Block loads / stores transpose L x L in registers (NCHW) or read L consecutive channels per pixel
// (channels_last), with the element conversions of load_plane / store_plane.

// ((v0 + v1) + (v2 + v3)) + ...: the tree group_sum<N> forms in lane 0 (and hadd8 for N = 4).
template <int N, typename V>
SM_ATTR inline __attribute__((always_inline)) V tree_sum(const V* v) {
  if constexpr (N == 1)
    return v[0];
  else
    return tree_sum<N / 2, V>(v) + tree_sum<N / 2, V>(v + N / 2);
}

// In-register transpose of L x L (r[l][k] -> r[k][l]). The baseline copy works on the 16-byte
// halves with SSE unpacks (GCC lowers generic 32-byte shuffles there element by element).
#if !SM_F16C && defined(__SSE2__)
SM_ATTR inline __attribute__((always_inline)) void transpose_l(Vec<float>::type* r) {
  __m128 lo[8], hi[8];
  for (int k = 0; k < 8; ++k) {
    std::memcpy(&lo[k], &r[k], 16);
    std::memcpy(&hi[k], reinterpret_cast<const char*>(&r[k]) + 16, 16);
  }
  _MM_TRANSPOSE4_PS(lo[0], lo[1], lo[2], lo[3]);  // planes 0-3, pixels 0-3
  _MM_TRANSPOSE4_PS(hi[0], hi[1], hi[2], hi[3]);  // planes 0-3, pixels 4-7
  _MM_TRANSPOSE4_PS(lo[4], lo[5], lo[6], lo[7]);  // planes 4-7, pixels 0-3
  _MM_TRANSPOSE4_PS(hi[4], hi[5], hi[6], hi[7]);  // planes 4-7, pixels 4-7
  for (int k = 0; k < 4; ++k) {
    std::memcpy(&r[k], &lo[k], 16);
    std::memcpy(reinterpret_cast<char*>(&r[k]) + 16, &lo[k + 4], 16);
    std::memcpy(&r[k + 4], &hi[k], 16);
    std::memcpy(reinterpret_cast<char*>(&r[k + 4]) + 16, &hi[k + 4], 16);
  }
}

SM_ATTR inline __attribute__((always_inline)) void transpose_l(Vec<double>::type* r) {
  __m128d lo[4], hi[4];
  for (int k = 0; k < 4; ++k) {
    std::memcpy(&lo[k], &r[k], 16);
    std::memcpy(&hi[k], reinterpret_cast<const char*>(&r[k]) + 16, 16);
  }
  const __m128d o[8] = {_mm_unpacklo_pd(lo[0], lo[1]), _mm_unpacklo_pd(lo[2], lo[3]),   // pixel 0
                        _mm_unpackhi_pd(lo[0], lo[1]), _mm_unpackhi_pd(lo[2], lo[3]),   // pixel 1
                        _mm_unpacklo_pd(hi[0], hi[1]), _mm_unpacklo_pd(hi[2], hi[3]),   // pixel 2
                        _mm_unpackhi_pd(hi[0], hi[1]), _mm_unpackhi_pd(hi[2], hi[3])};  // pixel 3
  for (int k = 0; k < 4; ++k) {
    std::memcpy(&r[k], &o[2 * k], 16);
    std::memcpy(reinterpret_cast<char*>(&r[k]) + 16, &o[2 * k + 1], 16);
  }
}
#else
SM_ATTR inline __attribute__((always_inline)) void transpose_l(Vec<float>::type* r) {
  typedef Vec<float>::itype I;
  v8f t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], I{0, 8, 1, 9, 4, 12, 5, 13});
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], I{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], I{0, 1, 8, 9, 4, 5, 12, 13});
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], I{2, 3, 10, 11, 6, 7, 14, 15});
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], I{0, 1, 8, 9, 4, 5, 12, 13});
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], I{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], I{0, 1, 2, 3, 8, 9, 10, 11});
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], I{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

SM_ATTR inline __attribute__((always_inline)) void transpose_l(Vec<double>::type* r) {
  typedef Vec<double>::type V;
  typedef Vec<double>::itype I;
  const V t0 = __builtin_shuffle(r[0], r[1], I{0, 4, 2, 6}), t1 = __builtin_shuffle(r[0], r[1], I{1, 5, 3, 7});
  const V t2 = __builtin_shuffle(r[2], r[3], I{0, 4, 2, 6}), t3 = __builtin_shuffle(r[2], r[3], I{1, 5, 3, 7});
  r[0] = __builtin_shuffle(t0, t2, I{0, 1, 4, 5});
  r[1] = __builtin_shuffle(t1, t3, I{0, 1, 4, 5});
  r[2] = __builtin_shuffle(t0, t2, I{2, 3, 6, 7});
  r[3] = __builtin_shuffle(t1, t3, I{2, 3, 6, 7});
}
#endif

// Unaligned 32-byte loads / stores straight to / from registers.
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef double v4d_u __attribute__((vector_size(32), aligned(8)));
SM_ATTR inline __attribute__((always_inline)) v8f ldu(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
SM_ATTR inline __attribute__((always_inline)) Vec<double>::type ldu(const double* p) {
  return *reinterpret_cast<const v4d_u*>(p);
}
SM_ATTR inline __attribute__((always_inline)) void stu(float* p, v8f v) { *reinterpret_cast<v8f_u*>(p) = v; }
SM_ATTR inline __attribute__((always_inline)) void stu(double* p, Vec<double>::type v) {
  *reinterpret_cast<v4d_u*>(p) = v;
}

// a * b + c with one rounding in the AVX2 copy (the baseline has no FMA: two roundings). Only the
// block kernels use it: every lane of a block runs the same instructions, so a plane's result stays
// independent of its block and lane. Measured on [100, 128, 7, 7] / [100, 64, 14, 14] (1 thread):
// the backward's row pass and the resize taps are bound by the floating-point ports.
SM_ATTR inline __attribute__((always_inline)) v8f fmadd(v8f a, v8f b, v8f c) {
#if SM_F16C
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
SM_ATTR inline __attribute__((always_inline)) Vec<double>::type fmadd(Vec<double>::type a, Vec<double>::type b,
                                                                      Vec<double>::type c) {
#if SM_F16C
  return (Vec<double>::type)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}
template <typename acc_t>
SM_ATTR inline __attribute__((always_inline)) typename Vec<acc_t>::type fmadd(acc_t a, typename Vec<acc_t>::type b,
                                                                              typename Vec<acc_t>::type c) {
#if SM_F16C
  if constexpr (std::is_same<acc_t, float>::value)
    return fmadd((v8f)_mm256_set1_ps(a), b, c);
  else
    return fmadd((Vec<double>::type)_mm256_set1_pd(a), b, c);
#else
  return a * b + c;
#endif
}

// rows [L][n] (plane-major, row stride n) -> X [n] vectors (plane-interleaved), and back.
template <typename acc_t>
SM_ATTR void interleave(typename Vec<acc_t>::type* __restrict X, const acc_t* __restrict rows, int64_t n) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V r[L];
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) r[l] = ldu(rows + l * n + i);
    transpose_l(r);
#pragma GCC unroll 8
    for (int k = 0; k < L; ++k) X[i + k] = r[k];
  }
  for (; i < n; ++i)
    for (int l = 0; l < L; ++l) X[i][l] = rows[l * n + i];
}

template <typename acc_t>
SM_ATTR void deinterleave(acc_t* __restrict rows, const typename Vec<acc_t>::type* __restrict X, int64_t n) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V r[L];
#pragma GCC unroll 8
    for (int k = 0; k < L; ++k) r[k] = X[i + k];
    transpose_l(r);
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) stu(rows + l * n + i, r[l]);
  }
  for (; i < n; ++i)
    for (int l = 0; l < L; ++l) rows[l * n + i] = X[i][l];
}

// Planes u0 .. u0 + nl - 1 (nl <= L; lanes past nl zero) of x into X [HW]; buf: L * HW scratch.
// Element values are converted exactly as load_plane does.
template <typename scalar_t, typename acc_t>
SM_ATTR void load_block(typename Vec<acc_t>::type* __restrict X, const scalar_t* __restrict x, int64_t u0, int nl,
                        int64_t C, int64_t HW, int64_t sc, int64_t ps, acc_t* __restrict buf) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  const int64_t c0 = u0 % C;
  if (ps == 1) {  // NCHW: plane u at x + u * HW
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      if (nl == L) {
        interleave<acc_t>(X, x + u0 * HW, HW);
        return;
      }
    }
    for (int l = 0; l < nl; ++l) {
      const int64_t u = u0 + l;
      load_plane<scalar_t, acc_t>(buf + l * HW, x + (u / C) * C * HW + (u % C) * sc, HW, 1);
    }
    std::fill(buf + nl * HW, buf + L * HW, acc_t(0));
    interleave<acc_t>(X, buf, HW);
    return;
  }
  if (nl == L && c0 + L <= C) {  // channels_last, one sample: L consecutive channels per pixel
    const scalar_t* __restrict p = x + (u0 / C) * C * HW + c0 * sc;
    for (int64_t i = 0; i < HW; ++i) X[i] = vload<scalar_t, acc_t>(p + i * ps);
    return;
  }
  for (int64_t i = 0; i < HW; ++i) X[i] = V{};
  for (int l = 0; l < nl; ++l) {
    const int64_t u = u0 + l;
    const scalar_t* __restrict p = x + (u / C) * C * HW + (u % C) * sc;
    for (int64_t i = 0; i < HW; ++i) X[i][l] = static_cast<acc_t>(p[i * ps]);
  }
}

// Lanes 0 .. nl - 1 of X [HW] to planes u0 .. of dx, converted exactly as store_plane does.
template <typename scalar_t, typename acc_t>
SM_ATTR void store_block(scalar_t* __restrict dx, const typename Vec<acc_t>::type* __restrict X, int64_t u0, int nl,
                         int64_t C, int64_t HW, int64_t sc, int64_t ps, acc_t* __restrict buf) {
  constexpr int L = Vec<acc_t>::L;
  const int64_t c0 = u0 % C;
  if (ps == 1) {
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      if (nl == L) {
        deinterleave<acc_t>(dx + u0 * HW, X, HW);
        return;
      }
    }
    deinterleave<acc_t>(buf, X, HW);
    for (int l = 0; l < nl; ++l) {
      const int64_t u = u0 + l;
      store_plane<scalar_t, acc_t>(dx + (u / C) * C * HW + (u % C) * sc, buf + l * HW, HW, 1);
    }
    return;
  }
  if (nl == L && c0 + L <= C) {
    scalar_t* __restrict p = dx + (u0 / C) * C * HW + c0 * sc;
    for (int64_t i = 0; i < HW; ++i) {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        std::memcpy(p + i * ps, &X[i], sizeof(X[i]));
      } else {
        for (int l = 0; l < L; ++l) p[i * ps + l] = static_cast<scalar_t>(X[i][l]);
      }
    }
    return;
  }
  for (int l = 0; l < nl; ++l) {
    const int64_t u = u0 + l;
    scalar_t* __restrict p = dx + (u / C) * C * HW + (u % C) * sc;
    for (int64_t i = 0; i < HW; ++i) p[i * ps] = static_cast<scalar_t>(X[i][l]);
  }
}

// Lanes of an accumulation vector as doubles: L / 4 vectors of 4.
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
SM_ATTR inline __attribute__((always_inline)) void widen(Vec<float>::type v, v4d* d) {
  v4f lo, hi;
  std::memcpy(&lo, &v, 16);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
  d[0] = __builtin_convertvector(lo, v4d);
  d[1] = __builtin_convertvector(hi, v4d);
}
SM_ATTR inline __attribute__((always_inline)) void widen(Vec<double>::type v, v4d* d) { d[0] = v; }

// Channel partial (mean, M2) of every lane's plane of n pixels, into mean[L], m2[L]: pass 1 sums in
// 4 accumulators (pixel i in i % 4, the tail in the first), pass 2 the centered e and e^2 in 2,
// flushed into double every 4096 pixels; lanes never mix, so a plane's result does not depend on
// its block or lane. Pass 2 also centers X in place on the returned shift: the pass-1 mean, 0 where
// it is not finite (a non-finite shift would make every centered value NaN).
template <typename acc_t>
SM_ATTR typename Vec<acc_t>::type block_twopass(typename Vec<acc_t>::type* __restrict X, int64_t n,
                                                double* __restrict mean, double* __restrict m2) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L, DH = L / 4;
  constexpr int64_t CH = 4096;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += X[i];
    a1 += X[i + 1];
    a2 += X[i + 2];
    a3 += X[i + 3];
  }
  for (; i < n; ++i) a0 += X[i];
  const V m = ((a0 + a1) + (a2 + a3)) / acc_t(n);
  const V sh = (m - m == V{}) ? m : V{};  // x - x == 0 exactly when x is finite
  v4d se[DH] = {}, see[DH] = {};
  for (int64_t c0 = 0; c0 < n; c0 += CH) {
    const int64_t c1 = std::min(n, c0 + CH);
    V e0 = {}, e1 = {}, f0 = {}, f1 = {};
    for (i = c0; i + 2 <= c1; i += 2) {
      const V x0 = X[i], x1 = X[i + 1];
      const V d0 = x0 - m, d1 = x1 - m;
      X[i] = x0 - sh;
      X[i + 1] = x1 - sh;
      e0 += d0;
      e1 += d1;
      f0 = fmadd(d0, d0, f0);
      f1 = fmadd(d1, d1, f1);
    }
    if (i < c1) {
      const V d = X[i] - m;
      X[i] = X[i] - sh;
      e0 += d;
      f0 += d * d;
    }
    v4d t1[DH], t2[DH];
    widen(e0 + e1, t1);
    widen(f0 + f1, t2);
    for (int h = 0; h < DH; ++h) {
      se[h] += t1[h];
      see[h] += t2[h];
    }
  }
  v4d md[DH];
  widen(m, md);
  const double dn = double(n);
  const v4d zero = {};
  for (int h = 0; h < DH; ++h) {
    const v4d v = see[h] - se[h] * se[h] / dn;
    stu(mean + 4 * h, md[h] + se[h] / dn);
    stu(m2 + 4 * h, (v < zero) ? zero : v);  // NaN passes through
  }
  return sh;
}

// resize_plane per lane. Returns the result (tmp when H needs no resize).
template <typename acc_t>
SM_ATTR typename Vec<acc_t>::type* resize_block(typename Vec<acc_t>::type* __restrict d, const ResizeTab<acc_t>& rh,
                                                const ResizeTab<acc_t>& rw, typename Vec<acc_t>::type* __restrict tmp,
                                                typename Vec<acc_t>::type* __restrict out) {
  typedef typename Vec<acc_t>::type V;
  const int64_t W = rw.n_in, W2 = rw.n_out;
  V* rows = d;
  if (!rw.id) {
    const acc_t* __restrict wl = rw.wl.data();
    const acc_t* __restrict wh = rw.wh.data();
    const int32_t* __restrict lo = rw.lo;
    const int32_t* __restrict hi = rw.hi;
    for (int64_t j = 0; j < W2; ++j) {  // column outer: the taps stay in registers
      const acc_t a = wl[j], b = wh[j];
      const int64_t il = lo[j], ih = hi[j];
      for (int64_t h = 0; h < rh.n_in; ++h) tmp[h * W2 + j] = fmadd(a, d[h * W + il], b * d[h * W + ih]);
    }
    rows = tmp;
  }
  if (rh.id) return rows;
  for (int64_t i = 0; i < rh.n_out; ++i) {
    const V* __restrict a = rows + rh.lo[i] * W2;
    const V* __restrict b = rows + rh.hi[i] * W2;
    const acc_t wa = rh.wl[i], wb = rh.wh[i];
    V* __restrict o = out + i * W2;
    for (int64_t j = 0; j < W2; ++j) o[j] = fmadd(wa, a[j], wb * b[j]);
  }
  return out;
}

// The adjoint R_hᵀ · g · R_w of g [H', W'] per lane: along H into tmp [H, W' (+ 1 zero pad column when W
// is resized)], then along W (gather taps) into out [H, W]; fixed summation order (deterministic). tmp:
// H * (W' + 1) vectors. Returns the result (tmp when W needs no resize).
template <typename acc_t>
SM_ATTR const typename Vec<acc_t>::type* adjoint_block(const typename Vec<acc_t>::type* __restrict g,
                                                       const ResizeTab<acc_t>& rh, const ResizeTab<acc_t>& rw,
                                                       typename Vec<acc_t>::type* __restrict tmp,
                                                       typename Vec<acc_t>::type* __restrict out) {
  typedef typename Vec<acc_t>::type V;
  const int64_t W = rw.n_in, W2 = rw.n_out, ld = rw.id ? W2 : W2 + 1;
  if (rh.id && rw.id) return g;
  if (!rh.id) {
    for (int64_t i = 0; i < rh.n_in * ld; ++i) tmp[i] = V{};
    for (int64_t i = 0; i < rh.n_out; ++i) {
      const V* __restrict gi = g + i * W2;
      const acc_t wa = rh.wl[i], wb = rh.wh[i];
      V* a = tmp + rh.lo[i] * ld;
      for (int64_t j = 0; j < W2; ++j) a[j] = fmadd(wa, gi[j], a[j]);
      V* b = tmp + rh.hi[i] * ld;  // may be row a: a separate loop
      for (int64_t j = 0; j < W2; ++j) b[j] = fmadd(wb, gi[j], b[j]);
    }
    if (rw.id) return tmp;
  } else {
    for (int64_t h = 0; h < rh.n_in; ++h) {
      for (int64_t j = 0; j < W2; ++j) tmp[h * ld + j] = g[h * W2 + j];
      tmp[h * ld + W2] = V{};
    }
  }
  const int64_t ta = rw.ta;
  const int32_t* __restrict at = rw.at.data();
  const acc_t* __restrict aw = rw.aw.data();
  for (int64_t h = 0; h < rh.n_in; ++h) {
    const V* __restrict r = tmp + h * ld;
    V* __restrict o = out + h * W;
    for (int64_t w = 0; w < W; ++w) {
      V v = aw[w * ta] * r[at[w * ta]];
      for (int64_t t = 1; t < ta; ++t) v = fmadd(aw[w * ta + t], r[at[w * ta + t]], v);
      o[w] = v;
    }
  }
  return out;
}

// Backward of a block when both H and W are resized: x' row i (resize along H of the W-resized rows
// tmp [H, W']), g' = QM x' + RM and its adjoint along H accumulated into ta [H, W' + 1] (zero pad
// column) in one pass per row: every element sees the operations of resize_plane, the g' map and
// adjoint_block's H loop in the same order.
template <typename acc_t>
SM_ATTR void bwd_rows_block(const typename Vec<acc_t>::type* __restrict tmp, const ResizeTab<acc_t>& rh, int64_t W2,
                            const acc_t* __restrict QM, const typename Vec<acc_t>::type* __restrict rm,
                            typename Vec<acc_t>::type* __restrict ta) {
  typedef typename Vec<acc_t>::type V;
  const int64_t ld = W2 + 1;
  for (int64_t i = 0; i < rh.n_in * ld; ++i) ta[i] = V{};
  for (int64_t i = 0; i < rh.n_out; ++i) {
    const V* __restrict a = tmp + rh.lo[i] * W2;
    const V* __restrict b = tmp + rh.hi[i] * W2;
    const acc_t wa = rh.wl[i], wb = rh.wh[i];
    const acc_t* __restrict q = QM + i * W2;
    const V* __restrict r = rm + i * W2;
    V* ra = ta + rh.lo[i] * ld;
    V* rb = ta + rh.hi[i] * ld;  // may be row ra: per element ra first, as adjoint_block
    for (int64_t j = 0; j < W2; ++j) {
      const V o = fmadd(wa, a[j], wb * b[j]);
      const V g = fmadd(q[j], o, r[j]);
      ra[j] = fmadd(wa, g, ra[j]);
      rb[j] = fmadd(wb, g, rb[j]);
    }
  }
}

// adjoint_block's W gathers (TA taps per input; TA == 0: rw.ta at run time) fused with the final
// dx = (A + S d) + adjoint, in place over X [H, W] (d in, dx out). Column outer: taps in registers.
template <int TA, typename acc_t>
SM_ATTR void bwd_cols_block(const typename Vec<acc_t>::type* __restrict r, int64_t ld, const ResizeTab<acc_t>& rw,
                            int64_t H, typename Vec<acc_t>::type av, typename Vec<acc_t>::type sv,
                            typename Vec<acc_t>::type* __restrict X) {
  typedef typename Vec<acc_t>::type V;
  const int64_t W = rw.n_in, ta = rw.ta;
  const int32_t* __restrict at = rw.at.data();
  const acc_t* __restrict aw = rw.aw.data();
  for (int64_t w = 0; w < W; ++w) {
    if constexpr (TA > 0) {
      acc_t wt[TA];
      int64_t it[TA];
      for (int t = 0; t < TA; ++t) {
        wt[t] = aw[w * TA + t];
        it[t] = at[w * TA + t];
      }
      for (int64_t h = 0; h < H; ++h) {
        const V* __restrict rr = r + h * ld;
        V v = wt[0] * rr[it[0]];
        for (int t = 1; t < TA; ++t) v = fmadd(wt[t], rr[it[t]], v);
        X[h * W + w] = fmadd(sv, X[h * W + w], av) + v;
      }
    } else {
      for (int64_t h = 0; h < H; ++h) {
        const V* __restrict rr = r + h * ld;
        V v = aw[w * ta] * rr[at[w * ta]];
        for (int64_t t = 1; t < ta; ++t) v = fmadd(aw[w * ta + t], rr[at[w * ta + t]], v);
        X[h * W + w] = fmadd(sv, X[h * W + w], av) + v;
      }
    }
  }
}

// Tile sum as the tile-row kernels form it from per-column sums c[0 .. P): lanes of one vector
// first (column l + i L added in order i), then the group_sum tree over min(P, L) lanes.
template <int P, typename acc_t>
SM_ATTR inline __attribute__((always_inline)) typename Vec<acc_t>::type tile_reduce(
    const typename Vec<acc_t>::type* c) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  constexpr int GL = P > L ? L : P, GV = P > L ? P / L : 1;
  V d[GL];
  for (int l = 0; l < GL; ++l) {
    d[l] = c[l];
    for (int i = 1; i < GV; ++i) d[l] += c[i * L + l];
  }
  return tree_sum<GL, V>(d);
}

// Tile stats (P x P tiles) of a block x' = R_h rows per lane (rows [H, W2]: the block resized along W;
// RH: H is resized too, else x' = rows), fused with the resize along H and in one pass: each tile is
// shifted by its first x' value K, tm = K, tc = sum(e) / n, tv = sum(e^2) - sum(e)^2 / n with e = x' - K
// (column sums as the tile-row kernels, then their lane tree). One pass is accurate here: (K - tile
// mean)^2 <= M2, so sum(e^2) <= (n + 1) M2 bounds the cancellation, and a constant tile gives exactly
// 0. Measured on [100, 128, 7, 7] (1 thread): the two-pass tile kernel over a stored x' took ~0.13 ms
// and the resize along H ~0.08 ms of a ~0.53 ms forward.
template <int P, bool RH, typename acc_t>
SM_ATTR void block_resize_tiles(const typename Vec<acc_t>::type* __restrict rows, const ResizeTab<acc_t>& rh,
                                int64_t W2, acc_t inv_nf, typename Vec<acc_t>::type* __restrict tm,
                                typename Vec<acc_t>::type* __restrict tc, typename Vec<acc_t>::type* __restrict tv) {
  typedef typename Vec<acc_t>::type V;
  const int64_t ntw = W2 / P;
  const V zero = {};
  int64_t t = 0;
  for (int64_t i0 = 0; i0 < rh.n_out; i0 += P) {
    const V* a[P];
    const V* b[P];
    acc_t wa[P], wb[P];
    for (int r = 0; r < P; ++r) {
      if (RH) {
        a[r] = rows + rh.lo[i0 + r] * W2;
        b[r] = rows + rh.hi[i0 + r] * W2;
        wa[r] = rh.wl[i0 + r];
        wb[r] = rh.wh[i0 + r];
      } else {
        a[r] = rows + (i0 + r) * W2;
      }
    }
    for (int64_t j0 = 0; j0 < ntw * P; j0 += P, ++t) {
      auto xv = [&](int r, int q) __attribute__((always_inline)) {
        if constexpr (RH)
          return fmadd(wa[r], a[r][j0 + q], wb[r] * b[r][j0 + q]);
        else
          return a[r][j0 + q];
      };
      const V K = xv(0, 0);
      V e1[P], e2[P];
      for (int q = 0; q < P; ++q) {
        const V e = xv(0, q) - K;
        e1[q] = e;
        e2[q] = e * e;
      }
      for (int r = 1; r < P; ++r) {
        for (int q = 0; q < P; ++q) {
          const V e = xv(r, q) - K;
          e1[q] += e;
          e2[q] = fmadd(e, e, e2[q]);
        }
      }
      const V sa = tile_reduce<P, acc_t>(e1), sb = tile_reduce<P, acc_t>(e2);
      const V c = sa * inv_nf;
      const V v = sb - sa * c;
      tm[t] = K;
      tc[t] = c;
      tv[t] = (v < zero) ? zero : v;  // NaN passes through
    }
  }
}

// Per-thread scratch of the block path (vectors of L planes).
template <typename acc_t>
struct BlockScratch {
  typedef typename Vec<acc_t>::type V;
  std::unique_ptr<V[]> X, tmp, xr, ta, ob, tm, tc, tv;
  std::vector<acc_t> buf;
  BlockScratch(int64_t HW, int64_t H, int64_t W2, int64_t HW2, int64_t T)
      : X(new V[HW]), tmp(new V[H * W2]), xr(new V[HW2]), ta(new V[H * (W2 + 1)]), ob(new V[HW]),
        tm(new V[T]), tc(new V[T]), tv(new V[T]), buf(Vec<acc_t>::L * HW) {}
};

// Patch partial of one group of n planes from their tile triples in double, mt [T][ld] (tile means)
// and v [T][ld] (tile M2), in two passes: mean = sum(mt) / n, M2 = sum(v) + tn sum((mt - mean)^2).
// Every sum runs in a fixed order: 4 accumulators (plane j in j % 4), ((0 + 1) + (2 + 3)), the tail.
SM_ATTR void group_patches(const double* __restrict mt, const double* __restrict v, int64_t T, int64_t ld,
                           int64_t n, double tn, double* __restrict gmean, double* __restrict gm2) {
  for (int64_t t = 0; t < T; ++t) {
    const double* __restrict a = mt + t * ld;
    const double* __restrict b = v + t * ld;
    v4d s = {};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) s += ldu(a + j);
    double m = (s[0] + s[1]) + (s[2] + s[3]);
    for (; j < n; ++j) m += a[j];
    m /= double(n);
    v4d q = {}, w = {};
    for (j = 0; j + 4 <= n; j += 4) {
      const v4d d = ldu(a + j) - m;
      q += d * d;
      w += ldu(b + j);
    }
    double qs = (q[0] + q[1]) + (q[2] + q[3]), ws = (w[0] + w[1]) + (w[2] + w[3]);
    for (; j < n; ++j) {
      const double d = a[j] - m;
      qs += d * d;
      ws += b[j];
    }
    gmean[t] = m;
    gm2[t] = ws + tn * qs;
  }
}

template <typename scalar_t>
SM_ATTR void forward_resize(const scalar_t* __restrict x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sc,
                            int64_t ps, int64_t p, const sm_common::Resize1D& rh_, const sm_common::Resize1D& rw_,
                            double* __restrict umean, double* __restrict um2,  // [B*C]
                            double* __restrict gmean, double* __restrict gm2,  // [G*K]
                            const int64_t* __restrict gb, int64_t G) {
  using acc_t = acc_t_of<scalar_t>;
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L, DH = L / 4;
  const ResizeTab<acc_t> rh(rh_), rw(rw_);
  const sm_common::Resize1D id_h = sm_common::make_resize(H, 1);
  const ResizeTab<acc_t> rh_w(id_h);  // H left alone: the blocks' resize along W
  const int64_t HW = H * W, H2 = rh.n_out, W2 = rw.n_out, ntw = W2 / p, T = (H2 / p) * ntw;
  const double tn = double(p * p);
  const acc_t inv_nf = acc_t(1) / acc_t(p * p);
  // Blocks for the tile sizes block_resize_tiles is instantiated for; the others per plane.
  const bool blocks = p == 1 || p == 2 || p == 4 || p == 8 || p == 16 || p == 32;
  int64_t ld = 0;  // planes per group, + L: room for a block's padding lanes
  for (int64_t g = 0; g < G; ++g) ld = std::max(ld, gb[g + 1] - gb[g]);
  ld += L;
#pragma omp parallel
  {
    std::vector<double> gmt(T * ld), gv(T * ld);  // the group's tile triples, [T][ld]
    std::vector<acc_t> xs, tmp, xr, s1, s2, mrow, tmv, tcv, tvv;
    std::unique_ptr<BlockScratch<acc_t>> bs;
    if (blocks) {
      bs.reset(new BlockScratch<acc_t>(HW, H, W2, H2 * W2, T));
    } else {
      xs.resize(HW);
      tmp.resize(H * W2);
      xr.resize(H2 * W2);
      s1.resize(W2);
      s2.resize(W2);
      mrow.resize(W2);
      tmv.resize(T + 8);
      tcv.resize(T + 8);
      tvv.resize(T + 8);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t u0 = gb[g], u1 = gb[g + 1];
      if (blocks) {
        for (int64_t u = u0; u < u1; u += L) {
          const int nl = int(std::min<int64_t>(L, u1 - u));
          V* __restrict X = bs->X.get();
          if (ps == 1) prefetch_range(x + (u + nl) * HW, L * HW * int64_t(sizeof(scalar_t)));
          load_block<scalar_t, acc_t>(X, x, u, nl, C, HW, sc, ps, bs->buf.data());
          double bmean[L], bm2[L];
          const V sv = block_twopass<acc_t>(X, HW, bmean, bm2);
          for (int l = 0; l < nl; ++l) {
            umean[u + l] = bmean[l];
            um2[u + l] = bm2[l];
          }
          const V* r = resize_block<acc_t>(X, rh_w, rw, bs->tmp.get(), nullptr);  // along W only
          V* __restrict btm = bs->tm.get();
          V* __restrict btc = bs->tc.get();
          V* __restrict btv = bs->tv.get();
          switch (p * (rh.id ? -1 : 1)) {
            case 1: block_resize_tiles<1, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case 2: block_resize_tiles<2, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case 4: block_resize_tiles<4, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case 8: block_resize_tiles<8, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case 16: block_resize_tiles<16, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case 32: block_resize_tiles<32, true, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case -1: block_resize_tiles<1, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case -2: block_resize_tiles<2, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case -4: block_resize_tiles<4, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case -8: block_resize_tiles<8, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            case -16: block_resize_tiles<16, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
            default: block_resize_tiles<32, false, acc_t>(r, rh, W2, inv_nf, btm, btc, btv); break;
          }
          // Tile means mt = shift + (tm + tc) and M2 of the L lanes (lanes past nl: scratch).
          v4d sd[DH];
          widen(sv, sd);
          double* __restrict mj = gmt.data() + (u - u0);
          double* __restrict vj = gv.data() + (u - u0);
          for (int64_t t = 0; t < T; ++t) {
            v4d a[DH], c[DH], w[DH];
            widen(btm[t], a);
            widen(btc[t], c);
            widen(btv[t], w);
            for (int h = 0; h < DH; ++h) {
              stu(mj + t * ld + 4 * h, sd[h] + (a[h] + c[h]));
              stu(vj + t * ld + 4 * h, w[h]);
            }
          }
        }
      } else {
        acc_t* __restrict tm = tmv.data();
        acc_t* __restrict tc = tcv.data();
        acc_t* __restrict tv = tvv.data();
        for (int64_t u = u0; u < u1; ++u) {
          load_plane<scalar_t, acc_t>(xs.data(), x + (u / C) * C * HW + (u % C) * sc, HW, ps);
          plane_twopass<acc_t, acc_t>(xs.data(), HW, umean + u, um2 + u, 0);
          const acc_t s = std::isfinite(umean[u]) ? static_cast<acc_t>(umean[u]) : acc_t(0);
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) xs[i] -= s;
          const acc_t* r = resize_plane<acc_t>(xs.data(), rh, rw, tmp.data(), xr.data());
          for (int64_t i = 0; i < H2 / p; ++i)
            nchw_tilerow<acc_t, acc_t>(r + i * p * W2, W2, p, inv_nf, false, s1.data(), s2.data(), mrow.data(),
                                       tm + i * ntw, tc + i * ntw, tv + i * ntw);
          for (int64_t t = 0; t < T; ++t) {
            gmt[t * ld + (u - u0)] = double(s) + (double(tm[t]) + double(tc[t]));
            gv[t * ld + (u - u0)] = double(tv[t]);
          }
        }
      }
      group_patches(gmt.data(), gv.data(), T, ld, u1 - u0, tn, gmean + g * T, gm2 + g * T);
    }
  }
}

// Backward per plane: d = x - M[c] (the channel term S (x - M) and the resize input: x' - M = R_h d
// R_wᵀ), g' = QM (x' - M) + RM[c] on [H', W'] (per-pixel maps: QM = Q of the pixel's patch, RM[c] =
// RK[c, patch of the pixel] = P - Q (pmean - M[c]), both terms O(spread) however large the mean), then
// dx = A + S d + R_hᵀ g' R_w. In blocks of L consecutive channels of one sample (the last block of a
// sample padded), RM interleaved per channel block (built from the C K constants: the serial setup
// was ~50 us of [100, 64, 14, 14]'s backward when formed per channel and pixel).
template <typename scalar_t, typename acc_t>
SM_ATTR void backward_resize(const scalar_t* __restrict x, scalar_t* __restrict dx, int64_t B, int64_t C, int64_t H,
                             int64_t W, int64_t sc, int64_t ps, const sm_common::Resize1D& rh_,
                             const sm_common::Resize1D& rw_, const acc_t* __restrict A, const acc_t* __restrict S,
                             const acc_t* __restrict M, const acc_t* __restrict QM /*[H'W']*/,
                             const acc_t* __restrict RK /*[C*K]*/, const int32_t* __restrict kmap /*[H'W']*/,
                             int64_t K) {
  typedef typename Vec<acc_t>::type V;
  constexpr int L = Vec<acc_t>::L;
  const ResizeTab<acc_t> rh(rh_), rw(rw_);
  const int64_t HW = H * W, HW2 = rh.n_out * rw.n_out, NCB = (C + L - 1) / L, NB = B * NCB;
  // Both dimensions resized: the fused row / column passes (rh_w: H left alone, for the W pass).
  const bool both = !rh.id && !rw.id;
  const sm_common::Resize1D id_h = sm_common::make_resize(H, 1);
  const ResizeTab<acc_t> rh_w(id_h);
  std::unique_ptr<V[]> RMt(new V[NCB * HW2]), rk(new V[K]);
  for (int64_t cb = 0; cb < NCB; ++cb) {
    for (int64_t k = 0; k < K; ++k) {
      V v = {};
      for (int l = 0; l < L && cb * L + l < C; ++l) v[l] = RK[(cb * L + l) * K + k];
      rk[k] = v;
    }
    for (int64_t i = 0; i < HW2; ++i) RMt[cb * HW2 + i] = rk[kmap[i]];
  }
#pragma omp parallel
  {
    BlockScratch<acc_t> bs(HW, H, rw.n_out, HW2, 0);
#pragma omp for schedule(dynamic, std::max<int64_t>(1, NB / 256))
    for (int64_t k = 0; k < NB; ++k) {
      const int64_t b = k / NCB, cb = k % NCB, c0 = cb * L, u0 = b * C + c0;
      const int nl = int(std::min<int64_t>(L, C - c0));
      V* __restrict X = bs.X.get();
      if (ps == 1) prefetch_range(x + (u0 + L) * HW, L * HW * int64_t(sizeof(scalar_t)));  // the next block
      load_block<scalar_t, acc_t>(X, x, u0, nl, C, HW, sc, ps, bs.buf.data());
      V av = {}, sv = {}, mv = {};
      for (int l = 0; l < nl; ++l) {
        av[l] = A[c0 + l];
        sv[l] = S[c0 + l];
        mv[l] = M[c0 + l];
      }
      for (int64_t i = 0; i < HW; ++i) X[i] -= mv;
      const V* __restrict rm = RMt.get() + cb * HW2;
      if (both) {
        resize_block<acc_t>(X, rh_w, rw, bs.tmp.get(), nullptr);  // along W only: into tmp
        bwd_rows_block<acc_t>(bs.tmp.get(), rh, rw.n_out, QM, rm, bs.ta.get());
        switch (rw.ta) {
          case 2: bwd_cols_block<2, acc_t>(bs.ta.get(), rw.n_out + 1, rw, H, av, sv, X); break;
          case 3: bwd_cols_block<3, acc_t>(bs.ta.get(), rw.n_out + 1, rw, H, av, sv, X); break;
          case 4: bwd_cols_block<4, acc_t>(bs.ta.get(), rw.n_out + 1, rw, H, av, sv, X); break;
          default: bwd_cols_block<0, acc_t>(bs.ta.get(), rw.n_out + 1, rw, H, av, sv, X); break;
        }
      } else {
        V* __restrict gp = resize_block<acc_t>(X, rh, rw, bs.tmp.get(), bs.xr.get());
        for (int64_t i = 0; i < HW2; ++i) gp[i] = fmadd(QM[i], gp[i], rm[i]);
        const V* __restrict dr = adjoint_block<acc_t>(gp, rh, rw, bs.ta.get(), bs.ob.get());
        for (int64_t i = 0; i < HW; ++i) X[i] = fmadd(sv, X[i], av) + dr[i];
      }
      store_block<scalar_t, acc_t>(dx, X, u0, nl, C, HW, sc, ps, bs.buf.data());
    }
  }
}

#endif  // DDFAST_STAT_MATCH_KERNEL_PART
