// Batched small symmetric positive semidefinite eigensolver for K3 (G-VBSM data densification):
// one-sided (Hestenes) Jacobi in round-robin parallel order on one n x n matrix, n <= 128 in practice.
//
// This header is the per-matrix algorithm, shared by the C++ CPU build (csrc/densify.cpp: one matrix
// per OpenMP thread) and nvcc (csrc/densify_cuda.cu: one thread block per matrix, the block's threads
// are the "lanes"). No torch headers, raw pointers, no allocation (the caller passes the scratch);
// everything is __host__ __device__ under nvcc.
//
// Algorithm. For symmetric PSD A (a Gram matrix), start from M = A, V = I and apply plane rotations
// to pairs of columns, M <- M J, V <- V J, each J making columns p and q of M orthogonal (Hestenes):
// with alpha = |m_p|^2, beta = |m_q|^2, gamma = m_p . m_q, zeta = (beta - alpha) / (2 gamma),
// t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), c = 1/sqrt(1 + t^2), s = c t (Rutishauser's stable
// formulas, the two-sided Jacobi rotation of M^T M). M = A V throughout; once all columns are
// orthogonal, A V = M = V diag(lambda): V holds the eigenvectors (orthonormal to rounding: a product
// of rotations) and lambda_i is taken as the Rayleigh quotient of the original A. Only rows of the stored
// transposes M^T, V^T are touched: every memory access is contiguous, no column phase, no transposes
// (the two-sided variant needs strided column updates, 3-20x slower on the CPU here).
//
// Parallel order. A sweep visits every pair (p < q) once in the round-robin "circle" ordering: with
// m = n rounded up to even, m - 1 steps of m/2 disjoint pairs (index n of an odd n is a dummy). The
// rotations of one step touch disjoint columns, so they commute and run in parallel, in two phases:
//   1. step_params: per pair, the three dot products and the rotation, or "skip";
//   2. step_rotate: rows p, q of M^T and of V^T <- (c x_p - s x_q, s x_p + c x_q), items (pair, col).
// Inside a phase every work item reads only what it writes itself (and phase 1 reads only M), so a
// barrier between phases is all a parallel version needs. eigh_driver() is written once against an
// execution policy: SerialLanes{1} (CPU), SerialLanes{L} (the GPU work split, lanes run one after
// another: tests run the GPU's code path on the CPU with it) and a CUDA block (densify_cuda.cu). The
// per-element arithmetic is identical in all of them (each dot product is summed by one lane, in one
// fixed order), so the CPU emulation reproduces the GPU kernel's results bit for bit.
//
// Skip test: |gamma| <= rel_tol * sqrt(alpha) * sqrt(beta) (columns orthogonal to working accuracy;
// rel_tol defaults to default_rel_tol(n) = 4 sqrt(n) eps, above the rounding noise of a length-n dot
// product, so converged columns stop rotating), or |gamma| <= abs_tol = n (eps ||A||_F)^2 (both
// columns at rounding-noise level: a numerically null space is not rotated forever). The sweep loop
// ends after the first sweep with no rotation (converged) or after max_sweeps sweeps (reported as not
// converged; the current approximation is still returned). A NaN/Inf entry is reported at once and
// nothing is iterated, so NaN input can never hang.
//
// Accuracy: eigenvalue errors are O(eps ||A||) (like LAPACK's syev), eigenvectors O(eps ||A|| / gap)
// plus the rounding accumulated over the sweeps (~sqrt(sweeps n) eps).
// The input must be symmetric positive semidefinite (one-sided Jacobi orthogonalizes A's columns, so
// for an indefinite A eigenvalues +x and -x could mix); Gram matrices always are.
#ifndef DDFAST_JACOBI_H_
#define DDFAST_JACOBI_H_

#if defined(__CUDACC__)
#define DDFAST_HD __host__ __device__ __forceinline__
#else
#define DDFAST_HD inline
#endif

#include <math.h>

// csrc/densify.cpp includes this header a second time inside an AVX2 target region with
// DDFAST_JACOBI_NS defined to a different namespace name (see there).
#ifndef DDFAST_JACOBI_NS
#define DDFAST_JACOBI_NS jacobi
#endif

namespace ddfast {
namespace DDFAST_JACOBI_NS {

// Status codes returned by the driver (>= 1: converged, the number of sweeps used).
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

// Scratch of eigh_driver for an n x n matrix (shared memory on the GPU).
DDFAST_HD int scratch_ints(int n) { return 2 * num_pairs(n) + n + 4; }
DDFAST_HD int scratch_reals(int n) { return 2 * num_pairs(n) + n + 2; }

template <typename T>
DDFAST_HD T default_rel_tol(int n) {
  return T(4) * sqrt(T(n > 1 ? n : 1)) * Traits<T>::eps;
}

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

// The rotation orthogonalizing two columns with squared norms alpha, beta and inner product gamma
// (equivalently: the two-sided Jacobi rotation annihilating gamma in [[alpha, gamma], [gamma, beta]]).
// Returns false (skip) when gamma is negligible.
template <typename T>
DDFAST_HD bool rotation(T alpha, T beta, T gamma, T rel_tol, T abs_tol, T* c, T* s) {
  const T mag = fabs(gamma);
  if (!(mag > abs_tol) || mag <= rel_tol * sqrt(fabs(alpha)) * sqrt(fabs(beta))) return false;
  const T zeta = (beta - alpha) / (T(2) * gamma);
  T t;
  if (fabs(zeta) > T(1) / Traits<T>::eps) {
    t = T(0.5) / zeta;  // 1 + zeta^2 == zeta^2 here (and zeta^2 might overflow)
  } else {
    t = T(1) / (fabs(zeta) + sqrt(zeta * zeta + T(1)));
    if (zeta < T(0)) t = -t;
  }
  const T cc = T(1) / sqrt(t * t + T(1));
  *c = cc;
  *s = t * cc;
  return true;
}

// x.y over n entries, four interleaved partial sums in a fixed order.
template <typename T>
DDFAST_HD T dot(const T* __restrict__ x, const T* __restrict__ y, int n) {
  T g0 = 0, g1 = 0, g2 = 0, g3 = 0;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    g0 += x[j] * y[j];
    g1 += x[j + 1] * y[j + 1];
    g2 += x[j + 2] * y[j + 2];
    g3 += x[j + 3] * y[j + 3];
  }
  for (; j < n; ++j) g0 += x[j] * y[j];
  return (g0 + g1) + (g2 + g3);
}

// (x.x, y.y, x.y) over n entries in one pass; four interleaved partial sums in a fixed order.
template <typename T>
DDFAST_HD void dot3(const T* __restrict__ x, const T* __restrict__ y, int n, T* xx, T* yy, T* xy) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0, g0 = 0, g1 = 0, g2 = 0, g3 = 0;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const T x0 = x[j], x1 = x[j + 1], x2 = x[j + 2], x3 = x[j + 3];
    const T y0 = y[j], y1 = y[j + 1], y2 = y[j + 2], y3 = y[j + 3];
    a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3;
    b0 += y0 * y0; b1 += y1 * y1; b2 += y2 * y2; b3 += y3 * y3;
    g0 += x0 * y0; g1 += x1 * y1; g2 += x2 * y2; g3 += x3 * y3;
  }
  for (; j < n; ++j) {
    a0 += x[j] * x[j];
    b0 += y[j] * y[j];
    g0 += x[j] * y[j];
  }
  *xx = (a0 + a1) + (a2 + a3);
  *yy = (b0 + b1) + (b2 + b3);
  *xy = (g0 + g1) + (g2 + g3);
}

// Phase 1: for every pair of `step` handled by this lane, p and q (p = -1: skipped) and (c, s) from
// the rows of M^T. Returns the number of rotations this lane found.
template <typename T>
DDFAST_HD int step_params(const T* mt, int ldm, int n, int step, T rel_tol, T abs_tol, int* pp, int* qq, T* cs,
                          int lane, int lanes) {
  const int m = padded_size(n), npairs = m / 2;
  int rotations = 0;
  for (int k = lane; k < npairs; k += lanes) {
    int p, q;
    tournament_pair(step, k, m, &p, &q);
    T c = T(1), s = T(0);
    bool rotate = false;
    if (q < n) {
      T alpha, beta, gamma;
      dot3(mt + p * ldm, mt + q * ldm, n, &alpha, &beta, &gamma);
      rotate = rotation(alpha, beta, gamma, rel_tol, abs_tol, &c, &s);
    }
    pp[k] = rotate ? p : -1;
    qq[k] = q;
    cs[2 * k] = c;
    cs[2 * k + 1] = s;
    rotations += rotate ? 1 : 0;
  }
  return rotations;
}

DDFAST_HD int rotate_items(int n, int npairs) { return npairs * n; }

// Phase 2: rows p, q of x (n columns, leading dim ldx) for the step's rotations. Work items
// (pair, column) are spread over the lanes; lanes == 1 runs contiguous rows (vectorizes on the CPU).
template <typename T>
DDFAST_HD void step_rotate(T* x, int ldx, int n, const int* pp, const int* qq, const T* cs, int npairs, int lane,
                           int lanes) {
  if (lanes == 1) {
    for (int k = 0; k < npairs; ++k) {
      const int p = pp[k];
      if (p < 0) continue;
      const T c = cs[2 * k], s = cs[2 * k + 1];
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
    const T c = cs[2 * k], s = cs[2 * k + 1];
    T* xp = x + p * ldx + j;
    T* xq = x + qq[k] * ldx + j;
    const T u = *xp, v = *xq;
    *xp = c * u - s * v;
    *xq = s * u + c * v;
  }
}

// Frobenius norm (scaled against overflow) of the n x n matrix; NaN/Inf if any entry is not finite.
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

// Execution policy of the CPU (and of the CPU emulation of a GPU block): a phase `f(lane, lanes)`
// runs on every lane, then the lanes are in sync; `add` increments the shared rotation counter.
struct SerialLanes {
  int lanes;
  template <typename F>
  DDFAST_HD void each(F&& f) const {
    for (int l = 0; l < lanes; ++l) f(l, lanes);
  }
  DDFAST_HD void add(int* counter, int v) const { *counter += v; }
};

// One matrix. a: n x n symmetric PSD (leading dim lda; all n^2 entries are read; not modified).
// Outputs: w[n] ascending eigenvalues and vt (leading dim ldv): row i = unit eigenvector of w[i].
// Work: mt (n x n, leading dim ldm: M^T = (A V)^T) and vt_work (like vt); ints/reals:
// scratch_ints(n) / scratch_reals(n) values. All of it is shared by the lanes. rel_tol <= 0 selects
// default_rel_tol(n). Returns (to every lane) the sweeps used (>= 1; the last one rotated nothing;
// 0 for n <= 1), kNotConverged after max_sweeps sweeps (the current iterate is still returned), or
// kNonFinite (nothing computed) when A has a NaN/Inf entry.
// Eigenvalues are the Rayleigh quotients v_i^T A v_i / v_i^T v_i with the original A: their error is
// second order in the eigenvector error, so float32 keeps ~1e-7 relative accuracy even at n = 128
// (M itself has accumulated ~sqrt(sweeps n) eps of rounding by then).
template <typename T, typename Exec>
DDFAST_HD int eigh_driver(const Exec& ex, const T* a, int lda, int n, T* mt, int ldm, T* vt_work, T* w, T* vt,
                          int ldv, int max_sweeps, T rel_tol, int* ints, T* reals) {
  const int npairs = num_pairs(n);
  int* pp = ints;
  int* qq = ints + npairs;
  int* rank = ints + 2 * npairs;
  int* counters = ints + 2 * npairs + n;  // three rotating rotation counters
  T* cs = reals;
  T* lam = reals + 2 * npairs;
  T* norm = reals + 2 * npairs + n;
  if (!(rel_tol > T(0))) rel_tol = default_rel_tol<T>(n);

  ex.each([&](int lane, int lanes) {
    if (lane == 0) {
      norm[0] = frobenius(a, lda, n);
      counters[0] = counters[1] = counters[2] = 0;
    }
    for (int item = lane; item < n * n; item += lanes) {
      const int i = item / n, j = item - i * n;
      vt_work[i * ldv + j] = i == j ? T(1) : T(0);
      mt[i * ldm + j] = a[i * lda + j];
    }
  });
  const T frob = norm[0];
  if (!(frob < T(INFINITY))) return kNonFinite;
  const T abs_tol = T(n) * (Traits<T>::eps * frob) * (Traits<T>::eps * frob);

  int status = n >= 2 ? kNotConverged : 0;
  if (n >= 2) {
    int step_count = 0;
    for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
      int rotations = 0;
      for (int step = 0; step < num_steps(n); ++step, ++step_count) {
        // Three rotating counters: `counter` was zeroed during the previous params phase (or at
        // init); `next` was last read before the previous params phase's barrier.
        int* counter = counters + step_count % 3;
        int* next = counters + (step_count + 1) % 3;
        ex.each([&](int lane, int lanes) {
          const int r = step_params(mt, ldm, n, step, rel_tol, abs_tol, pp, qq, cs, lane, lanes);
          if (r) ex.add(counter, r);
          if (lane == 0) *next = 0;
        });
        const int r = *counter;
        if (r == 0) continue;
        rotations += r;
        ex.each([&](int lane, int lanes) {
          step_rotate(mt, ldm, n, pp, qq, cs, npairs, lane, lanes);
          step_rotate(vt_work, ldv, n, pp, qq, cs, npairs, lane, lanes);
        });
      }
      if (rotations == 0) {
        status = sweep;
        break;
      }
    }
  }
  // lambda_i = v_i^T A v_i / v_i^T v_i, then sort ascending (stable): w[rank[i]], vt[rank[i]] = v_i.
  ex.each([&](int lane, int lanes) {
    for (int i = lane; i < n; i += lanes) {
      const T* v = vt_work + i * ldv;
      T num = T(0);
      for (int j = 0; j < n; ++j) num += v[j] * dot(a + j * lda, v, n);
      lam[i] = num / dot(v, v, n);
    }
  });
  ex.each([&](int lane, int lanes) {
    for (int i = lane; i < n; i += lanes) {
      int r = 0;
      const T li = lam[i];
      for (int j = 0; j < n; ++j) r += (lam[j] < li || (lam[j] == li && j < i)) ? 1 : 0;
      rank[i] = r;
      w[r] = li;
    }
  });
  ex.each([&](int lane, int lanes) {
    for (int item = lane; item < n * n; item += lanes) {
      const int i = item / n, j = item - i * n;
      vt[rank[i] * ldv + j] = vt_work[i * ldv + j];
    }
  });
  return status;
}

// K3 per-class loss and eigenvalue gradient: KL(sg(softmax(w/tau)) || softmax(w)) over w[0..n) and
// dlam = softmax(w) - softmax(w/tau) (when dlam != nullptr). n == 1 gives exactly 0.
template <typename T>
DDFAST_HD T softmax_kl(const T* w, int n, T tau, T* dlam) {
  T m = w[0];
  for (int i = 1; i < n; ++i) m = w[i] > m ? w[i] : m;
  T s1 = T(0), s2 = T(0);
  for (int i = 0; i < n; ++i) {
    s1 += exp(w[i] - m);
    s2 += exp((w[i] - m) / tau);
  }
  const T l1 = log(s1), l2 = log(s2);
  T kl = T(0);
  for (int i = 0; i < n; ++i) {
    const T log_q = (w[i] - m) - l1, log_p = (w[i] - m) / tau - l2;
    const T p = exp(log_p);
    kl += p * (log_p - log_q);
    if (dlam) dlam[i] = exp(log_q) - p;
  }
  return kl;
}

}  // namespace DDFAST_JACOBI_NS
}  // namespace ddfast

#endif  // DDFAST_JACOBI_H_
