// Kernel K3, CPU backend (OpenMP): G-VBSM Gram-eigen data densification loss and its gradient in one
// call (DESIGN §4 K3).
//
//   X̂ = adaptive_avg_pool2d(images, pool x pool).flatten(1)                              [B, D]
//   per class k: G_k = X̂_k X̂_kᵀ, (λ_k, V_k) = eigh(G_k)                     (float64)
//   loss = Σ_k Σ_i p_i (log p_i − log q_i),  p = softmax(λ_k/τ) (stop-grad), q = softmax(λ_k)
//   dλ = q − p,  dG = V diag(dλ) Vᵀ,  dX̂_k = 2 dG X̂_k,  dimages = pooling backward of dX̂.
//
// The loss is a scalar, so the gradient is computed in the same call (when asked for) and the
// autograd backward only scales it by the incoming gradient: no eigenvectors or Gram matrices are
// kept, and the images are read once for both directions.
//
// Phases (no loop over classes in Python):
//   0. classes: a stable sort of the labels (ascending label order, batch order within a class);
//   1. X̂ in class order, contiguous per class: pooling (separable bin sums; integer factors take a
//      fast path), or a row gather when H = W = pool (skipped when the labels are already sorted);
//   2. Gram: OpenMP work items = (class, block of 4 rows) -> lower triangle, accumulated in float64
//      (float inputs: fp32 FMAs, 8 products per lane and chunk, each chunk added in float64; AVX-512
//      kernel where the CPU has it, else AVX2);
//   3. eigensolve in float64, the class loss and the gradient factors: classes of >= kLapackMinN images
//      through our QL solver (tred2 + tql2; direct LAPACK dsyevd calls above kQlMaxN images) spread
//      over the threads, smaller ones through the one-sided parallel-order Jacobi solver (csrc/jacobi.h,
//      AVX2 copies when the CPU has it; the Jacobi solver is the GPU kernel's algorithm);
//   4+5. per block of rows of a class: dX̂ = 2 dG_k X̂_k (one single-threaded BLAS GEMM, written
//      straight into dimages when X̂ is the images in batch order; as A_k (V_rᵀ X̂_k) when only r <= n/3
//      eigenvalues have a non-negligible dλ, see loss_and_coef), then back to image order while the
//      block is in cache: adaptive-pooling backward (integer factors write each pixel once; 2 x 2 with
//      streaming stores) or a row copy. Float 2 x 2 pooling with a truncated gradient on an AVX-512
//      CPU: one fused kernel instead (fused_dx_pool2x2_avx512: Y = V_rᵀ X̂ per piece of 32 columns in
//      L1, A Y into registers, straight to the pixels).
// Case (c) of perf/test_densify.py (10 classes x 50, 3x64x64), one core, shared machine: pooling 1.5,
// Gram 1.3, eigensolves 1.0, dX̂ + pooling backward 1.1 ms (before the QL solver, the truncated
// gradient and the fused kernel: eigensolves 1.9 (MKL dsyevd), dX̂ GEMM 2.3, pooling backward 0.9).
// Schedules: with at least two classes per thread and enough work, each thread takes whole classes
// through phases 1-5 (no barriers; measured 5-8% faster on 10 classes x 50 and 20-40% on 100 x 10,
// 2 threads); otherwise phase by phase over all classes, a phase on several threads only when its work
// is large (kParallelWork). Every GEMM and eigensolve runs on one thread with a layout that does not
// depend on the schedule, so results repeat exactly for any number of threads.
// DDFAST_DENSIFY_PROFILE=1 prints the time of each phase to stderr; DDFAST_DENSIFY_ISA=base selects the
// portable path (no AVX2 kernels, ATen instead of direct BLAS/LAPACK calls).
//
// Ragged classes are exact (each class is its own n_k x n_k problem, no padding); a class of one
// image contributes 0. NaN/Inf images (or a Gram matrix that overflows) raise ValueError before any
// eigensolve; a class whose Jacobi iteration hits max_sweeps is reported in the status tensor
// (QL/LAPACK classes report 0 and raise if the solver fails).
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#include <chrono>
#include <cstdio>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define DDFAST_DENSIFY_X86 1
#endif

#include "buffer_cache.h"
#include "jacobi.h"  // ddfast::jacobi: baseline ISA
#include "parallel.h"

#ifdef DDFAST_DENSIFY_X86
// The same Jacobi algorithm compiled a second time for AVX2 + FMA (ddfast::jacobi_avx2), picked at
// run time when the CPU has it (DDFAST_DENSIFY_ISA=base forces the baseline copy).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#undef DDFAST_JACOBI_H_
#undef DDFAST_JACOBI_NS
#define DDFAST_JACOBI_NS jacobi_avx2
#include "jacobi.h"  // NOLINT(build/include): second copy, AVX2
#pragma GCC pop_options
#endif

namespace ddfast {
namespace densify {

constexpr int kRowBlock = 4;
// Phase 4 GEMM blocks: rows of one class per work item (a class of 50 splits into 2 x 25).
constexpr int64_t kDxRows = 32;
// A phase runs on all OpenMP threads only above this many multiply-adds / pixels (~1 ms on one core):
// below it the fork/join costs more than it saves. (On a machine shared with a background job a join
// can wait a whole scheduler slice for a descheduled thread; measured ~12 ms on 2 busy cores.)
constexpr double kParallelWork = 4e6;
// Gram: float products are summed in fp32 lanes over chunks of kGramChunk elements (8 per lane), each
// chunk then added in float64. (128 or 256 would make the AVX2 Gram 15-20% faster, the float64 flushes
// being a third of its instructions, but measured over 80 random batches they raise the float32 loss
// error vs float64 from 3.9e-7 to 5.1e-7 / 1.1e-6 median and its maximum 2-3x, near the tests' 1e-5.)
constexpr int64_t kGramChunk = 64;
// Classes of at least this many images are solved with the QL solver (or LAPACK), smaller ones with the
// Jacobi solver, whose sweep count is the status the Python side warns on (measured per matrix on one
// core: Jacobi 3.7 vs 5.9 us (MKL dsyevd) at n = 4, 13.0 vs 13.6 us at n = 8, 24.5 vs 19.2 us at n = 10;
// the QL solver: 2.9 us at n = 9, 3.5 us at n = 10).
constexpr int64_t kLapackMinN = 9;

// ------------------------------------------------------------------------------------ ISA choice
// DDFAST_DENSIFY_ISA=base selects the portable path: no AVX2 kernels and no direct BLAS/LAPACK calls
// (ATen's GEMM and batched eigh instead), so the tests can check it on any machine.
inline bool portable_only() {
  const char* env = std::getenv("DDFAST_DENSIFY_ISA");
  return env && std::string(env) == "base";
}

inline bool use_avx2() {
#ifdef DDFAST_DENSIFY_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && !portable_only();
#else
  return false;
#endif
}

// the float Gram's AVX-512 kernel, used where the AVX2 path is (avx2 true) and the CPU has AVX-512F
inline bool cpu_avx512() {
#ifdef DDFAST_DENSIFY_X86
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------ micro-kernels
// Gram block: out[r * ldo + j] = <rows[r], rows[j]> for r < nr (the block's rows) and j < nj,
// float64 accumulation. Generic version (any ISA, any scalar type).
template <typename T>
inline __attribute__((always_inline)) void gram_block_generic(const T* const* rows_blk, int nr, const T* const* rows,
                                                              int nj, int64_t D, double* out, int ldo) {
  for (int r = 0; r < nr; ++r) {
    const T* a = rows_blk[r];
    for (int j = 0; j < nj; ++j) {
      const T* b = rows[j];
      double total = 0.0;
      for (int64_t d0 = 0; d0 < D; d0 += kGramChunk) {
        const int64_t e = std::min(D, d0 + kGramChunk);
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t d = d0; d < e; ++d) acc += a[d] * b[d];
        total += double(acc);
      }
      out[r * ldo + j] = total;
    }
  }
}

template <typename T>
void gram_block_base(const T* const* rows_blk, int nr, const T* const* rows, int nj, int64_t D, double* out, int ldo) {
  gram_block_generic(rows_blk, nr, rows, nj, D, out, ldo);
}
#ifdef DDFAST_DENSIFY_X86
#define DDFAST_AVX2 __attribute__((target("avx2,fma")))

template <typename T>
DDFAST_AVX2 void gram_block_avx2(const T* const* rows_blk, int nr, const T* const* rows, int nj, int64_t D, double* out,
                                 int ldo) {
  gram_block_generic(rows_blk, nr, rows, nj, D, out, ldo);  // float64 data: auto-vectorized
}

DDFAST_AVX2 inline double hsum_pd(__m256d v) {
  __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  lo = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

// float rows: 4 rows x 3 columns per pass, 8-wide fp32 FMAs, flushed to float64 every kGramChunk
// elements. Three columns give 12 independent FMA chains in 16 registers with 7 loads per 12 FMAs
// (two columns: 8 chains, 6 loads per 8 FMAs, 4% slower; one column's 4 chains were latency-bound); a span of
// kGramSpan elements of the block's 4 rows (16 KiB) stays in L1 while up to kGramCols columns stream
// past it, their float64 partial sums (8 KiB) in L1 too. Measured on one core, 10 classes x 50 x 3072:
// 4.9-5.4 -> 3.6-4.8 ms over the plain loop (noisy shared machine), 1.43 -> 1.36 ms from 2 to 3 columns
// (microbenchmark, min of 60). Longer fp32 chunks would be faster (see kGramChunk) but less accurate.
// The additions happen in the same order as the plain loop, so results do not depend on the blocking.
constexpr int kGramCols = 66;  // a multiple of 3
constexpr int64_t kGramSpan = 1024;  // a multiple of kGramChunk

// adds a chunk's 8 fp32 lane sums to 4 float64 lanes (low half, then high half)
DDFAST_AVX2 inline void flush_chunk(__m256 acc, __m256d* tot) {
  *tot = _mm256_add_pd(*tot, _mm256_cvtps_pd(_mm256_castps256_ps128(acc)));
  *tot = _mm256_add_pd(*tot, _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1)));
}
template <>
DDFAST_AVX2 void gram_block_avx2<float>(const float* const* rows_blk, int nr, const float* const* rows, int nj,
                                        int64_t D, double* out, int ldo) {
  const float* a[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) a[r] = rows_blk[r < nr ? r : nr - 1];
  const int64_t D8 = D & ~int64_t(7);
  __m256d tot[kGramCols][kRowBlock];
  for (int j0 = 0; j0 < nj; j0 += kGramCols) {
    const int jn = std::min(kGramCols, nj - j0);
    for (int c = 0; c < jn; ++c)
      for (int r = 0; r < kRowBlock; ++r) tot[c][r] = _mm256_setzero_pd();
    for (int64_t s0 = 0; s0 < D8; s0 += kGramSpan) {
      const int64_t s1 = std::min(D8, s0 + kGramSpan);
      for (int c = 0; c < jn; c += 3) {  // three columns: 12 independent FMA chains hide the FMA latency
        const int cn = std::min(3, jn - c);  // a short last group repeats its last column, discarded
        const float* b0 = rows[j0 + c];
        const float* b1 = rows[j0 + c + std::min(1, cn - 1)];
        const float* b2 = rows[j0 + c + cn - 1];
        for (int64_t d0 = s0; d0 < s1; d0 += kGramChunk) {
          const int64_t e = std::min(s1, d0 + kGramChunk);
          __m256 acc0[kRowBlock], acc1[kRowBlock], acc2[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) acc0[r] = acc1[r] = acc2[r] = _mm256_setzero_ps();
          for (int64_t d = d0; d < e; d += 8) {
            const __m256 bv0 = _mm256_loadu_ps(b0 + d), bv1 = _mm256_loadu_ps(b1 + d), bv2 = _mm256_loadu_ps(b2 + d);
            for (int r = 0; r < kRowBlock; ++r) {
              __m256 av = _mm256_loadu_ps(a[r] + d);
              asm("" : "+x"(av));  // one load for the three FMAs (GCC would fold it into each)
              acc0[r] = _mm256_fmadd_ps(av, bv0, acc0[r]);
              acc1[r] = _mm256_fmadd_ps(av, bv1, acc1[r]);
              acc2[r] = _mm256_fmadd_ps(av, bv2, acc2[r]);
            }
          }
          for (int r = 0; r < kRowBlock; ++r) {
            flush_chunk(acc0[r], &tot[c][r]);
            if (cn > 1) flush_chunk(acc1[r], &tot[c + 1][r]);
            if (cn > 2) flush_chunk(acc2[r], &tot[c + 2][r]);
          }
        }
      }
    }
    for (int c = 0; c < jn; ++c) {
      const float* b = rows[j0 + c];
      for (int r = 0; r < nr; ++r) {
        double s = hsum_pd(tot[c][r]);
        for (int64_t d = D8; d < D; ++d) s += double(a[r][d]) * double(b[d]);
        out[r * ldo + j0 + c] = s;
      }
    }
  }
}


// Pooling by 2 x 2 (64 -> 32 px, the G-VBSM default on 64 px data) of one image of float rows
// (H = W = 2P): 8 outputs per step from two input rows, the same additions as the generic path
// ((r0[w] + r1[w]) + (r0[w+1] + r1[w+1])) * 0.25, so results are bit-identical.
DDFAST_AVX2 void pool_2x2_avx2(const float* img, int64_t C, int64_t P, float* out) {
  const int64_t W = 2 * P;
  const __m256 quarter = _mm256_set1_ps(0.25f);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t oh = 0; oh < P; ++oh) {
      const float* r0 = img + (c * 2 * P + 2 * oh) * W;
      const float* r1 = r0 + W;
      float* dst = out + (c * P + oh) * P;
      int64_t ow = 0;
      for (; ow + 8 <= P; ow += 8) {
        const int64_t w = 2 * ow;
        const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(r0 + w), _mm256_loadu_ps(r1 + w));
        const __m256 s1 = _mm256_add_ps(_mm256_loadu_ps(r0 + w + 8), _mm256_loadu_ps(r1 + w + 8));
        // hadd pairs within 128-bit lanes: [a01 a23 b01 b23 | a45 a67 b45 b67] -> [a01 a23 a45 a67 b01 ..]
        const __m256 h = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(s0, s1)), 0xD8));
        _mm256_storeu_ps(dst + ow, _mm256_mul_ps(h, quarter));
      }
      for (; ow < P; ++ow) dst[ow] = ((r0[2 * ow] + r1[2 * ow]) + (r0[2 * ow + 1] + r1[2 * ow + 1])) * 0.25f;
    }
  }
}

// Its backward: every pixel of the 2 x 2 bin gets g / 4. The image is written once and not read
// again by this kernel, so 32-byte aligned rows use non-temporal stores (no read-for-ownership of
// the 2x larger output); the caller issues the store fence.
DDFAST_AVX2 void pool_backward_2x2_avx2(const float* g, int64_t C, int64_t P, float* dimg) {
  const int64_t W = 2 * P;
  const __m256 quarter = _mm256_set1_ps(0.25f);
  const bool stream = (reinterpret_cast<uintptr_t>(dimg) % 32 == 0) && (W % 8 == 0);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t oh = 0; oh < P; ++oh) {
      const float* src = g + (c * P + oh) * P;
      float* d0 = dimg + (c * 2 * P + 2 * oh) * W;
      float* d1 = d0 + W;
      int64_t ow = 0;
      for (; ow + 8 <= P; ow += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + ow), quarter);
        const __m256 lo = _mm256_unpacklo_ps(v, v), hi = _mm256_unpackhi_ps(v, v);
        const __m256 a = _mm256_permute2f128_ps(lo, hi, 0x20), b = _mm256_permute2f128_ps(lo, hi, 0x31);
        if (stream) {
          _mm256_stream_ps(d0 + 2 * ow, a);
          _mm256_stream_ps(d0 + 2 * ow + 8, b);
          _mm256_stream_ps(d1 + 2 * ow, a);
          _mm256_stream_ps(d1 + 2 * ow + 8, b);
        } else {
          _mm256_storeu_ps(d0 + 2 * ow, a);
          _mm256_storeu_ps(d0 + 2 * ow + 8, b);
          _mm256_storeu_ps(d1 + 2 * ow, a);
          _mm256_storeu_ps(d1 + 2 * ow + 8, b);
        }
      }
      for (; ow < P; ++ow) d0[2 * ow] = d0[2 * ow + 1] = d1[2 * ow] = d1[2 * ow + 1] = src[ow] * 0.25f;
    }
  }
}

// The float Gram with AVX-512 (Zen 4, Intel server cores): 4 rows x 4 columns per pass, 16-wide fp32
// FMAs in 16 of the 32 registers (8 loads per 16 FMAs), flushed to float64 every kGramChunk512 elements:
// 8 products per fp32 lane as in the AVX2 kernel (the same rounding behaviour), half the instructions
// of the AVX2 kernel per multiply-add (which was bound by instruction throughput, its float64 flushes a
// third of them). Blocking and summation order per entry as in the AVX2 kernel, except for the lane
// width, so the results do not depend on the blocking either.
constexpr int kGramCols512 = 64;  // a multiple of 4
constexpr int64_t kGramChunk512 = 128;

#define DDFAST_AVX512 __attribute__((target("avx512f,avx2,fma")))
DDFAST_AVX512 inline void flush_chunk512(__m512 acc, __m512d* tot) {
  *tot = _mm512_add_pd(*tot, _mm512_cvtps_pd(_mm512_castps512_ps256(acc)));
  *tot = _mm512_add_pd(*tot, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
}

DDFAST_AVX512 void gram_block_avx512(const float* const* rows_blk, int nr, const float* const* rows, int nj, int64_t D,
                                     double* out, int ldo) {
  const float* a[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) a[r] = rows_blk[r < nr ? r : nr - 1];
  const int64_t D16 = D & ~int64_t(15);
  __m512d tot[kGramCols512][kRowBlock];
  for (int j0 = 0; j0 < nj; j0 += kGramCols512) {
    const int jn = std::min(kGramCols512, nj - j0);
    for (int c = 0; c < jn; ++c)
      for (int r = 0; r < kRowBlock; ++r) tot[c][r] = _mm512_setzero_pd();
    for (int64_t s0 = 0; s0 < D16; s0 += kGramSpan) {
      const int64_t s1 = std::min(D16, s0 + kGramSpan);
      for (int c = 0; c < jn; c += 4) {
        const int cn = std::min(4, jn - c);  // a short last group repeats its last column, discarded
        const float* b0 = rows[j0 + c];
        const float* b1 = rows[j0 + c + std::min(1, cn - 1)];
        const float* b2 = rows[j0 + c + std::min(2, cn - 1)];
        const float* b3 = rows[j0 + c + cn - 1];
        for (int64_t d0 = s0; d0 < s1; d0 += kGramChunk512) {
          const int64_t e = std::min(s1, d0 + kGramChunk512);
          __m512 acc0[kRowBlock], acc1[kRowBlock], acc2[kRowBlock], acc3[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) acc0[r] = acc1[r] = acc2[r] = acc3[r] = _mm512_setzero_ps();
          for (int64_t d = d0; d < e; d += 16) {
            const __m512 bv0 = _mm512_loadu_ps(b0 + d), bv1 = _mm512_loadu_ps(b1 + d);
            const __m512 bv2 = _mm512_loadu_ps(b2 + d), bv3 = _mm512_loadu_ps(b3 + d);
            for (int r = 0; r < kRowBlock; ++r) {
              __m512 av = _mm512_loadu_ps(a[r] + d);
              asm("" : "+v"(av));  // one load for the four FMAs
              acc0[r] = _mm512_fmadd_ps(av, bv0, acc0[r]);
              acc1[r] = _mm512_fmadd_ps(av, bv1, acc1[r]);
              acc2[r] = _mm512_fmadd_ps(av, bv2, acc2[r]);
              acc3[r] = _mm512_fmadd_ps(av, bv3, acc3[r]);
            }
          }
          for (int r = 0; r < kRowBlock; ++r) {
            flush_chunk512(acc0[r], &tot[c][r]);
            if (cn > 1) flush_chunk512(acc1[r], &tot[c + 1][r]);
            if (cn > 2) flush_chunk512(acc2[r], &tot[c + 2][r]);
            if (cn > 3) flush_chunk512(acc3[r], &tot[c + 3][r]);
          }
        }
      }
    }
    for (int c = 0; c < jn; ++c) {
      const float* b = rows[j0 + c];
      for (int r = 0; r < nr; ++r) {
        double s = _mm512_reduce_add_pd(tot[c][r]);
        for (int64_t d = D16; d < D; ++d) s += double(a[r][d]) * double(b[d]);
        out[r * ldo + j0 + c] = s;
      }
    }
  }
}

// dX̂_k = A_k (V_rᵀ X̂_k) fused with the 2 x 2 pooling backward (float, AVX-512, classes with a truncated
// gradient, H = W = 2P, P a multiple of 32): per piece of 32 pooled columns of one pooled row, Y = V_rᵀ
// X̂[:, piece] (r x 32, in L1), then for 8 images at a time their 32 dX̂ values (16 accumulators) go
// straight to the 2 x 64 pixels they cover (streaming stores). No dX̂ buffer, no separate BLAS calls;
// the multiply-adds overlap the image writes. Sums over j (n) and t (r) in fp32, in index order.
template <int TB>
DDFAST_AVX512 inline void fused_y_block(const float* bt, int n, const float* const* xrows, int64_t q, float* y) {
  __m512 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const __m512 x0 = _mm512_loadu_ps(xrows[j] + q), x1 = _mm512_loadu_ps(xrows[j] + q + 16);
    _mm_prefetch(reinterpret_cast<const char*>(xrows[j] + q + 64), _MM_HINT_T0);  // two pieces ahead
    _mm_prefetch(reinterpret_cast<const char*>(xrows[j] + q + 80), _MM_HINT_T0);
    for (int t = 0; t < TB; ++t) {
      const __m512 b = _mm512_set1_ps(bt[t * n + j]);
      acc[t][0] = _mm512_fmadd_ps(b, x0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(b, x1, acc[t][1]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    _mm512_storeu_ps(y + t * 32, acc[t][0]);
    _mm512_storeu_ps(y + t * 32 + 16, acc[t][1]);
  }
}

template <int IB>
DDFAST_AVX512 inline void fused_dx_block(const float* a, int r, const float* y, float* const* dst, int64_t W,
                                         bool stream) {
  __m512 acc[IB][2];
  for (int i = 0; i < IB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int t = 0; t < r; ++t) {
    const __m512 y0 = _mm512_loadu_ps(y + t * 32), y1 = _mm512_loadu_ps(y + t * 32 + 16);
    for (int i = 0; i < IB; ++i) {
      const __m512 b = _mm512_set1_ps(a[i * r + t]);
      acc[i][0] = _mm512_fmadd_ps(b, y0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(b, y1, acc[i][1]);
    }
  }
  const __m512 quarter = _mm512_set1_ps(0.25f);
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  for (int i = 0; i < IB; ++i) {
    const __m512 v0 = _mm512_mul_ps(acc[i][0], quarter), v1 = _mm512_mul_ps(acc[i][1], quarter);
    const __m512 p0 = _mm512_permutexvar_ps(lo, v0), p1 = _mm512_permutexvar_ps(hi, v0);
    const __m512 p2 = _mm512_permutexvar_ps(lo, v1), p3 = _mm512_permutexvar_ps(hi, v1);
    float* r0 = dst[i];
    float* r1 = r0 + W;
    if (stream) {
      _mm512_stream_ps(r0, p0), _mm512_stream_ps(r0 + 16, p1), _mm512_stream_ps(r0 + 32, p2), _mm512_stream_ps(r0 + 48, p3);
      _mm512_stream_ps(r1, p0), _mm512_stream_ps(r1 + 16, p1), _mm512_stream_ps(r1 + 32, p2), _mm512_stream_ps(r1 + 48, p3);
    } else {
      _mm512_storeu_ps(r0, p0), _mm512_storeu_ps(r0 + 16, p1), _mm512_storeu_ps(r0 + 32, p2), _mm512_storeu_ps(r0 + 48, p3);
      _mm512_storeu_ps(r1, p0), _mm512_storeu_ps(r1 + 16, p1), _mm512_storeu_ps(r1 + 32, p2), _mm512_storeu_ps(r1 + 48, p3);
    }
  }
}

// pieces [ch0, ch1) of one class: piece ch = (channel c, pooled row oh, 32-column part p), in that order.
// a: A (n x r), bt: V_rᵀ (r x n), xrows: the class's n rows of X̂, img: its n images (C x 2P x 2P),
// ybuf: r x 32 floats. The caller issues the store fence.
DDFAST_AVX512 void fused_dx_pool2x2_avx512(const float* a, const float* bt, int n, int r, const float* const* xrows,
                                           float* const* img, int64_t C, int64_t P, int64_t ch0, int64_t ch1,
                                           float* ybuf) {
  (void)C;
  const int64_t parts = P / 32, W = 2 * P;
  bool stream = W % 16 == 0;
  for (int i = 0; i < n; ++i) stream = stream && reinterpret_cast<uintptr_t>(img[i]) % 64 == 0;
  float* dst[8];
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int64_t p = ch % parts, row = ch / parts;  // row = c * P + oh
    const int64_t c = row / P, oh = row % P;
    const int64_t q = row * P + 32 * p;
    for (int t0 = 0; t0 < r; t0 += 8) {
      const float* b = bt + size_t(t0) * n;
      float* y = ybuf + t0 * 32;
      switch (std::min(8, r - t0)) {
        case 8: fused_y_block<8>(b, n, xrows, q, y); break;
        case 7: fused_y_block<7>(b, n, xrows, q, y); break;
        case 6: fused_y_block<6>(b, n, xrows, q, y); break;
        case 5: fused_y_block<5>(b, n, xrows, q, y); break;
        case 4: fused_y_block<4>(b, n, xrows, q, y); break;
        case 3: fused_y_block<3>(b, n, xrows, q, y); break;
        case 2: fused_y_block<2>(b, n, xrows, q, y); break;
        default: fused_y_block<1>(b, n, xrows, q, y); break;
      }
    }
    const int64_t pix = (c * 2 * P + 2 * oh) * W + 64 * p;
    for (int i0 = 0; i0 < n; i0 += 8) {
      const int ib = std::min(8, n - i0);
      for (int i = 0; i < ib; ++i) dst[i] = img[i0 + i] + pix;
      const float* ai = a + size_t(i0) * r;
      switch (ib) {
        case 8: fused_dx_block<8>(ai, r, ybuf, dst, W, stream); break;
        case 7: fused_dx_block<7>(ai, r, ybuf, dst, W, stream); break;
        case 6: fused_dx_block<6>(ai, r, ybuf, dst, W, stream); break;
        case 5: fused_dx_block<5>(ai, r, ybuf, dst, W, stream); break;
        case 4: fused_dx_block<4>(ai, r, ybuf, dst, W, stream); break;
        case 3: fused_dx_block<3>(ai, r, ybuf, dst, W, stream); break;
        case 2: fused_dx_block<2>(ai, r, ybuf, dst, W, stream); break;
        default: fused_dx_block<1>(ai, r, ybuf, dst, W, stream); break;
      }
    }
  }
}

#endif

template <typename T>
void gram_block(bool avx2, const T* const* rows_blk, int nr, const T* const* rows, int nj, int64_t D, double* out,
                int ldo) {
#ifdef DDFAST_DENSIFY_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && cpu_avx512()) return gram_block_avx512(rows_blk, nr, rows, nj, D, out, ldo);
  }
  if (avx2) return gram_block_avx2<T>(rows_blk, nr, rows, nj, D, out, ldo);
#endif
  (void)avx2;
  gram_block_base<T>(rows_blk, nr, rows, nj, D, out, ldo);
}

// dX̂ rows: out (m x D, row stride ldo) = coef (m x n, row stride n) · X̂ (n x D, row stride ldx), one
// single-threaded BLAS GEMM called from inside the OpenMP region (the BLAS that torch links, MKL or
// OpenBLAS, runs on the calling thread there). A multiply-add kernel of our own reading one cache
// line of each of the n class rows per step ran 4x slower than the GEMM (50 rows of 12 KiB: more
// streams than the hardware prefetcher follows). Without the Fortran symbols in the process (a torch
// build without a BLAS) the same product goes through at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc, size_t transa_len, size_t transb_len) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc, size_t transa_len, size_t transb_len) __attribute__((weak));
}

// MKL's per-thread thread count (C interface; absent with another BLAS). Our GEMMs and eigensolves are
// small and each runs on one thread by design: outside an OpenMP region MKL would otherwise start its
// own team for them (measured: the dX̂ phase of 10 classes x 10 images 0.26 ms on one thread, 2.9 ms
// on two).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

// Keeps the BLAS/LAPACK calls of the calling thread single-threaded while alive.
class SerialBlasScope {
 public:
  SerialBlasScope() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlasScope() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int previous_;
};

template <typename T>
void rows_gemm(bool blas_direct, const T* coef, int m, int n, const T* x, int64_t ldx, int64_t D, T* out,
               int64_t ldo) {
  // row-major out = coef · x is column-major outᵀ (D x m) = xᵀ (D x n) · coefᵀ (n x m)
  const int Di = int(D), lx = int(ldx), lo = int(ldo);
  const T one = T(1), zero = T(0);
  if constexpr (std::is_same_v<T, float>) {
    if (blas_direct && sgemm_ != nullptr)
      return sgemm_("N", "N", &Di, &m, &n, &one, x, &lx, coef, &n, &zero, out, &lo, 1, 1);
  } else {
    if (blas_direct && dgemm_ != nullptr)
      return dgemm_("N", "N", &Di, &m, &n, &one, x, &lx, coef, &n, &zero, out, &lo, 1, 1);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor o = at::from_blob(out, {m, D}, {ldo, 1}, opts);
  at::mm_out(o, at::from_blob(const_cast<T*>(coef), {m, n}, opts),
             at::from_blob(const_cast<T*>(x), {n, D}, {ldx, 1}, opts));
}

// ------------------------------------------------------------------------------ pooling
// torch's adaptive pooling bins: [floor(i*in/out), ceil((i+1)*in/out)).
inline int64_t bin_start(int64_t i, int64_t out, int64_t in) { return (i * in) / out; }
inline int64_t bin_end(int64_t i, int64_t out, int64_t in) { return ((i + 1) * in + out - 1) / out; }

// Bin bounds along one axis, computed once per call.
struct Bins {
  std::vector<int64_t> lo, hi;
  Bins(int64_t out, int64_t in) : lo(out), hi(out) {
    for (int64_t i = 0; i < out; ++i) {
      lo[i] = bin_start(i, out, in);
      hi[i] = bin_end(i, out, in);
    }
  }
};

// Separable: sum the bin's input rows (contiguous, vectorized), then the columns of each bin.
// Integer factors (H = kh·P, W = kw·P: disjoint kh x kw bins) take a fast path in the input precision.
template <typename T>
void pool_image(bool avx2, const T* img, int64_t C, int64_t H, int64_t W, int64_t P, const Bins& bh, const Bins& bw,
                T* out) {
#ifdef DDFAST_DENSIFY_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && H == 2 * P && W == 2 * P) return pool_2x2_avx2(img, C, P, out);
  }
#endif
  (void)avx2;
  if (H % P == 0 && W % P == 0) {
    const int64_t kh = H / P, kw = W / P;
    const T scale = T(1) / T(kh * kw);
    std::vector<T> row(W);
    for (int64_t c = 0; c < C; ++c) {
      const T* plane = img + c * H * W;
      for (int64_t oh = 0; oh < P; ++oh) {
        const T* src = plane + oh * kh * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) row[w] = src[w];
        for (int64_t r = 1; r < kh; ++r) {
          const T* s2 = src + r * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) row[w] += s2[w];
        }
        T* dst = out + (c * P + oh) * P;
        if (kw == 2) {
#pragma omp simd
          for (int64_t ow = 0; ow < P; ++ow) dst[ow] = (row[2 * ow] + row[2 * ow + 1]) * scale;
        } else {
          for (int64_t ow = 0; ow < P; ++ow) {
            T acc = T(0);
            for (int64_t j = 0; j < kw; ++j) acc += row[ow * kw + j];
            dst[ow] = acc * scale;
          }
        }
      }
    }
    return;
  }
  std::vector<double> row(W);
  for (int64_t c = 0; c < C; ++c) {
    const T* plane = img + c * H * W;
    for (int64_t oh = 0; oh < P; ++oh) {
      std::fill(row.begin(), row.end(), 0.0);
      for (int64_t h = bh.lo[oh]; h < bh.hi[oh]; ++h) {
        const T* src = plane + h * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) row[w] += double(src[w]);
      }
      const double rh = 1.0 / double(bh.hi[oh] - bh.lo[oh]);
      T* dst = out + (c * P + oh) * P;
      for (int64_t ow = 0; ow < P; ++ow) {
        double sum = 0.0;
        for (int64_t w = bw.lo[ow]; w < bw.hi[ow]; ++w) sum += row[w];
        dst[ow] = T(sum * rh / double(bw.hi[ow] - bw.lo[ow]));
      }
    }
  }
}

// dimg[h][w] = Σ over the bins (oh, ow) containing (h, w) of g[oh][ow] / (|bin_h(oh)| |bin_w(ow)|).
// Writes every pixel of the image (no zero-filled output needed).
template <typename T>
void pool_backward_image(bool avx2, const T* g, int64_t C, int64_t H, int64_t W, int64_t P, const Bins& bh,
                         const Bins& bw, T* dimg) {
#ifdef DDFAST_DENSIFY_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && H == 2 * P && W == 2 * P) return pool_backward_2x2_avx2(g, C, P, dimg);
  }
#endif
  (void)avx2;
  std::vector<T> row(W);
  if (H % P == 0 && W % P == 0) {  // disjoint bins: every pixel gets exactly one value
    const int64_t kh = H / P, kw = W / P;
    const T scale = T(1) / T(kh * kw);
    for (int64_t c = 0; c < C; ++c) {
      T* plane = dimg + c * H * W;
      for (int64_t oh = 0; oh < P; ++oh) {
        const T* src = g + (c * P + oh) * P;
        if (kw == 2) {
#pragma omp simd
          for (int64_t ow = 0; ow < P; ++ow) row[2 * ow] = row[2 * ow + 1] = src[ow] * scale;
        } else {
          for (int64_t ow = 0; ow < P; ++ow)
            for (int64_t j = 0; j < kw; ++j) row[ow * kw + j] = src[ow] * scale;
        }
        for (int64_t r = 0; r < kh; ++r) std::memcpy(plane + (oh * kh + r) * W, row.data(), W * sizeof(T));
      }
    }
    return;
  }
  std::fill(dimg, dimg + C * H * W, T(0));
  for (int64_t c = 0; c < C; ++c) {
    T* plane = dimg + c * H * W;
    for (int64_t oh = 0; oh < P; ++oh) {
      std::fill(row.begin(), row.end(), T(0));
      const T* src = g + (c * P + oh) * P;
      for (int64_t ow = 0; ow < P; ++ow) {
        const T v = src[ow] / T(bw.hi[ow] - bw.lo[ow]);
        for (int64_t w = bw.lo[ow]; w < bw.hi[ow]; ++w) row[w] += v;
      }
      const T rh = T(1) / T(bh.hi[oh] - bh.lo[oh]);
      for (int64_t h = bh.lo[oh]; h < bh.hi[oh]; ++h) {
        T* dst = plane + h * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) dst[w] += row[w] * rh;
      }
    }
  }
}

// ------------------------------------------------------------------------------ classes
struct Layout {
  std::vector<int64_t> order;    // [B] image indices grouped by class
  std::vector<int64_t> offsets;  // [K + 1]
  std::vector<int64_t> classes;  // [K] label values, ascending
};

inline Layout make_layout(const at::Tensor& labels) {
  at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t B = lab.numel();
  const int64_t* l = lab.data_ptr<int64_t>();
  Layout out;
  out.order.resize(B);
  std::iota(out.order.begin(), out.order.end(), int64_t(0));
  std::stable_sort(out.order.begin(), out.order.end(), [l](int64_t a, int64_t b) { return l[a] < l[b]; });
  for (int64_t r = 0; r < B; ++r) {
    const int64_t v = l[out.order[r]];
    if (r == 0 || v != out.classes.back()) {
      out.classes.push_back(v);
      out.offsets.push_back(r);
    }
  }
  out.offsets.push_back(B);
  return out;
}

// ------------------------------------------------------------------------------ per-class solve
// One symmetric PSD matrix a (n x n, full storage) through the Jacobi driver (csrc/jacobi.h):
// outputs w (ascending) and vt (rows = eigenvectors).
template <typename T>
int eigh_one(bool avx2, int lanes, const T* a, int n, T* w, T* vt, int max_sweeps, T rel_tol) {
  std::vector<T> mt(size_t(n) * n), vt_work(size_t(n) * n), reals(jacobi::scratch_reals(n));
  std::vector<int> ints(jacobi::scratch_ints(n));
#ifdef DDFAST_DENSIFY_X86
  if (avx2)
    return jacobi_avx2::eigh_driver<T>(jacobi_avx2::SerialLanes{lanes}, a, n, n, mt.data(), n, vt_work.data(), w, vt,
                                       n, max_sweeps, rel_tol, ints.data(), reals.data());
#endif
  (void)avx2;
  return jacobi::eigh_driver<T>(jacobi::SerialLanes{lanes}, a, n, n, mt.data(), n, vt_work.data(), w, vt, n,
                                max_sweeps, rel_tol, ints.data(), reals.data());
}

struct ClassResult {
  double loss = 0.0;
  int status = 0;
  int rank = 0;  // terms kept in the gradient (see loss_and_coef); 0: coef is the full n x n 2 dG
};

// Gradient terms below this fraction of the largest are dropped (see loss_and_coef): far below the
// rounding of the output precision (float: 2^-30 · sqrt(n) of ‖dX̂‖ at most vs fp32 eps 2^-24).
// Smaller classes keep the one n x n GEMM (two GEMMs of inner size r <= 3 are no faster at n = 10).
constexpr int kLowRankMinN = 20;
template <typename T>
constexpr double kTermDrop = std::is_same_v<T, float> ? 0x1p-30 : 0x1p-60;

// The class loss from its eigenvalues w (n) and, with a gradient, the factors of
// 2 dG X̂ = Σ_i 2 dλ_i v_i (v_iᵀ X̂)  (v_i = row i of vt) in coef (n x n slots).
// The terms are orthogonal (Frobenius) with norms 2 |dλ_i| sqrt(λ_i), and dλ = q − p is negligible for
// all but the top eigenvalues when the spectrum is wide compared with τ (the usual case: case (c) keeps
// 8-11 of 50): terms below kTermDrop<T> times the largest norm are dropped, so the dropped part is at
// most sqrt(n) · kTermDrop<T> of ‖dX̂‖ (below the output's rounding). With r kept terms, 3r <= n and
// n >= kLowRankMinN, coef holds A = [2 dλ_j v_j] (n x r, row-major) followed by Vᵀ = [v_j] (r x n), and
// the caller computes dX̂ = A (Vᵀ X̂) in 2 n r D multiply-adds instead of n² D (rank = r; case (c): the
// dX̂ GEMMs 2.3 -> 1.5 ms on one core); otherwise coef = 2 dG (rank 0).
template <typename T>
double loss_and_coef(const double* w, const double* vt, int n, double tau, T* coef, int* rank) {
  std::vector<double> dlam(n);
  const double loss = jacobi::softmax_kl<double>(w, n, tau, coef ? dlam.data() : nullptr);
  *rank = 0;
  if (!coef) return loss;
  std::vector<double> term(n);
  double tmax = 0.0;
  for (int i = 0; i < n; ++i) {
    term[i] = std::abs(dlam[i]) * std::sqrt(std::max(w[i], 0.0));
    tmax = std::max(tmax, term[i]);
  }
  std::vector<int> keep;
  for (int i = 0; i < n; ++i)
    if (term[i] > kTermDrop<T> * tmax) keep.push_back(i);
  const int r = int(keep.size());
  if (r > 0 && 3 * r <= n && n >= kLowRankMinN) {
    T* a = coef;
    T* bt = coef + size_t(n) * r;
    for (int j = 0; j < r; ++j) {
      const double* v = vt + size_t(keep[j]) * n;
      const double s = 2.0 * dlam[keep[j]];
      for (int row = 0; row < n; ++row) {
        a[size_t(row) * r + j] = T(s * v[row]);
        bt[size_t(j) * n + row] = T(v[row]);
      }
    }
    *rank = r;
    return loss;
  }
  std::vector<double> dg(size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    const double* v = vt + size_t(i) * n;
    for (int r = 0; r < n; ++r) {
      const double cr = 2.0 * dlam[i] * v[r];
      double* row = dg.data() + size_t(r) * n;
#pragma omp simd
      for (int c = 0; c < n; ++c) row[c] += cr * v[c];
    }
  }
  for (size_t i = 0; i < dg.size(); ++i) coef[i] = T(dg[i]);
  return loss;
}

// Full symmetric copy of a class Gram matrix stored as its lower triangle (row-major n x n).
inline void symmetrize(const double* gram, int n, double* a) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) a[size_t(i) * n + j] = a[size_t(j) * n + i] = gram[size_t(i) * n + j];
}

// Small classes: the Jacobi solver of csrc/jacobi.h (faster than a LAPACK call below kLapackMinN).
template <typename T>
ClassResult solve_class_jacobi(bool avx2, const double* gram, int n, double tau, int max_sweeps, T* coef) {
  ClassResult res;
  std::vector<double> a(size_t(n) * n), vt(size_t(n) * n), w(n);
  symmetrize(gram, n, a.data());
  res.status = eigh_one<double>(avx2, 1, a.data(), n, w.data(), vt.data(), max_sweeps, 0.0);
  if (res.status == jacobi::kNonFinite) return res;
  res.loss = loss_and_coef<T>(w.data(), vt.data(), n, tau, coef, &res.rank);
  return res;
}

// Classes of n >= kLapackMinN images: the QL solver below (tred2 + tql2, float64) up to kQlMaxN images,
// LAPACK divide and conquer (dsyevd) above, one matrix at a time on one thread, the classes spread over
// the OpenMP threads. Status 0 for these classes; a failure raises. (dsyevd was measured 6x faster than
// the Jacobi solver at n = 50, 12x at n = 128; the QL solver is 2-4x faster than a direct MKL dsyevd
// call up to n = 100, equal at n = 128.) dsyevd is called directly from inside an OpenMP region (so MKL
// runs it on one thread): torch.linalg.eigh adds copies per call, and a multi-threaded MKL makes a
// 50 x 50 solve slower (measured 533 vs 351 us per matrix with 2 threads). With DDFAST_DENSIFY_ISA=base
// the classes go through one batched at::linalg_eigh per class size.
extern "C" {
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w, double* work,
             const int* lwork, int* iwork, const int* liwork, int* info, size_t jobz_len, size_t uplo_len)
    __attribute__((weak));
}

constexpr int64_t kQlMaxN = 128;

// Estimated microseconds of one n x n eigensolve with vectors on one core: the QL solver (3.5 us at
// n = 10, 13 us at n = 20, 92 us at n = 50, 515 us at n = 100, AVX2) and above kQlMaxN direct dsyevd
// calls (MKL: 13 us at n = 10, 42 us at n = 20, 191 us at n = 50, 1.24 ms at n = 128).
inline double lapack_us(int64_t n) {
  const double x = double(n);
  return n <= kQlMaxN ? 1.0 + 0.01 * x * x + 0.00075 * x * x * x : 5.0 + 0.075 * x * x;
}

// eigenvalues (ascending) into w and eigenvectors as the rows of a (n x n, symmetric input) via dsyevd
inline void dsyevd_rows(double* a, int n, double* w, std::vector<double>* work, std::vector<int>* iwork) {
  int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0.0;  // workspace query: the blocked tridiagonalisation needs more than the minimum
  dsyevd_("V", "L", &n, a, &n, w, &work_query, &lwork, &iwork_query, &liwork, &info, 1, 1);
  lwork = std::max(int(work_query), 1 + 6 * n + 2 * n * n);
  liwork = std::max(iwork_query, 3 + 5 * n);
  work->resize(size_t(lwork));
  iwork->resize(size_t(liwork));
  // symmetric, so row-major = column-major; LAPACK's eigenvector columns are rows in row-major
  dsyevd_("V", "L", &n, a, &n, w, work->data(), &lwork, iwork->data(), &liwork, &info, 1, 1);
  if (info != 0) throw std::runtime_error("densify_loss: LAPACK dsyevd failed (info " + std::to_string(info) + ")");
}

// ------------------------------------------------------------------------------ QL eigensolver
// Symmetric eigendecomposition for the classes of >= kLapackMinN images: Householder reduction to
// tridiagonal form, accumulation of the transformations, implicit QL with Wilkinson-type shifts
// (EISPACK tred2 + tql2, as in the public-domain JAMA), all in float64 on one thread. It works on
// W = Vᵀ, so every inner loop runs along a contiguous row (vectorized: n = 50 is 20 KB, in L1) and
// the eigenvectors come out as the rows of W, the layout loss_and_coef takes. Measured per 50 x 50
// matrix on one core: ~4x faster than a direct MKL dsyevd call (whose fixed costs dominate at this
// size) with the same backward stability (orthogonal transformations only).

// sqrt(x² + y²) without overflow or underflow of the squares
inline double safe_hypot(double x, double y) {
  x = std::abs(x);
  y = std::abs(y);
  const double a = std::max(x, y), b = std::min(x, y);
  if (a == 0.0) return 0.0;
  const double t = b / a;
  return a * std::sqrt(1.0 + t * t);
}

// the QL rotation's radius: sqrt(p² + e²) directly (the latency of the rotation recurrence bounds the
// QL sweeps), safe_hypot when the squares would leave the normal range
inline __attribute__((always_inline)) double fast_hypot(double x, double y) {
  const double r2 = x * x + y * y;
  if (__builtin_expect(r2 > 0x1p-1000 && r2 < 0x1p+1000, 1)) return std::sqrt(r2);
  return safe_hypot(x, y);
}

// a (n x n, symmetric, row-major) -> rows of a = orthonormal eigenvectors, w = eigenvalues ascending.
// e: n doubles of scratch. Returns false when the QL iteration does not converge (30 n iterations).
inline __attribute__((always_inline)) bool eigh_ql_generic(double* a, int n, double* w, double* e) {
  double* d = w;
  const auto W = [a, n](int r, int c) -> double& { return a[size_t(r) * n + c]; };  // W = Vᵀ
  // tred2 with V[k][j] -> W(j, k)
  for (int j = 0; j < n; ++j) d[j] = W(j, n - 1);
  for (int i = n - 1; i > 0; --i) {
    double scale = 0.0, h = 0.0;
    for (int k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = W(j, i - 1);
        W(j, i) = 0.0;
        W(i, j) = 0.0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0.0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        W(i, j) = f;
        const double* wj = &W(j, 0);
        g = e[j] + wj[j] * f;
        double g2 = 0.0;
#pragma omp simd reduction(+ : g2)
        for (int k = j + 1; k < i; ++k) {
          g2 += wj[k] * d[k];
          e[k] += wj[k] * f;
        }
        e[j] = g + g2;
      }
      f = 0.0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        double* wj = &W(j, 0);
#pragma omp simd
        for (int k = j; k < i; ++k) wj[k] -= (f * e[k] + g * d[k]);
        d[j] = wj[i - 1];
        wj[i] = 0.0;
      }
    }
    d[i] = h;
  }
  // accumulate the transformations
  for (int i = 0; i < n - 1; ++i) {
    W(i, n - 1) = W(i, i);
    W(i, i) = 1.0;
    const double h = d[i + 1];
    double* wi1 = &W(i + 1, 0);
    if (h != 0.0) {
      for (int k = 0; k <= i; ++k) d[k] = wi1[k] / h;
      for (int j = 0; j <= i; ++j) {
        double* wj = &W(j, 0);
        double g = 0.0;
#pragma omp simd reduction(+ : g)
        for (int k = 0; k <= i; ++k) g += wi1[k] * wj[k];
#pragma omp simd
        for (int k = 0; k <= i; ++k) wj[k] -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) wi1[k] = 0.0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = W(j, n - 1);
    W(j, n - 1) = 0.0;
  }
  W(n - 1, n - 1) = 1.0;
  e[0] = 0.0;
  // tql2 with V[k][i] -> W(i, k)
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  const double eps = 0x1p-52;
  int budget = 30 * n;
  for (int l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int m = l;
    while (m < n - 1 && !(std::abs(e[m]) <= eps * tst1)) ++m;  // e[n - 1] = 0
    if (m > l) {
      do {
        if (--budget < 0) return false;
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = safe_hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = fast_hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          double* wi = &W(i, 0);
          double* wi1 = &W(i + 1, 0);
#pragma omp simd
          for (int k = 0; k < n; ++k) {
            const double t = wi1[k];
            wi1[k] = s * wi[k] + c * t;
            wi[k] = c * wi[k] - s * t;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0.0;
  }
  // ascending order (selection sort, rows swapped with their eigenvalues)
  for (int i = 0; i < n - 1; ++i) {
    int k = i;
    for (int j = i + 1; j < n; ++j)
      if (d[j] < d[k]) k = j;
    if (k != i) {
      std::swap(d[k], d[i]);
      std::swap_ranges(&W(i, 0), &W(i, 0) + n, &W(k, 0));
    }
  }
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(d[i])) return false;
  return true;
}

inline bool eigh_ql_base(double* a, int n, double* w, double* e) { return eigh_ql_generic(a, n, w, e); }
#ifdef DDFAST_DENSIFY_X86
DDFAST_AVX2 bool eigh_ql_avx2(double* a, int n, double* w, double* e) { return eigh_ql_generic(a, n, w, e); }
#endif
inline bool eigh_ql_rows(bool avx2, double* a, int n, double* w, double* e) {
#ifdef DDFAST_DENSIFY_X86
  if (avx2) return eigh_ql_avx2(a, n, w, e);
#endif
  (void)avx2;
  return eigh_ql_base(a, n, w, e);
}

// workspace of one thread's eigensolves
struct LapackWork {
  std::vector<double> a, w, work;
  std::vector<int> iwork;
};

template <typename T>
ClassResult solve_class_lapack(const double* gram, int n, double tau, T* coef, LapackWork* ws) {
  ws->a.resize(size_t(n) * n);
  ws->w.resize(n);
  symmetrize(gram, n, ws->a.data());
  if (n > kQlMaxN && dsyevd_ != nullptr) {
    dsyevd_rows(ws->a.data(), n, ws->w.data(), &ws->work, &ws->iwork);
  } else {
    ws->work.resize(size_t(n));
    if (!eigh_ql_rows(use_avx2(), ws->a.data(), n, ws->w.data(), ws->work.data()))
      throw std::runtime_error("densify_loss: the QL eigensolver did not converge");
  }
  ClassResult res;
  res.loss = loss_and_coef<T>(ws->w.data(), ws->a.data(), n, tau, coef, &res.rank);
  return res;
}

// our own solvers (QL, dsyevd above kQlMaxN when present) rather than at::linalg_eigh
inline bool lapack_direct() { return !portable_only(); }

template <typename T>
void solve_classes_lapack(const std::vector<int64_t>& ks, const Layout& layout, const double* gram,
                          const std::vector<int64_t>& gram_off, double tau, T* coef,
                          std::vector<ClassResult>* results) {
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t m = int64_t(ks.size());
  if (!lapack_direct()) {  // portable path: one batched torch call per class size
    std::map<int64_t, std::vector<int64_t>> by_size;
    for (int64_t k : ks) by_size[off[k + 1] - off[k]].push_back(k);
    for (const auto& [n, group] : by_size) {
      at::Tensor a = at::empty({int64_t(group.size()), n, n}, at::kDouble);
      for (size_t i = 0; i < group.size(); ++i)
        symmetrize(gram + gram_off[group[i]], int(n), a.data_ptr<double>() + i * n * n);
      auto [w, v] = at::linalg_eigh(a, "L");
      at::Tensor vt = v.transpose(1, 2).contiguous();  // rows = eigenvectors
      for (size_t i = 0; i < group.size(); ++i) {
        const int64_t k = group[i];
        (*results)[k].loss = loss_and_coef<T>(w.data_ptr<double>() + i * n, vt.data_ptr<double>() + i * n * n, int(n),
                                              tau, coef ? coef + gram_off[k] : nullptr, &(*results)[k].rank);
      }
    }
    return;
  }
  double total_us = 0.0;
  for (int64_t k : ks) total_us += lapack_us(off[k + 1] - off[k]);
  const bool parallel = m > 1 && total_us > 1e3 * kParallelWork / 4e6;
  std::vector<std::string> errors(m);
#pragma omp parallel if (parallel)
  {
    LapackWork ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < m; ++i) {  // ks: largest classes first
      const int64_t k = ks[i];
      try {
        (*results)[k] = solve_class_lapack<T>(gram + gram_off[k], int(off[k + 1] - off[k]), tau,
                                              coef ? coef + gram_off[k] : nullptr, &ws);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
  }
  for (const std::string& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
}

// ------------------------------------------------------------------------------ driver
template <typename T>
std::tuple<double, std::vector<int>> run(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t P,
                                         const Layout& layout, double tau, bool with_grad, int max_sweeps, T* dx) {
  const int64_t K = int64_t(layout.classes.size());
  const int64_t D = C * P * P;
  const bool identity = (H == P && W == P);
  const bool avx2 = use_avx2();
  const std::vector<int64_t>& order = layout.order;
  const std::vector<int64_t>& off = layout.offsets;
  const auto count = [&](int64_t k) { return off[k + 1] - off[k]; };
  bool sorted = true;  // labels already grouped in ascending order (the recover loop's class-major batches)
  for (int64_t r = 0; r < B && sorted; ++r) sorted = order[r] == r;
  const SerialBlasScope serial_blas;
  const bool prof = std::getenv("DDFAST_DENSIFY_PROFILE") != nullptr;
  auto t0 = std::chrono::steady_clock::now();
  auto lap = [&](const char* what) {
    if (!prof) return;
    auto t1 = std::chrono::steady_clock::now();
    std::fprintf(stderr, "densify %-8s %8.3f ms\n", what, std::chrono::duration<double, std::milli>(t1 - t0).count());
    t0 = t1;
  };
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const bool par_pool = double(B) * C * H * W > kParallelWork;

  // X̂: pooled rows in class order (the images themselves when no pooling and no reordering is
  // needed). Row stride ld: a row of a multiple of 512 bytes (3 x 32 x 32 floats = 12 KiB) gets one
  // cache line of padding, so the rows of a class do not all map to the same L1 set.
  const bool gather = !(identity && sorted);
  at::Tensor pooled_store;  // page-resident (csrc/buffer_cache.cpp)
  const T* xs = x;
  int64_t ld = D;
  if (gather) {
    const int64_t line = 64 / int64_t(sizeof(T));
    ld = (D * int64_t(sizeof(T))) % 512 == 0 ? D + line : D;
    pooled_store = cached_empty({B, ld}, opts, at::MemoryFormat::Contiguous);
    xs = pooled_store.data_ptr<T>();
  }
  T* pooled = gather ? pooled_store.data_ptr<T>() : nullptr;
  std::vector<const T*> rows(B);
  for (int64_t r = 0; r < B; ++r) rows[r] = xs + r * ld;
  const Bins bh(P, H), bw(P, W);
  const auto pool_row = [&](int64_t r) {  // phase 1 for one row of X̂
    if (identity)
      std::memcpy(pooled + r * ld, x + order[r] * D, size_t(D) * sizeof(T));
    else
      pool_image(avx2, x + order[r] * C * H * W, C, H, W, P, bh, bw, pooled + r * ld);
  };

  std::vector<int64_t> gram_off(K + 1, 0);
  double gemm_work = 0.0, eig_work = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = count(k);
    gram_off[k + 1] = gram_off[k] + n * n;
    gemm_work += double(n) * double(n) * double(D);
    if (n < kLapackMinN) eig_work += 60.0 * double(n) * n * n;  // ~ sweeps x (dot + 2 rotations) x n^3 / 2
  }
  std::vector<double> gram(static_cast<size_t>(gram_off[K]));
  const auto gram_item = [&](int64_t k, int64_t i0) {  // phase 2: rows i0.. of class k, lower triangle
    const int64_t n = count(k);
    const int nr = int(std::min<int64_t>(kRowBlock, n - i0));
    const T* const* crow = rows.data() + off[k];
    gram_block<T>(avx2, crow + i0, nr, crow, int(i0 + nr), D, gram.data() + gram_off[k] + i0 * n, int(n));
  };
  const auto class_finite = [&](int64_t k) {  // NaN/Inf images show up on the Gram diagonal
    const int64_t n = count(k);
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(gram[gram_off[k] + i * n + i])) return false;
    return true;
  };
  at::Tensor coef = at::empty({with_grad ? gram_off[K] : 0}, opts);
  T* coef_p = with_grad ? coef.data_ptr<T>() : nullptr;
  std::vector<ClassResult> results(K);

  // dX̂_k = (2 dG_k) X̂_k for blocks of at most kDxRows rows of a class into a per-thread buffer
  // (straight into dx when X̂ is the images in batch order), then back to image order through the
  // pooling backward while the block is still in cache. Each block is one single-threaded GEMM. A class
  // whose gradient keeps r < n/2 terms (loss_and_coef) first gets Y_k = V_rᵀ X̂_k (r x D, one GEMM
  // into its slice of ys), and its blocks are A_k[rows] · Y_k.
  std::vector<std::vector<std::array<int64_t, 2>>> dx_blocks(K);  // per class: (first row, rows)
  std::vector<int64_t> y_off(K + 1, 0);  // per class: room for the largest rank with 3 r <= n
  int64_t max_rows = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = count(k);
    const int64_t blocks = (n + kDxRows - 1) / kDxRows, per = (n + blocks - 1) / blocks;
    for (int64_t i0 = 0; i0 < n; i0 += per) dx_blocks[k].push_back({i0, std::min(per, n - i0)});
    max_rows = std::max(max_rows, per);
    y_off[k + 1] = y_off[k] + (n >= kLowRankMinN ? n / 3 * D : 0);
  }
  at::Tensor y_store = with_grad && y_off[K] > 0 ? cached_empty({y_off[K]}, opts, at::MemoryFormat::Contiguous)
                                                 : at::Tensor();
  T* ys = y_store.defined() ? y_store.data_ptr<T>() : nullptr;
  const bool direct = identity && sorted;
  const bool blas_direct = !portable_only();
  const int64_t slot = (max_rows * D + 15) / 16 * 16;  // 64-byte aligned per-thread slices
  // classes with a truncated gradient and 2 x 2 pooling (float, AVX-512): dX̂ and the pooling backward
  // in one kernel (fused_dx_pool2x2_avx512), over pieces of 32 pooled columns
  const bool fused_shape = std::is_same_v<T, float> && avx2 && cpu_avx512() && H == 2 * P && W == 2 * P &&
                           P % 32 == 0;
  const int64_t pieces = fused_shape ? C * P * (P / 32) : 0;
  const auto fused = [&](int64_t k) { return fused_shape && results[k].rank > 0; };
  const auto dx_fused = [&](int64_t k, int64_t ch0, int64_t ch1) {
#ifdef DDFAST_DENSIFY_X86
    if constexpr (std::is_same_v<T, float>) {
      const int64_t n = count(k);
      const int r = results[k].rank;
      std::vector<float*> imgs(n);
      for (int64_t i = 0; i < n; ++i) imgs[i] = dx + order[off[k] + i] * C * H * W;
      std::vector<float> ybuf(size_t(r) * 32);
      const float* ak = coef_p + gram_off[k];
      fused_dx_pool2x2_avx512(ak, ak + n * r, int(n), r, rows.data() + off[k], imgs.data(), C, P, ch0, ch1,
                              ybuf.data());
    }
#endif
    (void)k, (void)ch0, (void)ch1;
  };
  const auto y_class = [&](int64_t k) {  // Y_k = V_rᵀ X̂_k for a class with a truncated gradient
    const int64_t n = count(k), r = results[k].rank;
    if (r > 0 && !fused(k))
      rows_gemm<T>(blas_direct, coef_p + gram_off[k] + n * r, int(r), int(n), rows[off[k]], ld, D, ys + y_off[k], D);
  };
  const auto dx_block = [&](int64_t k, int64_t i0, int64_t m, T* block) {
    const int64_t n = count(k), r = results[k].rank;
    T* out = direct ? dx + (off[k] + i0) * D : block;
    if (r > 0)
      rows_gemm<T>(blas_direct, coef_p + gram_off[k] + i0 * r, int(m), int(r), ys + y_off[k], D, D, out, D);
    else
      rows_gemm<T>(blas_direct, coef_p + gram_off[k] + i0 * n, int(m), int(n), rows[off[k]], ld, D, out, D);
    if (direct) return;
    for (int64_t r = 0; r < m; ++r) {
      T* dst = dx + order[off[k] + i0 + r] * C * H * W;
      if (identity)
        std::memcpy(dst, out + r * D, size_t(D) * sizeof(T));
      else
        pool_backward_image(avx2, out + r * D, C, H, W, P, bh, bw, dst);
    }
  };
  const auto store_fence = [] {
#ifdef DDFAST_DENSIFY_X86
    _mm_sfence();  // the pooling backward's non-temporal stores are visible before the region ends
#endif
  };
  std::vector<int64_t> by_size(K);  // classes, largest first
  std::iota(by_size.begin(), by_size.end(), int64_t(0));
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) { return count(a) > count(b); });

  const int threads = num_threads();
  const bool large_work = par_pool || gemm_work > kParallelWork;
  if (threads > 1 && K >= 2 * threads && large_work && lapack_direct()) {
    // Class-major schedule: each thread takes whole classes (largest first) through pooling, Gram,
    // eigensolve and dX̂ with no barrier between the phases, so one thread's memory-bound pooling
    // overlaps another's Gram/LAPACK work and a class's rows stay in its core's L2. Every class is
    // computed exactly as in the phase-by-phase schedule below (same kernels, same order inside a
    // class), so results do not depend on the schedule.
    at::Tensor block_store = with_grad && !direct ? cached_empty({threads * slot}, opts, at::MemoryFormat::Contiguous)
                                                  : at::Tensor();
    std::vector<std::string> errors(K);
#pragma omp parallel
    {
      T* block = block_store.defined() ? block_store.data_ptr<T>() + thread_index() * slot : nullptr;
      LapackWork ws;
#pragma omp for schedule(dynamic, 1)
      for (int64_t idx = 0; idx < K; ++idx) {
        const int64_t k = by_size[idx], n = count(k);
        if (gather)
          for (int64_t r = off[k]; r < off[k + 1]; ++r) pool_row(r);
        for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) gram_item(k, i0);
        if (!class_finite(k)) {
          results[k].status = jacobi::kNonFinite;
          continue;
        }
        T* ck = coef_p ? coef_p + gram_off[k] : nullptr;
        try {
          const double* gk = gram.data() + gram_off[k];
          results[k] = n < kLapackMinN ? solve_class_jacobi<T>(avx2, gk, int(n), tau, max_sweeps, ck)
                                       : solve_class_lapack<T>(gk, int(n), tau, ck, &ws);
        } catch (const std::exception& e) {
          errors[k] = e.what();
          continue;
        }
        if (with_grad && results[k].status != jacobi::kNonFinite) {
          if (fused(k)) {
            dx_fused(k, 0, pieces);
            continue;
          }
          y_class(k);
          for (const auto& [i0, m] : dx_blocks[k]) dx_block(k, i0, m, block);
        }
      }
      store_fence();
    }
    lap("classes");
    for (const std::string& e : errors)
      if (!e.empty()) throw std::runtime_error(e);
  } else {
    // Phase by phase, each phase over all classes (parallel when its work is large).
    if (gather) {
#pragma omp parallel for schedule(static) if (par_pool)
      for (int64_t r = 0; r < B; ++r) pool_row(r);
    }
    lap("pool");
    std::vector<std::pair<int64_t, int64_t>> items;  // (class, first row of a block of kRowBlock rows)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i0 = 0; i0 < count(k); i0 += kRowBlock) items.emplace_back(k, i0);
    // largest first: blocks near the bottom of big classes cost the most
    std::stable_sort(items.begin(), items.end(), [&](const auto& a, const auto& b) {
      return a.second + count(a.first) > b.second + count(b.first);
    });
    const int64_t n_items = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) if (gemm_work > kParallelWork)
    for (int64_t it = 0; it < n_items; ++it) gram_item(items[it].first, items[it].second);
    lap("gram");
    for (int64_t k = 0; k < K; ++k)
      if (!class_finite(k)) results[k].status = jacobi::kNonFinite;
    bool finite = true;
    for (const ClassResult& r : results) finite = finite && r.status != jacobi::kNonFinite;
    if (finite) {  // eigensolve + loss + 2 dG per class
      std::vector<int64_t> small, large;  // Jacobi / LAPACK classes, largest first
      for (int64_t k : by_size) (count(k) < kLapackMinN ? small : large).push_back(k);
      if (!large.empty()) solve_classes_lapack<T>(large, layout, gram.data(), gram_off, tau, coef_p, &results);
      const int64_t n_small = int64_t(small.size());
#pragma omp parallel for schedule(dynamic, 1) if (eig_work > kParallelWork)
      for (int64_t idx = 0; idx < n_small; ++idx) {
        const int64_t k = small[idx];
        results[k] = solve_class_jacobi<T>(avx2, gram.data() + gram_off[k], int(count(k)), tau, max_sweeps,
                                           coef_p ? coef_p + gram_off[k] : nullptr);
      }
      lap("eigen");
    }
    if (finite && with_grad) {
      const auto inner = [&](int64_t k) { return results[k].rank > 0 ? int64_t(results[k].rank) : count(k); };
      // (class, first row, rows, 0) or, for a fused class, (class, first piece, end piece, 1): as many
      // piece ranges as the class has row blocks; largest work first
      std::vector<std::array<int64_t, 4>> dx_items;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t parts = int64_t(dx_blocks[k].size());
        for (int64_t b = 0; b < parts; ++b) {
          if (fused(k))
            dx_items.push_back({k, pieces * b / parts, pieces * (b + 1) / parts, 1});
          else
            dx_items.push_back({k, dx_blocks[k][b][0], dx_blocks[k][b][1], 0});
        }
      }
      const auto work = [&](const std::array<int64_t, 4>& it) {
        return it[3] ? 2 * (it[2] - it[1]) * count(it[0]) * inner(it[0]) * 32 : it[2] * inner(it[0]) * D;
      };
      std::stable_sort(dx_items.begin(), dx_items.end(), [&](const auto& a, const auto& b) { return work(a) > work(b); });
      const bool par_dx = dx_items.size() > 1 && large_work;
      at::Tensor block_store =
          direct ? at::Tensor() : cached_empty({(par_dx ? threads : 1) * slot}, opts, at::MemoryFormat::Contiguous);
      const int64_t n_dx = int64_t(dx_items.size());
#pragma omp parallel if (par_dx)
      {
#pragma omp for schedule(dynamic, 1)
        for (int64_t idx = 0; idx < K; ++idx) y_class(by_size[idx]);
        T* block = direct ? nullptr : block_store.data_ptr<T>() + thread_index() * slot;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_dx; ++it) {
          const auto& item = dx_items[it];
          if (item[3])
            dx_fused(item[0], item[1], item[2]);
          else
            dx_block(item[0], item[1], item[2], block);
        }
        store_fence();
      }
      lap("dx+poolbwd");
    }
  }
  double loss = 0.0;
  std::vector<int> status(K);
  for (int64_t k = 0; k < K; ++k) {
    if (results[k].status == jacobi::kNonFinite)
      throw pybind11::value_error(
          "densify_loss: images contain NaN or Inf (or are so large that a Gram matrix overflows)");
    loss += results[k].loss;
    status[k] = results[k].status;
  }
  return {loss, status};
}

template <typename T>
void eigh_batched(const T* src, int64_t m, int64_t n, T* wp, T* vp, int* sp, int max_sweeps, double rel_tol,
                  int lanes) {
  const bool avx2 = use_avx2();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < m; ++b) {
    std::vector<T> work(size_t(n) * n);
    const T* s = src + b * n * n;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) work[i * n + j] = work[j * n + i] = s[i * n + j];
    sp[b] = eigh_one<T>(avx2, lanes, work.data(), int(n), wp + b * n, vp + b * n * n, max_sweeps, T(rel_tol));
  }
}

}  // namespace densify

// images [B, C, H, W] (float32/float64; float16/bfloat16 are computed in float32), labels [B] integer.
// Returns (loss: 0-dim float32 (float64 for float64 images), dimages: d loss / d images (images' dtype,
// contiguous NCHW; an empty tensor when with_grad is false), status: int32 [K] per class (ascending
// labels): Jacobi sweeps used, or -1 when max_sweeps was reached without convergence).
std::tuple<at::Tensor, at::Tensor, at::Tensor> densify_forward(const at::Tensor& images, const at::Tensor& labels,
                                                               double tau, int64_t pool, bool with_grad,
                                                               int64_t max_sweeps) {
  TORCH_CHECK(images.device().is_cpu() && labels.device().is_cpu(), "densify_forward: CPU tensors expected");
  if (images.dim() != 4 || !images.is_floating_point())
    throw pybind11::value_error("densify_forward: images must be a floating [B, C, H, W] tensor");
  if (labels.dim() != 1 || labels.numel() != images.size(0) || labels.is_floating_point())
    throw pybind11::value_error("densify_forward: labels must be an integer tensor of shape [B]");
  if (!(tau > 0.0)) throw pybind11::value_error("densify_forward: tau must be > 0");
  if (pool < 1) throw pybind11::value_error("densify_forward: pool must be >= 1");
  if (max_sweeps < 1) throw pybind11::value_error("densify_forward: max_sweeps must be >= 1");
  if (double(images.size(1)) * double(pool) * double(pool) > double(INT32_MAX - 64))  // BLAS ints are 32-bit
    throw pybind11::value_error("densify_forward: channels x pool x pool must be below 2^31");
  const bool f64 = images.scalar_type() == at::kDouble;
  const at::ScalarType compute = f64 ? at::kDouble : at::kFloat;
  at::Tensor x = images.to(compute).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  densify::Layout layout = densify::make_layout(labels);
  for (int64_t k = 0; k + 1 < int64_t(layout.offsets.size()); ++k)
    if (layout.offsets[k + 1] - layout.offsets[k] > 4096)
      throw pybind11::value_error("densify_forward: a class has more than 4096 images in the batch");
  // every entry is written; page-resident storage from the buffer cache (csrc/buffer_cache.cpp)
  at::Tensor dx = with_grad ? cached_empty(x.sizes(), x.options(), at::MemoryFormat::Contiguous)
                            : at::empty({0}, x.options());
  double loss = 0.0;
  std::vector<int> status;
  if (B > 0 && C > 0 && H > 0 && W > 0) {  // otherwise every Gram matrix is 0 and so is the loss
    if (f64) {
      std::tie(loss, status) = densify::run<double>(x.data_ptr<double>(), B, C, H, W, pool, layout, tau, with_grad,
                                                    int(max_sweeps), with_grad ? dx.data_ptr<double>() : nullptr);
    } else {
      std::tie(loss, status) = densify::run<float>(x.data_ptr<float>(), B, C, H, W, pool, layout, tau, with_grad,
                                                   int(max_sweeps), with_grad ? dx.data_ptr<float>() : nullptr);
    }
  } else {
    if (with_grad) dx.zero_();
    status.assign(layout.classes.size(), 0);
  }
  at::Tensor st = at::empty({int64_t(status.size())}, at::kInt);
  if (!status.empty()) std::memcpy(st.data_ptr<int>(), status.data(), status.size() * sizeof(int));
  if (with_grad && dx.scalar_type() != images.scalar_type()) dx = dx.to(images.scalar_type());
  return {at::scalar_tensor(loss, at::TensorOptions().dtype(compute)), dx, st};
}

// Batched symmetric eigendecomposition with the same Jacobi (csrc/jacobi.h) in the input's precision:
// a [..., n, n] float32/float64 (the lower triangle is used, like torch.linalg.eigh) ->
// (w [..., n] ascending, v [..., n, n] eigenvectors as columns, status int32 [...]: sweeps used,
// -1 not converged, -2 non-finite input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_eigh(const at::Tensor& a, int64_t max_sweeps, double rel_tol,
                                                           int64_t lanes) {
  TORCH_CHECK(a.device().is_cpu(), "jacobi_eigh: CPU tensor expected");
  if (a.dim() < 2 || a.size(-1) != a.size(-2) || !(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble))
    throw pybind11::value_error("jacobi_eigh: expected a float32/float64 tensor of shape [..., n, n]");
  if (max_sweeps < 1) throw pybind11::value_error("jacobi_eigh: max_sweeps must be >= 1");
  if (lanes < 1 || lanes > 1024) throw pybind11::value_error("jacobi_eigh: lanes must be in [1, 1024]");
  const int64_t n = a.size(-1);
  auto batch_shape = a.sizes().vec();
  batch_shape.resize(batch_shape.size() - 2);
  at::Tensor in = a.contiguous().reshape({-1, n, n});
  const int64_t m = in.size(0);
  at::Tensor w = at::empty({m, n}, a.options());
  at::Tensor vt = at::empty({m, n, n}, a.options());
  at::Tensor st = at::empty({m}, at::kInt);
  if (a.scalar_type() == at::kDouble) {
    densify::eigh_batched<double>(in.data_ptr<double>(), m, n, w.data_ptr<double>(), vt.data_ptr<double>(),
                                  st.data_ptr<int>(), int(max_sweeps), rel_tol, int(lanes));
  } else {
    densify::eigh_batched<float>(in.data_ptr<float>(), m, n, w.data_ptr<float>(), vt.data_ptr<float>(),
                                 st.data_ptr<int>(), int(max_sweeps), rel_tol, int(lanes));
  }
  batch_shape.push_back(n);
  at::Tensor w_out = w.reshape(batch_shape);
  batch_shape.push_back(n);
  at::Tensor v_out = vt.transpose(1, 2).contiguous().reshape(batch_shape);
  batch_shape.resize(batch_shape.size() - 2);
  return {w_out, v_out, st.reshape(batch_shape)};
}

}  // namespace ddfast

// Registered from csrc/bindings.cpp (one line there).
void ddfast_register_densify(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("densify_forward", &ddfast::densify_forward, py::arg("images"), py::arg("labels"), py::arg("tau"),
        py::arg("pool"), py::arg("with_grad"), py::arg("max_sweeps") = ddfast::jacobi::kDefaultMaxSweeps,
        "K3 data densification: (loss, dimages, status[K]) for images [B,C,H,W] and labels [B]; "
        "status = Jacobi sweeps per class (ascending labels), -1 = not converged");
  m.def("jacobi_eigh", &ddfast::jacobi_eigh, py::arg("a"), py::arg("max_sweeps") = ddfast::jacobi::kDefaultMaxSweeps,
        py::arg("rel_tol") = 0.0, py::arg("lanes") = 1,
        "Batched parallel-order Jacobi eigh (csrc/jacobi.h): (w ascending, v columns, status) of a [..., n, n]; "
        "lanes > 1 runs the GPU kernel's work split (lanes = threads of a block) one lane after another");
}
