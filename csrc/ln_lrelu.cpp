// DiM critic block, CPU backend (OpenMP): LayerNorm over each sample's D = C·H·W elements with a
// per-position affine, then LeakyReLU — forward, backward and the closed-form double backward
// (specs/dim-dcgm.md §A4 target (1); the math and the float64 oracle are in ddfast/reference/ln_lrelu.py).
//
//   μ = ⟨x⟩, σ² = ⟨(x − μ)²⟩, r = 1/√(σ² + ε), x̂ = (x − μ)·r, z = γ x̂ + β, m = z > 0 ? 1 : slope, y = m·z
//   backward (g):   h = g·m·γ,  dx = r·(h − ⟨h⟩ − x̂⟨h x̂⟩),  dγ = Σ_n g·m·x̂,  dβ = Σ_n g·m
//   double backward (cotangents u of dx, v_γ of dγ, v_β of dβ), w = g·m·v_γ, ū = ⟨u⟩, c = ⟨u x̂⟩,
//   a = ⟨h⟩, b = ⟨h x̂⟩, e = ⟨h u⟩ − a·ū, ũ = r·(u − ū − x̂·c):
//     dg  = m·(γ·ũ + v_γ·x̂ + v_β)
//     dx  = r·(w − ⟨w⟩) − r²c·(h − a) − r²b·(u − ū) + x̂·(r²(3bc − e) − r⟨w x̂⟩)
//     dγ  = Σ_n g·m·ũ                  (dβ = 0: the mask is piecewise constant)
//
// Layout: every activation-sized tensor arrives as a [N, D] row view with unit element stride and any
// row (sample) stride; ddfast/ops/ln_lrelu.py makes such views of contiguous, channels_last and other
// dense layouts without copies (the per-position parameters are permuted to the same element order).
// Outputs are contiguous [N, D] from the page-resident buffer cache (csrc/buffer_cache.cpp).
//
// Passes. Forward, per sample (OpenMP over samples): Σx, then Σ(x − μ₀) and Σ(x − μ₀)² around the
// rounded mean μ₀ (exact two-pass variance with the first-order correction), then y; the sample (≤ a
// few MB) is re-read from cache. Backward and double backward: the samples are split into kSlots
// fixed ranges (OpenMP over the ranges, no barrier inside); a range is walked in tiles of samples
// whose inputs fill about kTileBytes: pass A reduces each sample's means (2 in the backward, 7 in the
// double backward), pass B re-reads the tile from cache in column chunks, writes the activation-sized
// outputs and adds the samples, in order, to the range's own per-position partial sums of the
// parameter gradients; a last pass (OpenMP over columns) sums the kSlots partials in slot order.
// Traffic per call: backward reads g and x twice (the second time from L2/L3) and writes dx; the
// double backward reads u, g, x twice and writes dg and dx.
//
// Precision: element math in float (double for float64); row sums leave float lanes for double every
// kChunk elements; per-sample scalars are double; the parameter gradients are float partial sums over
// ≤ N/kSlots samples each, added in double.
//
// Determinism: the ranges depend on N only and every sum runs in a fixed order, so results are
// bitwise identical for any thread count.
//
// ISA: the per-row code is compiled for the baseline (x86-64-v2) and again with AVX2 + FMA, picked at
// run time (DDFAST_LN_LRELU_ISA=base forces the baseline copy).
//
// NaN/Inf: propagate like the torch composition (a non-finite x makes its whole sample NaN); nothing raises.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffer_cache.h"
#include "parallel.h"

#define DDFAST_LNL_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDFAST_LNL_X86 1
#endif

namespace ddfast {
namespace lnl {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Row sums leave their float vector lanes for double every kChunk elements.
constexpr int64_t kChunk = 256;
// Below this many elements everything runs on one thread.
constexpr int64_t kParallelElems = 32768;
// Backward and double backward: the samples are split into kSlots fixed ranges (independent of the
// thread count), each with its own per-position partial sums of the parameter gradients; threads take
// whole slots, so the only barriers are the two region ends. A slot walks its samples in tiles whose
// activation-sized inputs take about kTileBytes (re-read from L2/L3 in pass B).
constexpr int64_t kSlots = 24;
constexpr int64_t kTileBytes = int64_t(4) << 20;
// Column chunk of pass B (its slice of the slot's partial sums and of the parameters stays in L1).
constexpr int64_t kColChunk = 1024;

struct Params {
  int64_t N = 0, D = 0;
  double slope = 0.01, eps = 1e-5;
};

// ----------------------------------------------------------------------------------------------
// per-row work (force-inlined into the baseline and the AVX2 copies below)
// ----------------------------------------------------------------------------------------------
// The LeakyReLU slope mask m = z > 0 ? 1 : slope (torch: z = 0 and NaN take slope), y = z·m (exact:
// ·1, or the same ·slope as torch). Decided on the bit pattern (0 < bits <= bits(+inf) as a signed
// integer) with integer ops only: under the build's -ftrapping-math GCC does not if-convert float
// compares, which left these loops scalar with a data-dependent branch (6 ns per element on random
// signs, 20x the vectorised loop).
DDFAST_LNL_INLINE float mask(float z, float slope) {
  const int32_t b = __builtin_bit_cast(int32_t, z);
  const int32_t pos = -int32_t((b > 0) & (b <= 0x7f800000));  // all ones where z > 0
  return __builtin_bit_cast(float, (__builtin_bit_cast(int32_t, 1.0f) & pos) | (__builtin_bit_cast(int32_t, slope) & ~pos));
}
DDFAST_LNL_INLINE double mask(double z, double slope) {
  const int64_t b = __builtin_bit_cast(int64_t, z);
  const int64_t pos = -int64_t((b > 0) & (b <= 0x7ff0000000000000LL));
  return __builtin_bit_cast(double, (__builtin_bit_cast(int64_t, 1.0) & pos) | (__builtin_bit_cast(int64_t, slope) & ~pos));
}

template <typename T, typename A>
DDFAST_LNL_INLINE void fwd_row(const T* __restrict x, const A* __restrict w, const A* __restrict b, int64_t D, A slope,
                               double eps, T* __restrict y, A* mean_out, A* rstd_out) {
  double s = 0.0;
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t c1 = std::min(D, c0 + kChunk);
    A acc = A(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = c0; i < c1; ++i) acc += static_cast<A>(x[i]);
    s += double(acc);
  }
  const A mu0 = A(s / double(D));
  double s1 = 0.0, s2 = 0.0;
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t c1 = std::min(D, c0 + kChunk);
    A a1 = A(0), a2 = A(0);
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = c0; i < c1; ++i) {
      const A d = static_cast<A>(x[i]) - mu0;
      a1 += d;
      a2 += d * d;
    }
    s1 += double(a1);
    s2 += double(a2);
  }
  const double dm = s1 / double(D);
  double var = s2 / double(D) - dm * dm;
  if (var < 0.0) var = 0.0;  // (NaN stays NaN)
  const A mu = A(double(mu0) + dm);
  const A r = A(1.0 / std::sqrt(var + eps));
  *mean_out = mu;
  *rstd_out = r;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const A xh = (static_cast<A>(x[i]) - mu) * r;
    const A z = w[i] * xh + b[i];
    y[i] = static_cast<T>(z * mask(z, slope));
  }
}

// pass A of the backward: sums[0] = ⟨h⟩, sums[1] = ⟨h x̂⟩ of one sample
template <typename T, typename A>
DDFAST_LNL_INLINE void bwd_row(const T* __restrict g, const T* __restrict x, const A* __restrict w,
                               const A* __restrict b, int64_t D, A slope, A mu, A r, double* sums) {
  double s_h = 0.0, s_hx = 0.0;
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t c1 = std::min(D, c0 + kChunk);
    A a1 = A(0), a2 = A(0);
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = c0; i < c1; ++i) {
      const A xh = (static_cast<A>(x[i]) - mu) * r;
      const A z = w[i] * xh + b[i];
      const A h = static_cast<A>(g[i]) * mask(z, slope) * w[i];
      a1 += h;
      a2 += h * xh;
    }
    s_h += double(a1);
    s_hx += double(a2);
  }
  sums[0] = s_h / double(D);
  sums[1] = s_hx / double(D);
}

// pass B of the backward: columns [i0, i1) of samples [n0, n1): dx, and dγ/dβ accumulated in sample order
template <typename T, typename A>
DDFAST_LNL_INLINE void bwd_cols(const T* __restrict g, int64_t sg, const T* __restrict x, int64_t sx,
                                const A* __restrict w, const A* __restrict b, const A* mean, const A* rstd,
                                const double* sums, int64_t n0, int64_t n1, int64_t i0, int64_t i1, A slope, int64_t D,
                                T* __restrict dx, A* __restrict dw, A* __restrict db) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* gr = g + n * sg;
    const T* xr = x + n * sx;
    T* out = dx + n * D;
    const A mu = mean[n], r = rstd[n], a = A(sums[2 * n]), bb = A(sums[2 * n + 1]);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const A xh = (static_cast<A>(xr[i]) - mu) * r;
      const A z = w[i] * xh + b[i];
      const A gm = static_cast<A>(gr[i]) * mask(z, slope);
      const A h = gm * w[i];
      out[i] = static_cast<T>(r * (h - a - xh * bb));
      dw[i] += gm * xh;
      db[i] += gm;
    }
  }
}

// Per-sample scalars of the double backward (pass A writes them, pass B reads them).
constexpr int kDbl = 6;  // ū, c, a, b, ⟨w⟩, K = r²(3bc − e) − r⟨w x̂⟩

template <typename T, typename A>
DDFAST_LNL_INLINE void dbl_row(const T* __restrict u, const T* __restrict g, const T* __restrict x,
                               const A* __restrict vw, const A* __restrict w, const A* __restrict b, int64_t D, A slope,
                               A mu, A r, double* out) {
  double s[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t c1 = std::min(D, c0 + kChunk);
    A a0 = A(0), a1 = A(0), a2 = A(0), a3 = A(0), a4 = A(0), a5 = A(0), a6 = A(0);
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6)
    for (int64_t i = c0; i < c1; ++i) {
      const A xh = (static_cast<A>(x[i]) - mu) * r;
      const A z = w[i] * xh + b[i];
      const A gm = static_cast<A>(g[i]) * mask(z, slope);
      const A h = gm * w[i];
      const A wv = gm * vw[i];
      const A uu = static_cast<A>(u[i]);
      a0 += wv;
      a1 += wv * xh;
      a2 += h;
      a3 += h * xh;
      a4 += uu;
      a5 += uu * xh;
      a6 += h * uu;
    }
    s[0] += double(a0), s[1] += double(a1), s[2] += double(a2), s[3] += double(a3);
    s[4] += double(a4), s[5] += double(a5), s[6] += double(a6);
  }
  const double inv = 1.0 / double(D), rd = double(r);
  const double mw = s[0] * inv, mwx = s[1] * inv, a = s[2] * inv, bb = s[3] * inv;
  const double ubar = s[4] * inv, c = s[5] * inv, e = s[6] * inv - a * ubar;
  out[0] = ubar, out[1] = c, out[2] = a, out[3] = bb, out[4] = mw;
  out[5] = rd * rd * (3.0 * bb * c - e) - rd * mwx;
}

template <typename T, typename A>
DDFAST_LNL_INLINE void dbl_cols(const T* __restrict u, int64_t su, const T* __restrict g, int64_t sg,
                                const T* __restrict x, int64_t sx, const A* __restrict vw, const A* __restrict vb,
                                const A* __restrict w, const A* __restrict b, const A* mean, const A* rstd,
                                const double* sc, int64_t n0, int64_t n1, int64_t i0, int64_t i1, A slope, int64_t D,
                                T* __restrict dg, T* __restrict dx, A* __restrict dw) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* ur = u + n * su;
    const T* gr = g + n * sg;
    const T* xr = x + n * sx;
    T* dgr = dg + n * D;
    T* dxr = dx + n * D;
    const double* q = sc + kDbl * n;
    const A mu = mean[n], r = rstd[n];
    const double rd = double(r);
    const A ubar = A(q[0]), c = A(q[1]), a = A(q[2]), mw = A(q[4]), K = A(q[5]);
    const A r2c = A(rd * rd * q[1]), r2b = A(rd * rd * q[3]);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const A xh = (static_cast<A>(xr[i]) - mu) * r;
      const A z = w[i] * xh + b[i];
      const A m = mask(z, slope);
      const A gm = static_cast<A>(gr[i]) * m;
      const A h = gm * w[i];
      const A wv = gm * vw[i];
      const A uc = static_cast<A>(ur[i]) - ubar;
      const A ut = r * (uc - xh * c);
      dgr[i] = static_cast<T>(m * (w[i] * ut + vw[i] * xh + vb[i]));
      dxr[i] = static_cast<T>(r * (wv - mw) - r2c * (h - a) - r2b * uc + xh * K);
      dw[i] += gm * ut;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// baseline and AVX2 copies
// ----------------------------------------------------------------------------------------------
#define DDFAST_LNL_COPIES(NAME, PARAMS, ARGS)                                                          \
  template <typename T, typename A>                                                                    \
  __attribute__((noinline)) void NAME##_base PARAMS { NAME<T, A> ARGS; }                               \
  DDFAST_LNL_AVX2_COPY(NAME, PARAMS, ARGS)                                                             \
  template <typename T, typename A>                                                                    \
  inline void NAME##_any(bool avx2, DDFAST_LNL_UNPAREN PARAMS) { DDFAST_LNL_PICK(NAME, ARGS) }

#define DDFAST_LNL_UNPAREN(...) __VA_ARGS__
#ifdef DDFAST_LNL_X86
#define DDFAST_LNL_AVX2_COPY(NAME, PARAMS, ARGS) \
  template <typename T, typename A>              \
  __attribute__((target("avx2,fma"), noinline)) void NAME##_avx2 PARAMS { NAME<T, A> ARGS; }
#define DDFAST_LNL_PICK(NAME, ARGS) \
  if (avx2)                         \
    NAME##_avx2<T, A> ARGS;         \
  else                              \
    NAME##_base<T, A> ARGS;
#else
#define DDFAST_LNL_AVX2_COPY(NAME, PARAMS, ARGS)
#define DDFAST_LNL_PICK(NAME, ARGS) \
  (void)avx2;                       \
  NAME##_base<T, A> ARGS;
#endif

DDFAST_LNL_COPIES(fwd_row,
                  (const T* x, const A* w, const A* b, int64_t D, A slope, double eps, T* y, A* mean_out, A* rstd_out),
                  (x, w, b, D, slope, eps, y, mean_out, rstd_out))
DDFAST_LNL_COPIES(bwd_row, (const T* g, const T* x, const A* w, const A* b, int64_t D, A slope, A mu, A r, double* sums),
                  (g, x, w, b, D, slope, mu, r, sums))
DDFAST_LNL_COPIES(bwd_cols,
                  (const T* g, int64_t sg, const T* x, int64_t sx, const A* w, const A* b, const A* mean,
                   const A* rstd, const double* sums, int64_t n0, int64_t n1, int64_t i0, int64_t i1, A slope,
                   int64_t D, T* dx, A* dw, A* db),
                  (g, sg, x, sx, w, b, mean, rstd, sums, n0, n1, i0, i1, slope, D, dx, dw, db))
DDFAST_LNL_COPIES(dbl_row,
                  (const T* u, const T* g, const T* x, const A* vw, const A* w, const A* b, int64_t D, A slope, A mu,
                   A r, double* out),
                  (u, g, x, vw, w, b, D, slope, mu, r, out))
DDFAST_LNL_COPIES(dbl_cols,
                  (const T* u, int64_t su, const T* g, int64_t sg, const T* x, int64_t sx, const A* vw, const A* vb,
                   const A* w, const A* b, const A* mean, const A* rstd, const double* sc, int64_t n0, int64_t n1,
                   int64_t i0, int64_t i1, A slope, int64_t D, T* dg, T* dx, A* dw),
                  (u, su, g, sg, x, sx, vw, vb, w, b, mean, rstd, sc, n0, n1, i0, i1, slope, D, dg, dx, dw))

// The AVX2 copy when the CPU has AVX2 and FMA, unless DDFAST_LN_LRELU_ISA=base (read on every call).
inline bool use_avx2() {
#ifdef DDFAST_LNL_X86
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("DDFAST_LN_LRELU_ISA");
  return cpu && !(env != nullptr && std::strcmp(env, "base") == 0);
#else
  return false;
#endif
}

inline bool parallel(const Params& p) { return p.N * p.D >= kParallelElems && num_threads() > 1; }

// Samples per tile of a slot.
inline int64_t tile_samples(int64_t bytes_per_sample) {
  return std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, bytes_per_sample));
}

inline int64_t num_slots(const Params& p) { return std::max<int64_t>(1, std::min(p.N, kSlots)); }

// Slot s covers samples [slot_begin(s), slot_begin(s + 1)).
inline int64_t slot_begin(const Params& p, int64_t s) { return s * p.N / num_slots(p); }

// Scratch for `rows` slot partial sums of D entries (page-resident buffers of the cache; each slot
// zeroes its own rows).
template <typename A>
at::Tensor slot_parts(int64_t rows, int64_t D) {
  return cached_empty({rows * D}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value),
                      at::MemoryFormat::Contiguous);
}

// Σ over the slots of parts[s·D + i] (in slot order, in double) for i in [0, D): the parameter gradient.
template <typename A>
void reduce_slots(const A* parts, const Params& p, A* out, bool par) {
  const int64_t S = num_slots(p), nchunks = (p.D + kColChunk - 1) / kColChunk;
#pragma omp parallel for schedule(static) if (par && nchunks > 1)
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t i0 = k * kColChunk, i1 = std::min(p.D, i0 + kColChunk);
    double acc[kColChunk];
    for (int64_t i = i0; i < i1; ++i) acc[i - i0] = 0.0;
    for (int64_t sl = 0; sl < S; ++sl) {
      const A* src = parts + sl * p.D;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) acc[i - i0] += double(src[i]);
    }
    for (int64_t i = i0; i < i1; ++i) out[i] = A(acc[i - i0]);
  }
}

template <typename T>
void run_forward(const T* x, int64_t sx, const acc_t<T>* w, const acc_t<T>* b, const Params& p, T* y, acc_t<T>* mean,
                 acc_t<T>* rstd) {
  using A = acc_t<T>;
  const bool avx2 = use_avx2();
  const A slope = A(p.slope);
#pragma omp parallel for schedule(static) if (p.N > 1 && parallel(p))
  for (int64_t n = 0; n < p.N; ++n)
    fwd_row_any<T, A>(avx2, x + n * sx, w, b, p.D, slope, p.eps, y + n * p.D, mean + n, rstd + n);
}

template <typename T>
void run_backward(const T* g, int64_t sg, const T* x, int64_t sx, const acc_t<T>* w, const acc_t<T>* b,
                  const acc_t<T>* mean, const acc_t<T>* rstd, const Params& p, T* dx, acc_t<T>* dw, acc_t<T>* db) {
  using A = acc_t<T>;
  const bool avx2 = use_avx2(), par = parallel(p);
  const A slope = A(p.slope);
  const int64_t S = num_slots(p), tile = tile_samples(2 * p.D * int64_t(sizeof(T)));
  std::vector<double> sums(size_t(2 * p.N));
  at::Tensor parts = slot_parts<A>(2 * S, p.D);
  A* pw = parts.data_ptr<A>();
  A* pb = pw + S * p.D;
#pragma omp parallel for schedule(static) if (par && S > 1)
  for (int64_t sl = 0; sl < S; ++sl) {
    A* aw = pw + sl * p.D;
    A* ab = pb + sl * p.D;
    std::fill(aw, aw + p.D, A(0));
    std::fill(ab, ab + p.D, A(0));
    const int64_t end = slot_begin(p, sl + 1);
    for (int64_t n0 = slot_begin(p, sl); n0 < end; n0 += tile) {
      const int64_t n1 = std::min(end, n0 + tile);
      for (int64_t n = n0; n < n1; ++n)
        bwd_row_any<T, A>(avx2, g + n * sg, x + n * sx, w, b, p.D, slope, mean[n], rstd[n], sums.data() + 2 * n);
      for (int64_t i0 = 0; i0 < p.D; i0 += kColChunk)
        bwd_cols_any<T, A>(avx2, g, sg, x, sx, w, b, mean, rstd, sums.data(), n0, n1, i0, std::min(p.D, i0 + kColChunk),
                           slope, p.D, dx, aw, ab);
    }
  }
  reduce_slots(pw, p, dw, par);
  reduce_slots(pb, p, db, par);
}

template <typename T>
void run_double_backward(const T* u, int64_t su, const T* g, int64_t sg, const T* x, int64_t sx, const acc_t<T>* vw,
                         const acc_t<T>* vb, const acc_t<T>* w, const acc_t<T>* b, const acc_t<T>* mean,
                         const acc_t<T>* rstd, const Params& p, T* dg, T* dx, acc_t<T>* dw) {
  using A = acc_t<T>;
  const bool avx2 = use_avx2(), par = parallel(p);
  const A slope = A(p.slope);
  const int64_t S = num_slots(p), tile = tile_samples(3 * p.D * int64_t(sizeof(T)));
  std::vector<double> sc(size_t(kDbl * p.N));
  at::Tensor parts = slot_parts<A>(S, p.D);
  A* pw = parts.data_ptr<A>();
#pragma omp parallel for schedule(static) if (par && S > 1)
  for (int64_t sl = 0; sl < S; ++sl) {
    A* aw = pw + sl * p.D;
    std::fill(aw, aw + p.D, A(0));
    const int64_t end = slot_begin(p, sl + 1);
    for (int64_t n0 = slot_begin(p, sl); n0 < end; n0 += tile) {
      const int64_t n1 = std::min(end, n0 + tile);
      for (int64_t n = n0; n < n1; ++n)
        dbl_row_any<T, A>(avx2, u + n * su, g + n * sg, x + n * sx, vw, w, b, p.D, slope, mean[n], rstd[n],
                          sc.data() + kDbl * n);
      for (int64_t i0 = 0; i0 < p.D; i0 += kColChunk)
        dbl_cols_any<T, A>(avx2, u, su, g, sg, x, sx, vw, vb, w, b, mean, rstd, sc.data(), n0, n1, i0,
                           std::min(p.D, i0 + kColChunk), slope, p.D, dg, dx, aw);
    }
  }
  reduce_slots(pw, p, dw, par);
}

// ----------------------------------------------------------------------------------------------
// argument checks
// ----------------------------------------------------------------------------------------------
namespace py = pybind11;

inline bool supported(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// A [N, D] row view: CPU, 2-D, unit element stride (or D == 1), x's dtype.
inline void check_rows(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  if (!t.defined() || !t.device().is_cpu()) throw py::value_error(std::string(fn) + ": " + name + " must be a CPU tensor");
  if (t.dim() != 2 || t.size(0) != x.size(0) || t.size(1) != x.size(1))
    throw py::value_error(std::string(fn) + ": " + name + " must be a [N, D] row view of x's shape");
  if (t.scalar_type() != x.scalar_type())
    throw py::value_error(std::string(fn) + ": " + name + " must have x's dtype");
  if (t.size(1) > 1 && t.stride(1) != 1)
    throw py::value_error(std::string(fn) + ": " + name + " must have unit element stride (a [N, D] row view)");
}

inline void check_x(const char* fn, const at::Tensor& x) {
  if (!x.defined() || !x.device().is_cpu()) throw py::value_error(std::string(fn) + ": x must be a CPU tensor");
  if (!supported(x.scalar_type()))
    throw py::value_error(std::string(fn) + ": x must be float32, float64, float16 or bfloat16, got " +
                          std::string(c10::toString(x.scalar_type())));
  if (x.dim() != 2 || x.size(1) < 1)
    throw py::value_error(std::string(fn) + ": x must be a [N, D >= 1] row view");
  check_rows(fn, "x", x, x);
}

// A per-position vector [D] (any float dtype) in the compute dtype, contiguous.
inline at::Tensor param(const char* fn, const char* name, const at::Tensor& t, int64_t D, at::ScalarType compute) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_floating_point() || t.dim() != 1 || t.size(0) != D)
    throw py::value_error(std::string(fn) + ": " + name + " must be a floating CPU vector of length D = " + std::to_string(D));
  return t.to(compute).contiguous();
}

// Per-sample statistics [N] in the compute dtype.
inline at::Tensor stats(const char* fn, const char* name, const at::Tensor& t, int64_t N, at::ScalarType compute) {
  if (!t.defined() || !t.device().is_cpu() || t.dim() != 1 || t.size(0) != N)
    throw py::value_error(std::string(fn) + ": " + name + " must be a CPU vector of length N = " + std::to_string(N));
  return t.to(compute).contiguous();
}

inline at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace lnl

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_lrelu_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, double slope, double eps) {
  constexpr const char* fn = "ln_lrelu_forward";
  lnl::check_x(fn, x);
  if (!(eps >= 0.0)) throw pybind11::value_error("ln_lrelu_forward: eps must be >= 0");
  const int64_t N = x.size(0), D = x.size(1);
  const at::ScalarType ct = lnl::compute_type(x);
  const at::Tensor w = lnl::param(fn, "weight", weight, D, ct), b = lnl::param(fn, "bias", bias, D, ct);
  at::Tensor y = cached_empty({N, D}, x.options(), at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({N}, x.options().dtype(ct)), rstd = at::empty({N}, x.options().dtype(ct));
  lnl::Params p;
  p.N = N, p.D = D, p.slope = slope, p.eps = eps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using A = lnl::acc_t<scalar_t>;
    lnl::run_forward<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), w.data_ptr<A>(), b.data_ptr<A>(), p,
                               y.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_lrelu_backward(const at::Tensor& g, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 double slope) {
  constexpr const char* fn = "ln_lrelu_backward";
  lnl::check_x(fn, x);
  lnl::check_rows(fn, "grad", g, x);
  const int64_t N = x.size(0), D = x.size(1);
  const at::ScalarType ct = lnl::compute_type(x);
  const at::Tensor w = lnl::param(fn, "weight", weight, D, ct), b = lnl::param(fn, "bias", bias, D, ct);
  const at::Tensor mu = lnl::stats(fn, "mean", mean, N, ct), rs = lnl::stats(fn, "rstd", rstd, N, ct);
  at::Tensor dx = cached_empty({N, D}, x.options(), at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros({D}, x.options().dtype(ct)), db = at::zeros({D}, x.options().dtype(ct));
  lnl::Params p;
  p.N = N, p.D = D, p.slope = slope;
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
      using A = lnl::acc_t<scalar_t>;
      lnl::run_backward<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                                  w.data_ptr<A>(), b.data_ptr<A>(), mu.data_ptr<A>(), rs.data_ptr<A>(), p,
                                  dx.data_ptr<scalar_t>(), dw.data_ptr<A>(), db.data_ptr<A>());
    });
  }
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_lrelu_double_backward(
    const at::Tensor& u, const at::Tensor& vw, const at::Tensor& vb, const at::Tensor& g, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd, double slope) {
  constexpr const char* fn = "ln_lrelu_double_backward";
  lnl::check_x(fn, x);
  lnl::check_rows(fn, "grad", g, x);
  lnl::check_rows(fn, "grad_dx", u, x);
  const int64_t N = x.size(0), D = x.size(1);
  const at::ScalarType ct = lnl::compute_type(x);
  const at::Tensor w = lnl::param(fn, "weight", weight, D, ct), b = lnl::param(fn, "bias", bias, D, ct);
  const at::Tensor v_w = lnl::param(fn, "grad_dweight", vw, D, ct), v_b = lnl::param(fn, "grad_dbias", vb, D, ct);
  const at::Tensor mu = lnl::stats(fn, "mean", mean, N, ct), rs = lnl::stats(fn, "rstd", rstd, N, ct);
  at::Tensor dg = cached_empty({N, D}, x.options(), at::MemoryFormat::Contiguous);
  at::Tensor dx = cached_empty({N, D}, x.options(), at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros({D}, x.options().dtype(ct));
  lnl::Params p;
  p.N = N, p.D = D, p.slope = slope;
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
      using A = lnl::acc_t<scalar_t>;
      lnl::run_double_backward<scalar_t>(u.data_ptr<scalar_t>(), u.stride(0), g.data_ptr<scalar_t>(), g.stride(0),
                                         x.data_ptr<scalar_t>(), x.stride(0), v_w.data_ptr<A>(), v_b.data_ptr<A>(),
                                         w.data_ptr<A>(), b.data_ptr<A>(), mu.data_ptr<A>(), rs.data_ptr<A>(), p,
                                         dg.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dw.data_ptr<A>());
    });
  }
  return {dg, dx, dw};
}

}  // namespace ddfast

// Registered from csrc/bindings.cpp (one line there).
void ddfast_register_ln_lrelu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("ln_lrelu_forward", &ddfast::ln_lrelu_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("slope"), py::arg("eps"),
        "DiM critic block forward on [N, D] row views (unit element stride): (y contiguous [N, D] in x's dtype, "
        "mean [N], rstd [N] in float32 (float64 for float64 x))");
  m.def("ln_lrelu_backward", &ddfast::ln_lrelu_backward, py::arg("grad"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("slope"),
        "DiM critic block backward: (dx contiguous [N, D] in x's dtype, dweight [D], dbias [D] in float32 "
        "(float64 for float64 x))");
  m.def("ln_lrelu_double_backward", &ddfast::ln_lrelu_double_backward, py::arg("grad_dx"), py::arg("grad_dweight"),
        py::arg("grad_dbias"), py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("rstd"), py::arg("slope"),
        "DiM critic block double backward: (dgrad, dx contiguous [N, D] in x's dtype, dweight [D] in the compute dtype)");
}
