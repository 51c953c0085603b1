// Kernel K2, CPU backend (OpenMP): batched multi-layer attention matching with per-class means and
// its closed-form gradient for the synthetic side, in one call (specs/d2m-datadam-k2.md §3; the math
// and the float64 oracle are in ddfast/reference/attention_match.py).
//
//   a_n = Σ_c |F_n[c, s]|^p (spatial; channel mode: Σ_s over positions per channel)
//   r_n = max(‖a_n‖₂, 1e-12),  â_n = a_n / r_n,  μ^X_k = mean of â over the class-k rows of side X
//   L   = Σ_l w_l Σ_k ‖μ^R_k − μ^S_k‖² + w_e Σ_k ‖ē^R_k − ē^S_k‖²   (classes present on both sides)
//   g_k = 2 w_l (μ^S_k − μ^R_k),  u_n = g_k / n^S_k,  v_n = (u_n − â_n⟨â_n, u_n⟩)/r_n  (u_n/eps if r_n <= eps)
//   dF_n[c, s] = p |F|^(p−1) sgn(F) v_n[s]  (0 where F == 0),   de_n = 2 w_e (ē^S_k − ē^R_k)/n^S_k
//
// Passes per layer (bandwidth-bound): P1 reads F^R once: per sample a, r and â (â kept in a small
// N_R×D double buffer); P2 the same for F^S (â^S, r^S kept); P3 (tiny): class means in double, the
// loss and u per class; P4 reads F^S again and writes dF (contiguous NCHW, from the page-resident
// buffer cache, csrc/buffer_cache.cpp). p = 1, 2, 4 have pow-free paths; other p use pow.
//
// Layouts: any strides are read in place. Per sample the element (c, h, w) is at c·sC + h·sH + w·sW;
// H and W are merged into one run of S positions when sH == W·sW. When the positions are innermost
// (NCHW and slices of it) spatial mode accumulates a[s] += |F[c, s]|^p over channels (channel by
// channel in memory order, vectorised over s) and channel mode sums contiguous rows; when the channels are innermost
// (channels_last) the roles swap. dF of a channels_last input is written through 16-position tiles.
//
// Precision: element math in float (double for float64 features); running sums leave float for
// double every kFlush rows (column sums) or kChunk elements (row sums); norms, class sums, the loss
// and v are in double.
//
// Determinism: every sample is computed by the same code whatever thread runs it, the class sums run
// over the samples in index order (threads split the columns, never the samples), the per-layer
// losses are added in layer order: bitwise identical results for any thread count.
//
// ISA: the per-sample code is compiled for the baseline (x86-64-v2) and again with AVX2 + FMA, picked
// at run time (DDFAST_ATTENTION_MATCH_ISA=base forces the baseline copy).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

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

#define DDFAST_AM_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDFAST_AM_X86 1
#endif

namespace ddfast {
namespace attn {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

constexpr double kEps = 1e-12;
// Column sums (a[j] += f(row[j]) over rows) move from float to double every kFlush rows.
constexpr int64_t kFlush = 256;
// Row sums are reduced in float chunks of kChunk elements, the chunk totals added in double.
constexpr int64_t kChunk = 256;
// Positions per tile when dF of a channels-innermost input is written (one cache line of fp32 dF).
constexpr int64_t kTile = 16;
// Below this many elements a pass runs on the calling thread (a fork/join costs more).
constexpr int64_t kParallelElems = 65536;

enum class PK { One, Two, Four, Gen };

// |x|^p for x >= 0 (ax = |x|)
template <PK K, typename A>
DDFAST_AM_INLINE A powp(A ax, A p) {
  if (K == PK::One) return ax;
  if (K == PK::Two) return ax * ax;
  if (K == PK::Four) {
    const A q = ax * ax;
    return q * q;
  }
  return std::pow(ax, p);
}

// d|x|^p/dx = p·|x|^(p−1)·sgn(x), 0 at x = 0
template <PK K, typename A>
DDFAST_AM_INLINE A dpow(A x, A p, A pm1) {
  if (K == PK::One) return A(int(x > A(0)) - int(x < A(0)));
  if (K == PK::Two) return A(2) * x;
  if (K == PK::Four) return A(4) * (x * x * x);
  if (x == A(0)) return A(0);
  const A s = A(int(x > A(0)) - int(x < A(0)));
  return p * std::pow(std::abs(x), pm1) * s;
}

// Geometry of one layer's features, per sample (element offsets).
struct Geo {
  int64_t C = 0, S = 0;    // channels, positions (H·W)
  int64_t sC = 0;          // channel stride
  int64_t nout = 0, L = 0;  // positions as nout runs of L (nout = 1 when H and W merge)
  int64_t sOut = 0, sIn = 0;  // stride between runs, within a run
  bool c_inner = false;    // channels are the innermost dimension in memory (channels_last)
  const int64_t* soff = nullptr;  // S position offsets (c_inner only)
  bool spatial = true;
  int64_t D() const { return spatial ? S : C; }
};

// acc[j] += f(r0[j·st]) over n elements
template <PK K, typename T, typename A>
DDFAST_AM_INLINE void col_acc1(A* __restrict acc, const T* __restrict r0, int64_t n, int64_t st, A p) {
  if (st == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += powp<K, A>(std::abs(static_cast<A>(r0[j])), p);
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] += powp<K, A>(std::abs(static_cast<A>(r0[j * st])), p);
  }
}

// Σ_j f(x[j·st]) over n elements: float chunks of kChunk, totals in double
template <PK K, typename T, typename A>
DDFAST_AM_INLINE double row_sum(const T* __restrict x, int64_t n, int64_t st, A p) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = std::min(n, j0 + kChunk);
    A s = A(0);
    if (st == 1) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = j0; j < j1; ++j) s += powp<K, A>(std::abs(static_cast<A>(x[j])), p);
    } else {
      for (int64_t j = j0; j < j1; ++j) s += powp<K, A>(std::abs(static_cast<A>(x[j * st])), p);
    }
    total += double(s);
  }
  return total;
}

// Adds acc[0..n) into dst (double) and clears acc.
template <typename A>
DDFAST_AM_INLINE void flush(A* __restrict acc, double* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] += double(acc[j]);
    acc[j] = A(0);
  }
}

// Column accumulation of `rows` rows (row i at x + off(i)) into a[0..n) (double) through the float
// scratch acc, flushed to double every kFlush rows. One row at a time, in memory order: a single
// read stream (measured on the 2-core EPYC VM, fp32 [640, 128, 32, 32]: 24 GB/s one row at a time,
// 19 GB/s four rows at a time, 14 GB/s two; a plain row sum reads at 25 GB/s there).
template <PK K, typename T, typename A, typename Off>
DDFAST_AM_INLINE void col_sum(const T* x, int64_t rows, Off off, int64_t n, int64_t st, A p, A* acc, double* a) {
  std::fill(acc, acc + n, A(0));
  std::fill(a, a + n, 0.0);
  for (int64_t i0 = 0; i0 < rows; i0 += kFlush) {
    const int64_t i1 = std::min(rows, i0 + kFlush);
    for (int64_t i = i0; i < i1; ++i) col_acc1<K, T, A>(acc, x + off(i), n, st, p);
    flush(acc, a, n);
  }
}

// a[0..D) of one sample at x (un-normalised attention, double)
template <PK K, typename T, typename A>
DDFAST_AM_INLINE void fwd_sample(const Geo& g, const T* x, A p, A* acc, double* a) {
  if (!g.c_inner) {
    if (g.spatial) {
      // a[s] = Σ_c over the positions run by run
      for (int64_t o = 0; o < g.nout; ++o) {
        const T* xo = x + o * g.sOut;
        const int64_t sC = g.sC;
        col_sum<K, T, A>(xo, g.C, [sC](int64_t c) { return c * sC; }, g.L, g.sIn, p, acc, a + o * g.L);
      }
    } else {
      for (int64_t c = 0; c < g.C; ++c) {
        double t = 0.0;
        for (int64_t o = 0; o < g.nout; ++o) t += row_sum<K, T, A>(x + c * g.sC + o * g.sOut, g.L, g.sIn, p);
        a[c] = t;
      }
    }
  } else {
    const int64_t* soff = g.soff;
    if (g.spatial) {
      for (int64_t s = 0; s < g.S; ++s) a[s] = row_sum<K, T, A>(x + soff[s], g.C, g.sC, p);
    } else {
      col_sum<K, T, A>(x, g.S, [soff](int64_t s) { return soff[s]; }, g.C, g.sC, p, acc, a);
    }
  }
}

// dF of one sample (contiguous [C, S] at out) from v (D entries)
template <PK K, typename T, typename A>
DDFAST_AM_INLINE void bwd_sample(const Geo& g, const T* x, A p, A pm1, const A* __restrict v, T* __restrict out) {
  if (!g.c_inner) {
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t o = 0; o < g.nout; ++o) {
        const T* __restrict xr = x + c * g.sC + o * g.sOut;
        T* __restrict orow = out + c * g.S + o * g.L;
        const int64_t n = g.L, st = g.sIn;
        if (g.spatial) {
          const A* __restrict vr = v + o * g.L;
          if (st == 1) {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xr[j]), p, pm1) * vr[j]);
          } else {
            for (int64_t j = 0; j < n; ++j)
              orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xr[j * st]), p, pm1) * vr[j]);
          }
        } else {
          const A vc = v[c];
          if (st == 1) {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xr[j]), p, pm1) * vc);
          } else {
            for (int64_t j = 0; j < n; ++j)
              orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xr[j * st]), p, pm1) * vc);
          }
        }
      }
    }
  } else {
    const int64_t* soff = g.soff;
    const int64_t sC = g.sC;
    for (int64_t s0 = 0; s0 < g.S; s0 += kTile) {
      const int64_t t = std::min(kTile, g.S - s0);
      for (int64_t c = 0; c < g.C; ++c) {
        T* __restrict orow = out + c * g.S + s0;
        const T* xc = x + c * sC;
        if (g.spatial) {
          for (int64_t j = 0; j < t; ++j)
            orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xc[soff[s0 + j]]), p, pm1) * v[s0 + j]);
        } else {
          const A vc = v[c];
          for (int64_t j = 0; j < t; ++j)
            orow[j] = static_cast<T>(dpow<K, A>(static_cast<A>(xc[soff[s0 + j]]), p, pm1) * vc);
        }
      }
    }
  }
}

// What the forward of one side of one layer fills: per sample â (N×D double) and r (N).
struct FwdOut {
  double* ahat = nullptr;
  double* r = nullptr;
};

// Samples [i0, i1): a, r, â
template <PK K, typename T>
DDFAST_AM_INLINE void fwd_block_impl(const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p,
                                     acc_t<T>* acc, double* a, FwdOut out) {
  using A = acc_t<T>;
  const int64_t D = g.D();
  for (int64_t n = i0; n < i1; ++n) {
    fwd_sample<K, T, A>(g, base + n * sN, A(p), acc, a);
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += a[d] * a[d];
    const double r = std::max(std::sqrt(ss), kEps);
    out.r[n] = r;
    double* ah = out.ahat + n * D;
    for (int64_t d = 0; d < D; ++d) ah[d] = a[d] / r;
  }
}

// What the backward of one layer reads.
struct BwdIn {
  const double* ahat = nullptr;  // N_S×D
  const double* r = nullptr;     // N_S
  const double* u = nullptr;     // K×D (u_k = g_k / n^S_k, 0 rows for classes absent on a side)
  const uint8_t* active = nullptr;  // K: class present on both sides
  const int64_t* labels = nullptr;
};

template <PK K, typename T>
DDFAST_AM_INLINE void bwd_block_impl(const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p,
                                     const BwdIn& in, acc_t<T>* v, T* out) {
  using A = acc_t<T>;
  const int64_t D = g.D(), CS = g.C * g.S;
  for (int64_t n = i0; n < i1; ++n) {
    const int64_t k = in.labels[n];
    T* o = out + n * CS;
    if (!in.active[k]) {
      std::fill(o, o + CS, static_cast<T>(0.0f));
      continue;
    }
    const double* ah = in.ahat + n * D;
    const double* u = in.u + k * D;
    const double r = in.r[n];
    if (r <= kEps) {
      for (int64_t d = 0; d < D; ++d) v[d] = A(u[d] / kEps);
    } else {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += ah[d] * u[d];
      for (int64_t d = 0; d < D; ++d) v[d] = A((u[d] - ah[d] * dot) / r);
    }
    bwd_sample<K, T, A>(g, base + n * sN, A(p), A(p - 1.0), v, o);
  }
}

template <PK K, typename T>
void fwd_block_base(const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p, acc_t<T>* acc,
                    double* a, FwdOut out) {
  fwd_block_impl<K, T>(g, base, sN, i0, i1, p, acc, a, out);
}
template <PK K, typename T>
void bwd_block_base(const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p, const BwdIn& in,
                    acc_t<T>* v, T* out) {
  bwd_block_impl<K, T>(g, base, sN, i0, i1, p, in, v, out);
}

#ifdef DDFAST_AM_X86
template <PK K, typename T>
__attribute__((target("avx2,fma"))) void fwd_block_avx2(const Geo& g, const T* base, int64_t sN, int64_t i0,
                                                        int64_t i1, double p, acc_t<T>* acc, double* a, FwdOut out) {
  fwd_block_impl<K, T>(g, base, sN, i0, i1, p, acc, a, out);
}
template <PK K, typename T>
__attribute__((target("avx2,fma"))) void bwd_block_avx2(const Geo& g, const T* base, int64_t sN, int64_t i0,
                                                        int64_t i1, double p, const BwdIn& in, acc_t<T>* v, T* out) {
  bwd_block_impl<K, T>(g, base, sN, i0, i1, p, in, v, out);
}
#endif

// The AVX2 copy when the CPU has AVX2 and FMA, unless DDFAST_ATTENTION_MATCH_ISA=base (read per call).
inline bool use_avx2() {
#ifdef DDFAST_AM_X86
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("DDFAST_ATTENTION_MATCH_ISA");
  return cpu && !(env != nullptr && std::strcmp(env, "base") == 0);
#else
  return false;
#endif
}

template <PK K, typename T>
void fwd_block(bool avx2, const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p, acc_t<T>* acc,
               double* a, FwdOut out) {
#ifdef DDFAST_AM_X86
  if (avx2) return fwd_block_avx2<K, T>(g, base, sN, i0, i1, p, acc, a, out);
#endif
  (void)avx2;
  fwd_block_base<K, T>(g, base, sN, i0, i1, p, acc, a, out);
}

template <PK K, typename T>
void bwd_block(bool avx2, const Geo& g, const T* base, int64_t sN, int64_t i0, int64_t i1, double p, const BwdIn& in,
               acc_t<T>* v, T* out) {
#ifdef DDFAST_AM_X86
  if (avx2) return bwd_block_avx2<K, T>(g, base, sN, i0, i1, p, in, v, out);
#endif
  (void)avx2;
  bwd_block_base<K, T>(g, base, sN, i0, i1, p, in, v, out);
}

inline PK pow_kind(double p) {
  if (p == 1.0) return PK::One;
  if (p == 2.0) return PK::Two;
  if (p == 4.0) return PK::Four;
  return PK::Gen;
}

// Per-layer geometry of a 4-D tensor f; soff_store receives the position offsets when needed.
Geo make_geo(const at::Tensor& f, bool spatial, std::vector<int64_t>* soff_store) {
  Geo g;
  const int64_t C = f.size(1), H = f.size(2), W = f.size(3);
  const int64_t sC = f.stride(1), sH = f.stride(2), sW = f.stride(3);
  g.C = C, g.S = H * W, g.sC = sC, g.spatial = spatial;
  if (H == 1 || W == 1 || sH == W * sW) {
    g.nout = 1, g.L = H * W, g.sOut = 0;
    g.sIn = W == 1 ? sH : sW;
  } else {
    g.nout = H, g.L = W, g.sOut = sH, g.sIn = sW;
  }
  // innermost spatial stride (a single position: none)
  const int64_t sp_inner = g.S <= 1 ? INT64_MAX : (g.L > 1 ? g.sIn : g.sOut);
  g.c_inner = C > 1 && sC < sp_inner;
  if (g.c_inner) {
    soff_store->resize(size_t(g.S));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) (*soff_store)[size_t(h * W + w)] = h * sH + w * sW;
    g.soff = soff_store->data();
  }
  return g;
}

inline bool parallel_for_size(int64_t n, int64_t per_sample) {
  return n > 1 && n * std::max<int64_t>(per_sample, 1) >= kParallelElems && num_threads() > 1;
}

// Forward over all samples of one side of a layer.
template <typename T>
void forward_side(const at::Tensor& f, const Geo& g, double p, FwdOut out) {
  using A = acc_t<T>;
  const int64_t N = f.size(0), sN = f.stride(0), D = g.D();
  if (N == 0) return;
  const T* base = f.data_ptr<T>();
  const PK kind = pow_kind(p);
  const bool avx2 = use_avx2();
  const bool par = parallel_for_size(N, g.C * g.S);
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.C * g.S));
#pragma omp parallel if (par)
  {
    std::vector<A> acc(size_t(std::max(g.C, g.S)));
    std::vector<double> a(static_cast<size_t>(std::max<int64_t>(D, 1)));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) {
      switch (kind) {
        case PK::One: fwd_block<PK::One, T>(avx2, g, base, sN, n, n + 1, p, acc.data(), a.data(), out); break;
        case PK::Two: fwd_block<PK::Two, T>(avx2, g, base, sN, n, n + 1, p, acc.data(), a.data(), out); break;
        case PK::Four: fwd_block<PK::Four, T>(avx2, g, base, sN, n, n + 1, p, acc.data(), a.data(), out); break;
        case PK::Gen: fwd_block<PK::Gen, T>(avx2, g, base, sN, n, n + 1, p, acc.data(), a.data(), out); break;
      }
    }
  }
}

template <typename T>
void backward_side(const at::Tensor& f, const Geo& g, double p, const BwdIn& in, at::Tensor& df) {
  using A = acc_t<T>;
  const int64_t N = f.size(0), sN = f.stride(0), D = g.D();
  if (N == 0 || g.C * g.S == 0) return;
  const T* base = f.data_ptr<T>();
  T* out = df.data_ptr<T>();
  const PK kind = pow_kind(p);
  const bool avx2 = use_avx2();
  const bool par = parallel_for_size(N, g.C * g.S);
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.C * g.S));
#pragma omp parallel if (par)
  {
    std::vector<A> v(size_t(std::max<int64_t>(D, 1)));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) {
      switch (kind) {
        case PK::One: bwd_block<PK::One, T>(avx2, g, base, sN, n, n + 1, p, in, v.data(), out); break;
        case PK::Two: bwd_block<PK::Two, T>(avx2, g, base, sN, n, n + 1, p, in, v.data(), out); break;
        case PK::Four: bwd_block<PK::Four, T>(avx2, g, base, sN, n, n + 1, p, in, v.data(), out); break;
        case PK::Gen: bwd_block<PK::Gen, T>(avx2, g, base, sN, n, n + 1, p, in, v.data(), out); break;
      }
    }
  }
}

// Per-class sums (K×D, double) of the rows of x (row n at get(n, d)), over the samples in index
// order; threads split the columns.
template <typename Get>
void class_sums(int64_t N, int64_t D, int64_t K, const int64_t* labels, Get get, std::vector<double>* sums) {
  sums->assign(size_t(K * D), 0.0);
  if (N == 0 || D == 0) return;
  constexpr int64_t kCols = 256;
  const int64_t nchunks = (D + kCols - 1) / kCols;
  double* s = sums->data();
  const bool par = nchunks > 1 && N * D >= kParallelElems && num_threads() > 1;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t b = 0; b < nchunks; ++b) {
    const int64_t d0 = b * kCols, d1 = std::min(D, d0 + kCols);
    for (int64_t n = 0; n < N; ++n) {
      double* dst = s + labels[n] * D;
      for (int64_t d = d0; d < d1; ++d) dst[d] += get(n, d);
    }
  }
}

std::vector<int64_t> counts_of(const int64_t* labels, int64_t N, int64_t K) {
  std::vector<int64_t> c(size_t(K), 0);
  for (int64_t n = 0; n < N; ++n) ++c[size_t(labels[n])];
  return c;
}

// P3 for one block of D-vectors: the loss w·Σ_k active ‖μ^R_k − μ^S_k‖² and, when u is given,
// u_k = 2w(μ^S_k − μ^R_k)/n^S_k (0 for inactive classes). Sums are turned into means in place.
double match_means(std::vector<double>& sr, std::vector<double>& ss, const std::vector<int64_t>& nr,
                   const std::vector<int64_t>& ns, const std::vector<uint8_t>& active, int64_t K, int64_t D, double w,
                   std::vector<double>* u) {
  double loss = 0.0;
  if (u) u->assign(size_t(K * D), 0.0);
  for (int64_t k = 0; k < K; ++k) {
    if (!active[size_t(k)]) continue;
    const double inv_r = 1.0 / double(nr[size_t(k)]), inv_s = 1.0 / double(ns[size_t(k)]);
    const double* pr = sr.data() + k * D;
    const double* ps = ss.data() + k * D;
    double part = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double diff = ps[d] * inv_s - pr[d] * inv_r;
      part += diff * diff;
      if (u) (*u)[size_t(k * D + d)] = 2.0 * w * diff * inv_s;
    }
    loss += part;
  }
  return w * loss;
}

void check_features(const char* fn, const at::Tensor& f, const char* what, size_t l) {
  TORCH_CHECK_VALUE(f.defined(), fn, ": ", what, " of layer ", l, " are undefined");
  TORCH_CHECK_VALUE(f.device().is_cpu(), fn, ": ", what, " of layer ", l,
                    " must be CPU tensors, got ", f.device());
  TORCH_CHECK_VALUE(f.dim() == 4, fn, ": ", what, " of layer ", l,
                    " must be 4-D [N, C, H, W], got shape ", f.sizes());
  const auto st = f.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    fn, ": ", what, " of layer ", l,
                    " must be float32, float64, float16 or bfloat16, got ", st);
}

at::Tensor check_labels(const char* fn, const at::Tensor& y, const char* what, int64_t K) {
  TORCH_CHECK_VALUE(y.defined() && y.device().is_cpu(), fn, ": ", what,
                    " must be a CPU tensor");
  TORCH_CHECK_VALUE(y.dim() == 1, fn, ": ", what, " must be 1-D, got shape ", y.sizes());
  TORCH_CHECK_VALUE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt, fn, ": ", what,
                    " must be int64 or int32, got ", y.scalar_type());
  at::Tensor lab = y.to(at::kLong).contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < K, fn, ": ", what, " must lie in [0, ", K,
                      ") (num_classes), got ", p[i], " at index ", i);
  return lab;
}

// Class sums of an embedding [N, D] (any strides and float dtype) in double.
void emb_sums(const at::Tensor& e, const int64_t* labels, int64_t K, std::vector<double>* sums) {
  const int64_t N = e.size(0), D = e.size(1), s0 = e.stride(0), s1 = e.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "attention_match_emb", [&] {
    const scalar_t* x = e.data_ptr<scalar_t>();
    class_sums(N, D, K, labels, [x, s0, s1](int64_t n, int64_t d) { return double(x[n * s0 + d * s1]); }, sums);
  });
}

}  // namespace attn

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> attention_match_forward(
    const std::vector<at::Tensor>& real_feats, const std::vector<at::Tensor>& syn_feats, const at::Tensor& real_labels,
    const at::Tensor& syn_labels, int64_t num_classes, double p, bool spatial, const std::vector<double>& layer_weights,
    const c10::optional<at::Tensor>& real_emb, const c10::optional<at::Tensor>& syn_emb, double emb_weight,
    bool with_grad) {
  using namespace attn;
  const size_t nl = syn_feats.size();
  TORCH_CHECK_VALUE(real_feats.size() == nl, "attention_match_forward: real and synthetic feature lists differ in length: ",
                    real_feats.size(), " vs ", nl);
  TORCH_CHECK_VALUE(layer_weights.size() == nl, "attention_match_forward: layer_weights has ", layer_weights.size(),
                    " entries for ", nl, " layers");
  TORCH_CHECK_VALUE(p > 0.0 && std::isfinite(p), "attention_match_forward: p must be finite and > 0, got ", p);
  TORCH_CHECK_VALUE(num_classes >= 0, "attention_match_forward: num_classes must be >= 0, got ", num_classes);
  const int64_t K = num_classes;
  const at::Tensor yr = check_labels("attention_match_forward", real_labels, "real_labels", K);
  const at::Tensor ys = check_labels("attention_match_forward", syn_labels, "syn_labels", K);
  const int64_t NR = yr.numel(), NS = ys.numel();
  for (size_t l = 0; l < nl; ++l) {
    const at::Tensor &fr = real_feats[l], &fs = syn_feats[l];
    check_features("attention_match_forward", fr, "real features", l);
    check_features("attention_match_forward", fs, "syn features", l);
    TORCH_CHECK_VALUE(fr.sizes().slice(1) == fs.sizes().slice(1), "attention_match_forward: layer ", l,
                      ": features must have equal C, H, W on both sides, got ", fr.sizes(), " and ", fs.sizes());
    TORCH_CHECK_VALUE(fr.size(0) == NR && fs.size(0) == NS, "attention_match_forward: layer ", l, ": ", fr.size(0), "/",
                      fs.size(0), " rows but ", NR, "/", NS, " labels");
  }
  const bool has_re = real_emb.has_value() && real_emb->defined();
  const bool has_se = syn_emb.has_value() && syn_emb->defined();
  TORCH_CHECK_VALUE(has_re == has_se, "attention_match_forward: give both real_emb and syn_emb or neither");
  const bool has_emb = has_re && has_se;
  if (has_emb) {
    const at::Tensor &er = *real_emb, &es = *syn_emb;
    for (const at::Tensor* e : {&er, &es}) {
      TORCH_CHECK_VALUE(e->device().is_cpu(), "attention_match_forward: embeddings must be CPU tensors");
      TORCH_CHECK_VALUE(e->dim() == 2, "attention_match_forward: embeddings must be 2-D [N, D], got shape ", e->sizes());
      const auto st = e->scalar_type();
      TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                        "attention_match_forward: embeddings must be float32, float64, float16 or bfloat16, got ", st);
    }
    TORCH_CHECK_VALUE(er.size(0) == NR && es.size(0) == NS && er.size(1) == es.size(1),
                      "attention_match_forward: embeddings must be [N_R, D] and [N_S, D], got ", er.sizes(), " and ",
                      es.sizes());
  }

  // float64 when the synthetic side is (its first layer, or its embedding when there are no layers)
  const bool double_side = nl > 0 ? syn_feats[0].scalar_type() == at::kDouble
                                  : (has_se && syn_emb->scalar_type() == at::kDouble);
  const at::ScalarType loss_dtype = double_side ? at::kDouble : at::kFloat;
  const int64_t* lr = yr.data_ptr<int64_t>();
  const int64_t* ls = ys.data_ptr<int64_t>();
  const std::vector<int64_t> nr = counts_of(lr, NR, K), ns = counts_of(ls, NS, K);
  std::vector<uint8_t> active(static_cast<size_t>(K), uint8_t(0));
  for (int64_t k = 0; k < K; ++k) active[size_t(k)] = nr[size_t(k)] > 0 && ns[size_t(k)] > 0;

  double loss = 0.0;
  std::vector<at::Tensor> grads;
  grads.reserve(nl);
  // scratch reused across calls (first-touch page faults of fresh multi-MB buffers cost ~30% of a call)
  thread_local std::vector<double> ahat_r, ahat_s, r_r, r_s, sum_r, sum_s, u;
  std::vector<int64_t> soff_r, soff_s;
  for (size_t l = 0; l < nl; ++l) {
    const at::Tensor &fr = real_feats[l], &fs = syn_feats[l];
    const Geo gr = make_geo(fr, spatial, &soff_r);
    const Geo gs = make_geo(fs, spatial, &soff_s);
    const int64_t D = gs.D();
    // P1, P2: â and r of both sides
    ahat_r.resize(size_t(NR * D));
    r_r.resize(size_t(NR));
    ahat_s.resize(size_t(NS * D));
    r_s.resize(size_t(NS));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fr.scalar_type(), "attention_match_real", [&] {
      forward_side<scalar_t>(fr, gr, p, FwdOut{ahat_r.data(), r_r.data()});
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "attention_match_syn", [&] {
      forward_side<scalar_t>(fs, gs, p, FwdOut{ahat_s.data(), r_s.data()});
    });
    // P3: class means, the loss, u per class
    const double* ar = ahat_r.data();
    const double* as = ahat_s.data();
    class_sums(NR, D, K, lr, [ar, D](int64_t n, int64_t d) { return ar[n * D + d]; }, &sum_r);
    class_sums(NS, D, K, ls, [as, D](int64_t n, int64_t d) { return as[n * D + d]; }, &sum_s);
    const double w = layer_weights[l];
    loss += match_means(sum_r, sum_s, nr, ns, active, K, D, w, with_grad ? &u : nullptr);
    // P4: dF
    if (with_grad) {
      at::Tensor df = cached_empty(fs.sizes(), fs.options(), at::MemoryFormat::Contiguous);
      BwdIn in;
      in.ahat = ahat_s.data(), in.r = r_s.data(), in.u = u.data(), in.active = active.data(), in.labels = ls;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "attention_match_grad", [&] {
        backward_side<scalar_t>(fs, gs, p, in, df);
      });
      grads.push_back(df);
    } else {
      grads.push_back(fs.new_empty({0}));
    }
  }

  at::Tensor d_emb;
  if (has_emb) {
    const at::Tensor &er = *real_emb, &es = *syn_emb;
    const int64_t D = es.size(1);
    emb_sums(er, lr, K, &sum_r);
    emb_sums(es, ls, K, &sum_s);
    loss += match_means(sum_r, sum_s, nr, ns, active, K, D, emb_weight, with_grad ? &u : nullptr);
    if (with_grad) {
      // de_n = u_{k(n)} with w = emb_weight (0 rows for inactive classes)
      at::Tensor ud = at::from_blob(u.data(), {K, D}, at::TensorOptions().dtype(at::kDouble));
      d_emb = ud.index_select(0, ys).to(es.scalar_type()).contiguous();
    }
  }
  if (!d_emb.defined()) d_emb = at::empty({0}, at::TensorOptions().dtype(loss_dtype));
  return {at::scalar_tensor(loss, at::TensorOptions().dtype(loss_dtype)), grads, d_emb};
}


// The two-pass form behind --segment: pass 1 sums â per class over the segments (no gradient); pass 2
// gives each segment's dF from per-class u fixed by the global sums -- P4 of attention_match_forward
// with u given instead of formed from this call's class means.
std::vector<at::Tensor> attention_class_sums(const std::vector<at::Tensor>& feats, const at::Tensor& labels,
                                             int64_t num_classes, double p, bool spatial) {
  using namespace attn;
  constexpr const char* fn = "attention_class_sums";
  TORCH_CHECK_VALUE(p > 0.0 && std::isfinite(p), fn, ": p must be finite and > 0, got ", p);
  TORCH_CHECK_VALUE(num_classes >= 0, fn, ": num_classes must be >= 0, got ", num_classes);
  const int64_t K = num_classes;
  const at::Tensor y = check_labels(fn, labels, "labels", K);
  const int64_t N = y.numel();
  const int64_t* ly = y.data_ptr<int64_t>();
  std::vector<at::Tensor> out;
  std::vector<double> ahat, r, sums;
  std::vector<int64_t> soff;
  for (size_t l = 0; l < feats.size(); ++l) {
    const at::Tensor& f = feats[l];
    check_features(fn, f, "features", l);
    TORCH_CHECK_VALUE(f.size(0) == N, fn, ": layer ", l, " has ", f.size(0), " rows but ", N, " labels");
    const Geo g = make_geo(f, spatial, &soff);
    const int64_t D = g.D();
    ahat.resize(size_t(N * D));
    r.resize(size_t(N));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attention_class_sums", [&] {
      forward_side<scalar_t>(f, g, p, FwdOut{ahat.data(), r.data()});
    });
    const double* a = ahat.data();
    class_sums(N, D, K, ly, [a, D](int64_t n, int64_t d) { return a[n * D + d]; }, &sums);
    out.push_back(at::from_blob(sums.data(), {K, D}, at::TensorOptions().dtype(at::kDouble)).clone());
  }
  return out;
}

std::vector<at::Tensor> attention_vjp(const std::vector<at::Tensor>& feats, const at::Tensor& labels,
                                      const std::vector<at::Tensor>& class_grads, double p, bool spatial) {
  using namespace attn;
  constexpr const char* fn = "attention_vjp";
  TORCH_CHECK_VALUE(p > 0.0 && std::isfinite(p), fn, ": p must be finite and > 0, got ", p);
  TORCH_CHECK_VALUE(class_grads.size() == feats.size(), fn, ": ", class_grads.size(), " class gradients for ",
                    feats.size(), " layers");
  std::vector<at::Tensor> grads;
  std::vector<double> ahat, r;
  std::vector<int64_t> soff;
  for (size_t l = 0; l < feats.size(); ++l) {
    const at::Tensor& f = feats[l];
    check_features(fn, f, "features", l);
    const Geo g = make_geo(f, spatial, &soff);
    const int64_t D = g.D();
    const at::Tensor& u_in = class_grads[l];
    TORCH_CHECK_VALUE(u_in.defined() && u_in.device().is_cpu() && u_in.dim() == 2 && u_in.size(1) == D, fn,
                      ": class gradient of layer ", l, " must be a CPU [K, ", D, "] tensor, got ", u_in.sizes());
    const int64_t K = u_in.size(0);
    const at::Tensor u = u_in.to(at::kDouble).contiguous();
    const at::Tensor y = check_labels(fn, labels, "labels", K);
    const int64_t N = y.numel();
    TORCH_CHECK_VALUE(f.size(0) == N, fn, ": layer ", l, " has ", f.size(0), " rows but ", N, " labels");
    ahat.resize(size_t(N * D));
    r.resize(size_t(N));
    const std::vector<uint8_t> every(size_t(K), uint8_t(1));  // u is 0 on the classes that do not count
    at::Tensor df = at::empty(f.sizes(), f.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attention_vjp", [&] {
      forward_side<scalar_t>(f, g, p, FwdOut{ahat.data(), r.data()});
      BwdIn in;
      in.ahat = ahat.data(), in.r = r.data(), in.u = u.data_ptr<double>(), in.active = every.data();
      in.labels = y.data_ptr<int64_t>();
      backward_side<scalar_t>(f, g, p, in, df);
    });
    grads.push_back(df);
  }
  return grads;
}
}  // namespace ddfast

// Registered from csrc/bindings.cpp (one line there).
void ddfast_register_attention_match(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_match_forward", &ddfast::attention_match_forward, py::arg("real_feats"), py::arg("syn_feats"),
        py::arg("real_labels"), py::arg("syn_labels"), py::arg("num_classes"), py::arg("p"), py::arg("spatial"),
        py::arg("layer_weights"), py::arg("real_emb"), py::arg("syn_emb"), py::arg("emb_weight"),
        py::arg("with_grad"),
        "K2 attention matching: (loss 0-dim float32 (float64 when the first synthetic layer is float64), "
        "[dF per layer, contiguous, the synthetic features' dtype; empty without with_grad], d_syn_emb [N_S, D] "
        "in syn_emb's dtype (empty without with_grad or embeddings))");
  m.def("attention_class_sums", &ddfast::attention_class_sums, py::arg("feats"), py::arg("labels"),
        py::arg("num_classes"), py::arg("p"), py::arg("spatial"),
        "K2 pass 1 of --segment: per layer the per-class sums [K, M] (float64) of the unit-norm attention maps");
  m.def("attention_vjp", &ddfast::attention_vjp, py::arg("feats"), py::arg("labels"), py::arg("class_grads"),
        py::arg("p"), py::arg("spatial"),
        "K2 pass 2 of --segment: per layer dF (contiguous, the features' dtype) of sum_n <a_hat_n, u[y_n]> for "
        "per-class u [K, M]");
}
