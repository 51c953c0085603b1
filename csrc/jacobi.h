// Batched small symmetric eigensolver for K3 (G-VBSM data densification): parallel-order
// (round-robin) two-sided Jacobi on one n x n symmetric matrix, n <= 128 in practice.
//
// This header is the algorithm, shared by the C++ CPU build (csrc/densify.cpp, one matrix per
// OpenMP thread, lanes = 1) and nvcc (csrc/densify_cuda.cu, one thread block per matrix, the block's
// threads are the lanes). No torch headers, raw pointers, no allocation: the caller provides the
// scratch. Everything below is __host__ __device__ under nvcc.
//
// Algorithm. A sweep visits every pair (p < q) once in the round-robin "circle" ordering: with
// m = n rounded up to even, m - 1 steps of m/2 disjoint pairs (index n of an odd n is a dummy that
// never rotates). The pairs of one step are disjoint, so their rotations commute and are applied
// together: A <- J^T A J with J the product of the step's Givens rotations, in four phases that are
// each data-parallel over the lanes:
//   1. step_params:  per pair, the rotation (c, s, t) annihilating a_pq (Rutishauser's stable
//                    formulas), or "skip" when a_pq is negligible (see below);
//   2. step_rows:    rows p, q    <- (c row_p - s row_q, s row_p + c row_q)   (every column);
//   3. step_cols:    columns p, q <- the same combination                     (every row);
//   4. step_fixup:   the 2x2 block of each pair set exactly: a_pp - t a_pq, a_qq + t a_pq, 0, 0;
//      step_vectors: rows p, q of V^T (eigenvectors stored as rows) rotated like phase 2.
// Phases 2-4 only read what the same phase writes for the same pair/row, so a barrier between the
// phases is all a parallel implementation needs.
//
// Skip test (relative + absolute): |a_pq| <= rel_tol * sqrt|a_pp| * sqrt|a_qq|  or  |a_pq| <= abs_tol,
// rel_tol = machine epsilon by default (the classical criterion, which gives high relative accuracy
// for well-conditioned positive definite matrices), abs_tol = epsilon^2 * ||A||_F (entries that small
// cannot change any eigenvalue beyond ~eps^2 ||A||; it stops rank-deficient blocks from rotating noise
// into denormals). The sweep loop ends after the first sweep that rotates nothing (converged) or after
// max_sweeps sweeps (not converged: reported, the current approximation is still returned). A matrix
// with a NaN/Inf entry is reported at once and never iterated, so NaN input cannot hang.
#pragma once

#if defined(__CUDACC__)
#define DDFAST_HD __host__ __device__ __forceinline__
#else
#define DDFAST_HD inline
#endif

#include <math.h>

namespace ddfast {
namespace jacobi {

// Status codes returned by the drivers (>= 1: converged after that many sweeps).
constexpr int kNotConverged = -1;
constexpr int kNonFinite = -2;
constexpr int kDefaultMaxSweeps = 40;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr float eps = 1.1920928955078125e-07f;
};
template <>
struct Traits<double> {
  static constexpr double eps = 2.220446049250313e-16;
};

DDFAST_HD int padded_size(int n) { return n + (n & 1); }
DDFAST_HD int num_pairs(int n) { return padded_size(n) / 2; }
DDFAST_HD int num_steps(int n) { return n < 2 ? 0 : padded_size(n) - 1; }
// Scratch the serial driver needs for an n x n matrix.
DDFAST_HD int scratch_ints(int n) { return 2 * num_pairs(n) + 2; }
DDFAST_HD int scratch_reals(int n) { return 6 * num_pairs(n) + n + 2; }

// Pair `slot` (0 <= slot < m/2) of round-robin step `step` (0 <= step < m - 1), m even: player m - 1
// sits still and meets `step`; the others meet (step + k, step - k) mod (m - 1). Over the m - 1
// steps every unordered pair appears exactly once. Returns p < q.
DDFAST_HD void tournament_pair(int step, int slot, int m, int* p, int* q) {
  int a, b;
  if (slot == 0) {
    a = m - 1;
    b = step;
  } else {
    a = (step + slot) % (m - 1);
    b = (step - slot + (m - 1)) % (m - 1);
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Rotation annihilating a_pq: returns false (skip) when a_pq is negligible. t = tan(angle) with
// a_pp' = a_pp - t a_pq and a_qq' = a_qq + t a_pq.
template <typename T>
DDFAST_HD bool rotation(T app, T aqq, T apq, T rel_tol, T abs_tol, T* c, T* s, T* t) {
  const T mag = fabs(apq);
  if (!(mag > abs_tol) || mag <= rel_tol * sqrt(fabs(app)) * sqrt(fabs(aqq))) return false;
  const T theta = (aqq - app) / (T(2) * apq);
  T tt;
  if (fabs(theta) > T(1) / Traits<T>::eps) {
    tt = T(0.5) / theta;  // theta^2 + 1 == theta^2 here (and theta^2 might overflow)
  } else {
    tt = T(1) / (fabs(theta) + sqrt(theta * theta + T(1)));
    if (theta < T(0)) tt = -tt;
  }
  const T cc = T(1) / sqrt(tt * tt + T(1));
  *c = cc;
  *s = tt * cc;
  *t = tt;
  return true;
}

// Phase 1. For every pair of `step` handled by this lane: p, q (or p = -1 when skipped) and (c, s, t).
// Returns the number of rotations this lane will apply.
template <typename T>
DDFAST_HD int step_params(const T* a, int lda, int n, int step, T rel_tol, T abs_tol, int* pp, int* qq, T* cst,
                          int lane, int lanes) {
  const int m = padded_size(n), npairs = m / 2;
  int rotations = 0;
  for (int k = lane; k < npairs; k += lanes) {
    int p, q;
    tournament_pair(step, k, m, &p, &q);
    T c = T(1), s = T(0), t = T(0);
    bool rotate = q < n && rotation(a[p * lda + p], a[q * lda + q], a[p * lda + q], rel_tol, abs_tol, &c, &s, &t);
    pp[k] = rotate ? p : -1;
    qq[k] = q;
    cst[3 * k] = c;
    cst[3 * k + 1] = s;
    cst[3 * k + 2] = t;
    rotations += rotate ? 1 : 0;
  }
  return rotations;
}

// Phase 2 (also used for the eigenvectors): rows p, q of the n-column matrix x (leading dim ldx).
// Work items (pair, column) are spread over the lanes.
template <typename T>
DDFAST_HD void step_rows(T* x, int ldx, int n, const int* pp, const int* qq, const T* cst, int npairs, int lane,
                         int lanes) {
  if (lanes == 1) {  // serial path: contiguous inner loop (vectorizes on the CPU)
    for (int k = 0; k < npairs; ++k) {
      const int p = pp[k];
      if (p < 0) continue;
      const T c = cst[3 * k], s = cst[3 * k + 1];
      T* __restrict__ xp = x + p * ldx;
      T* __restrict__ xq = x + qq[k] * ldx;
      for (int j = 0; j < n; ++j) {
        const T u = xp[j], v = xq[j];
        xp[j] = c * u - s * v;
        xq[j] = s * u + c * v;
      }
    }
    return;
  }
  for (int item = lane; item < npairs * n; item += lanes) {
    const int k = item / n, j = item - k * n;
    const int p = pp[k];
    if (p < 0) continue;
    const T c = cst[3 * k], s = cst[3 * k + 1];
    T* xp = x + p * ldx + j;
    T* xq = x + qq[k] * ldx + j;
    const T u = *xp, v = *xq;
    *xp = c * u - s * v;
    *xq = s * u + c * v;
  }
}

// Phase 3: columns p, q of every row. Work items (row, pair).
template <typename T>
DDFAST_HD void step_cols(T* a, int lda, int n, const int* pp, const int* qq, const T* cst, int npairs, int lane,
                         int lanes) {
  if (lanes == 1) {
    for (int i = 0; i < n; ++i) {
      T* row = a + i * lda;
      for (int k = 0; k < npairs; ++k) {
        const int p = pp[k];
        if (p < 0) continue;
        const T c = cst[3 * k], s = cst[3 * k + 1];
        const int q = qq[k];
        const T u = row[p], v = row[q];
        row[p] = c * u - s * v;
        row[q] = s * u + c * v;
      }
    }
    return;
  }
  for (int item = lane; item < n * npairs; item += lanes) {
    const int i = item / npairs, k = item - i * npairs;
    const int p = pp[k];
    if (p < 0) continue;
    const T c = cst[3 * k], s = cst[3 * k + 1];
    T* row = a + i * lda;
    const int q = qq[k];
    const T u = row[p], v = row[q];
    row[p] = c * u - s * v;
    row[q] = s * u + c * v;
  }
}

// Phase 4: the pair's own 2x2 block, from the values saved before the step (app, aqq, apq live in
// `saved`, three per pair, written by step_save).
template <typename T>
DDFAST_HD void step_save(const T* a, int lda, const int* pp, const int* qq, T* saved, int npairs, int lane, int lanes) {
  for (int k = lane; k < npairs; k += lanes) {
    const int p = pp[k];
    if (p < 0) continue;
    const int q = qq[k];
    saved[3 * k] = a[p * lda + p];
    saved[3 * k + 1] = a[q * lda + q];
    saved[3 * k + 2] = a[p * lda + q];
  }
}

template <typename T>
DDFAST_HD void step_fixup(T* a, int lda, const int* pp, const int* qq, const T* cst, const T* saved, int npairs,
                          int lane, int lanes) {
  for (int k = lane; k < npairs; k += lanes) {
    const int p = pp[k];
    if (p < 0) continue;
    const int q = qq[k];
    const T t = cst[3 * k + 2], apq = saved[3 * k + 2];
    a[p * lda + p] = saved[3 * k] - t * apq;
    a[q * lda + q] = saved[3 * k + 1] + t * apq;
    a[p * lda + q] = T(0);
    a[q * lda + p] = T(0);
  }
}

// Frobenius norm (scaled to avoid overflow) of the n x n matrix; NaN/Inf if any entry is not finite.
template <typename T>
DDFAST_HD T frobenius(const T* a, int lda, int n) {
  T scale = T(0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const T v = fabs(a[i * lda + j]);
      if (!(v <= scale)) scale = v;  // NaN sticks: NaN <= x is false
    }
  if (!(scale < T(INFINITY))) return scale;  // NaN or Inf
  if (scale == T(0)) return T(0);
  T sum = T(0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const T v = a[i * lda + j] / scale;
      sum += v * v;
    }
  return scale * sqrt(sum);
}

template <typename T>
DDFAST_HD T default_abs_tol(T frob) {
  return Traits<T>::eps * Traits<T>::eps * frob;
}

// Eigenvalues ascending (stable: ties keep their index order); the rank of entry i. Serial here;
// the CUDA kernel gives each lane one i.
template <typename T>
DDFAST_HD int ascending_rank(const T* w, int n, int i) {
  int r = 0;
  const T wi = w[i];
  for (int j = 0; j < n; ++j) r += (w[j] < wi || (w[j] == wi && j < i)) ? 1 : 0;
  return r;
}

// Serial driver (one matrix, one thread): a (n x n, leading dim lda, symmetric; overwritten) ->
// w[n] ascending eigenvalues and vt (n x n, leading dim ldv): row i is the unit eigenvector of w[i].
// Scratch: pairs (scratch_ints(n) ints), reals (scratch_reals(n) values).
// Returns the sweeps used (>= 1, the last one found nothing to rotate; 0 for n <= 1),
// kNotConverged after max_sweeps sweeps, kNonFinite (nothing computed) for a NaN/Inf entry.
template <typename T>
int eigh_serial(T* a, int lda, int n, T* vt, int ldv, T* w, int max_sweeps, T rel_tol, int* pairs, T* reals) {
  const int npairs = num_pairs(n);
  int* pp = pairs;
  int* qq = pairs + npairs;
  T* cst = reals;
  T* saved = reals + 3 * npairs;
  T* wtmp = reals + 6 * npairs;
  const T frob = frobenius(a, lda, n);
  if (!(frob < T(INFINITY))) return kNonFinite;
  const T abs_tol = default_abs_tol(frob);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) vt[i * ldv + j] = i == j ? T(1) : T(0);
  int status = 0;
  if (n >= 2) {
    status = kNotConverged;
    for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
      int rotations = 0;
      for (int step = 0; step < num_steps(n); ++step) {
        const int r = step_params(a, lda, n, step, rel_tol, abs_tol, pp, qq, cst, 0, 1);
        if (r == 0) continue;
        rotations += r;
        step_save(a, lda, pp, qq, saved, npairs, 0, 1);
        step_rows(a, lda, n, pp, qq, cst, npairs, 0, 1);
        step_cols(a, lda, n, pp, qq, cst, npairs, 0, 1);
        step_fixup(a, lda, pp, qq, cst, saved, npairs, 0, 1);
        step_rows(vt, ldv, n, pp, qq, cst, npairs, 0, 1);
      }
      if (rotations == 0) {
        status = sweep;
        break;
      }
    }
  }
  // Sort ascending: cycle-free permutation via ranks (w and the rows of vt).
  for (int i = 0; i < n; ++i) wtmp[i] = a[i * lda + i];
  int* rank = pairs;  // reuse: needs n ints; pairs holds 2 * npairs >= n
  for (int i = 0; i < n; ++i) rank[i] = ascending_rank(wtmp, n, i);
  for (int i = 0; i < n; ++i) w[rank[i]] = wtmp[i];
  // Apply the permutation to the rows of vt by following cycles.
  for (int i = 0; i < n; ++i) {
    while (rank[i] != i) {
      const int j = rank[i];
      for (int c = 0; c < n; ++c) {
        const T tmp = vt[i * ldv + c];
        vt[i * ldv + c] = vt[j * ldv + c];
        vt[j * ldv + c] = tmp;
      }
      rank[i] = rank[j];
      rank[j] = j;
    }
  }
  return status;
}

}  // namespace jacobi
}  // namespace ddfast
