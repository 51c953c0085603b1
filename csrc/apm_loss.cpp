// Kernel K4, CPU backend (OpenMP): APM's image-update loss head and its closed-form gradient in one
// pass (specs/apm.md §3; the math and the oracle are in ddfast/reference/apm_loss.py).
//
//   z [K+1, n, C]: z[0] = teacher logits T, z[1:] = K student checkpoints S_k
//   r_kic = S_kic − T_ic,  d_ki = Σ_c |r_kic|,  CE_i = logsumexp_c T_ic − T_{i,y_i}
//   loss  = inv_batch · Σ_i [Σ_k φ(d_ki) + α·CE_i]       φ(d) = −d/C  or  −log(d + ε)   (log)
//   dS_kic = inv_batch · g_ki · sgn(r_kic)                g = φ'(d) = −1/C  or  −1/(d + ε)
//   dT_ic  = inv_batch · [−Σ_k g_ki·sgn(r_kic) + α·(softmax(T_i)_c − 1[c = y_i])]
//
// One pass over the samples: per sample the teacher row is read once (converted into per-thread
// scratch in the compute type, any strides and dtype), its softmax formed with a stable logsumexp
// (max subtraction), then every checkpoint row is read once: r = S − T is kept in scratch, d reduced,
// and (with_grad) dS written and g·sgn(r) accumulated for dT, which is written last. Element math is
// in float (double for float64 z); the row sums (d, Σ exp) leave their float vector lanes for double
// every 128 elements, and the per-sample losses are summed in double. exp in float is a branch-free
// Cephes polynomial (< 1.5 ulp) that the compiler vectorises (GCC 12 vectorises neither glibc's expf
// nor std::floor). dz comes from the page-resident buffer cache (csrc/buffer_cache.cpp).
//
// ISA: the per-sample code is compiled for the baseline (x86-64-v2) and again with AVX2 + FMA, picked
// at run time (DDFAST_APM_LOSS_ISA=base forces the baseline copy). Measured on one core (EPYC, fp32,
// K = 5): C = 1000, n = 256: baseline 0.64 / 1.72 ms, AVX2 0.34 / 0.71 ms (without / with dz);
// C = 10, n = 1000: 0.08 / 0.11 ms either way (short rows: per-row overheads dominate).
//
// Determinism: samples are cut into blocks whose size depends on (K, C) only; OpenMP hands out whole
// blocks, each block sums its samples' losses in order into its own double partial, and the
// partials are summed in block order, so the loss and dz are bitwise identical for any thread count.
// Every sample's dz rows and loss term are computed by the same code whatever its position, so the
// dz of a segment of the batch equals the whole batch's rows bit for bit.
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

// Everything a sample's computation calls is force-inlined into the per-block loop, which is
// compiled twice: for the build's baseline ISA and with AVX2 + FMA (block_avx2, picked at run time).
#define DDFAST_APM_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDFAST_APM_X86 1
#endif

namespace ddfast {
namespace apm {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Samples per block: about kBlockElems elements of z (all K+1 rows of a sample), at least one sample.
constexpr int64_t kBlockElems = 8192;
// Below this many elements of z the whole call runs on the calling thread (a fork/join costs more).
constexpr int64_t kParallelElems = 32768;

// exp(x) for x <= 0 in float (Cephes expf: exp(x) = 2^n · p(x − n ln2), < 1.5 ulp), written so that
// GCC vectorises a loop of calls: no float compares (under -ftrapping-math they stop if-conversion),
// the clamp below ln(FLT_MIN) is done on the bit pattern, n is rounded by the 1.5·2^23 trick. x below
// the clamp (and −inf) gives 0 (torch gives a subnormal there), NaN stays NaN.
DDFAST_APM_INLINE float exp_nonpos(float x) {
  constexpr float kMin = -87.33654f, kLog2e = 1.44269504088896341f;
  constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  constexpr int32_t kMinBits = __builtin_bit_cast(int32_t, kMin), kMinMag = kMinBits & 0x7fffffff;
  const int32_t xb = __builtin_bit_cast(int32_t, x), ax = xb & 0x7fffffff;
  const int32_t small = -int32_t((ax > kMinMag) & (ax <= 0x7f800000));  // all ones: x < kMin (NaN not)
  const float xc = __builtin_bit_cast(float, (xb & ~small) | (kMinBits & small));
  const float fx = (xc * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = xc - fx * kC1 - fx * kC2;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float e = p * __builtin_bit_cast(float, (int32_t(fx) + 127) << 23);
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, e) & ~small);
}
DDFAST_APM_INLINE double exp_nonpos(double x) { return std::exp(x); }

struct Params {
  int64_t K = 0, n = 0, C = 0;
  int64_t s0 = 0, s1 = 0, s2 = 0;  // z's strides (elements)
  double inv_batch = 1.0, alpha = 0.0, eps = 0.0;
  bool log = false, with_grad = false;
};

// 16-byte GCC vectors (one xmm register on the x86-64-v2 baseline), for the row sums.
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(16)));
  typedef int32_t itype __attribute__((vector_size(16)));
  static constexpr int L = 4;
  static constexpr int32_t kAbsMask = 0x7fffffff;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(16)));
  typedef int64_t itype __attribute__((vector_size(16)));
  static constexpr int L = 2;
  static constexpr int64_t kAbsMask = 0x7fffffffffffffff;
};

// Σ_c v[c] (Abs: Σ_c |v[c]|) of a row of the compute type: kAcc vector accumulators in A over chunks
// of kChunk elements, each chunk's total added in double (a single scalar chain, which is what the
// compiler makes of a reduction into double, is latency-bound: ~4x slower). The order of the
// additions depends on C only, so the same row always gives the same bits.
constexpr int kAcc = 4;
constexpr int64_t kChunk = 128;

template <bool Abs, typename A>
DDFAST_APM_INLINE double row_sum(const A* __restrict v, int64_t C) {
  typedef typename Vec<A>::type V;
  typedef typename Vec<A>::itype I;
  constexpr int L = Vec<A>::L, W = kAcc * Vec<A>::L;
  const I mask = I{} + Vec<A>::kAbsMask;
  const int64_t body = C - C % W;
  double total = 0.0;
  int64_t c = 0;
  while (c < body) {
    const int64_t e = std::min(body, c + kChunk);
    V acc[kAcc] = {};
    for (; c < e; c += W) {
      for (int j = 0; j < kAcc; ++j) {
        V x;
        std::memcpy(&x, v + c + j * L, sizeof(V));
        if (Abs) x = (V)((I)x & mask);
        acc[j] += x;
      }
    }
    const V a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    A h = a[0];
    for (int l = 1; l < L; ++l) h += a[l];
    total += double(h);
  }
  for (; c < C; ++c) total += double(Abs ? std::abs(v[c]) : v[c]);
  return total;
}

// max_c v[c] (C >= 1; NaN entries are skipped unless v[0] is NaN), vectorised like row_sum
template <typename A>
DDFAST_APM_INLINE A row_max(const A* __restrict v, int64_t C) {
  typedef typename Vec<A>::type V;
  constexpr int L = Vec<A>::L;
  A m = v[0];
  int64_t c = 0;
  if (C >= 2 * L) {
    V m0 = V{} + m, m1 = m0;
    for (; c + 2 * L <= C; c += 2 * L) {
      V x0, x1;
      std::memcpy(&x0, v + c, sizeof(V));
      std::memcpy(&x1, v + c + L, sizeof(V));
      m0 = x0 > m0 ? x0 : m0;
      m1 = x1 > m1 ? x1 : m1;
    }
    m0 = m1 > m0 ? m1 : m0;
    for (int l = 0; l < L; ++l) m = m0[l] > m ? m0[l] : m;
  }
  for (; c < C; ++c) m = v[c] > m ? v[c] : m;
  return m;
}

// row[c · stride] -> buf[c] (minus sub[c] when given), in the compute type A
template <typename T, typename A>
DDFAST_APM_INLINE void load_row(const T* row, int64_t stride, int64_t C, const A* sub, A* buf) {
  if (stride == 1) {
    if (sub) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(row[c]) - sub[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(row[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(row[c * stride]) - (sub ? sub[c] : A(0));
  }
}

// One sample: returns Σ_k φ(d_ki) + α·CE_i (without the 1/B) and writes its K+1 dz rows.
// scratch: 4·C entries of A (teacher row, exp row, r row, Σ g·sgn row).
template <typename T, typename A>
DDFAST_APM_INLINE double sample(const T* z, const Params& p, int64_t i, int64_t y, A* scratch, T* dz) {
  const int64_t C = p.C;
  A* tb = scratch;
  A* eb = scratch + C;
  A* rb = scratch + 2 * C;
  A* gs = scratch + 3 * C;
  load_row<T, A>(z + i * p.s1, p.s2, C, nullptr, tb);

  // stable logsumexp of the teacher row
  const A m = row_max(tb, C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) eb[c] = exp_nonpos(A(tb[c] - m));
  const double esum = row_sum<false>(eb, C);
  const double ce = double(m) + std::log(esum) - double(tb[y]);
  double row_loss = p.alpha * ce;
  if (p.with_grad) std::fill(gs, gs + C, A(0));

  for (int64_t k = 1; k <= p.K; ++k) {
    load_row<T, A>(z + k * p.s0 + i * p.s1, p.s2, C, tb, rb);
    const double d = row_sum<true>(rb, C);
    double g;
    if (p.log) {
      row_loss -= std::log(d + p.eps);
      g = -1.0 / (d + p.eps);
    } else {
      row_loss -= d / double(C);
      g = -1.0 / double(C);
    }
    if (p.with_grad) {
      const A ga = A(g), gb = A(g * p.inv_batch);
      T* out = dz + (k * p.n + i) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A sg = A(int(rb[c] > A(0)) - int(rb[c] < A(0)));
        out[c] = static_cast<T>(gb * sg);
        gs[c] += ga * sg;
      }
    }
  }

  if (p.with_grad) {
    const A inv_s = A(1.0 / esum), alpha = A(p.alpha), ib = A(p.inv_batch);
    T* out = dz + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(ib * (alpha * (eb[c] * inv_s) - gs[c]));
    out[y] = static_cast<T>(ib * (alpha * (eb[y] * inv_s - A(1)) - gs[y]));
  }
  return row_loss;
}

// Samples [i0, i1) in order: Σ of their losses (without the 1/B).
template <typename T>
double block_base(const T* z, const Params& p, const int64_t* labels, int64_t i0, int64_t i1, acc_t<T>* scratch,
                  T* dz) {
  double acc = 0.0;
  for (int64_t i = i0; i < i1; ++i) acc += sample<T, acc_t<T>>(z, p, i, labels[i], scratch, dz);
  return acc;
}

#ifdef DDFAST_APM_X86
template <typename T>
__attribute__((target("avx2,fma"))) double block_avx2(const T* z, const Params& p, const int64_t* labels, int64_t i0,
                                                      int64_t i1, acc_t<T>* scratch, T* dz) {
  double acc = 0.0;
  for (int64_t i = i0; i < i1; ++i) acc += sample<T, acc_t<T>>(z, p, i, labels[i], scratch, dz);
  return acc;
}
#endif

// The AVX2 copy when the CPU has AVX2 and FMA, unless DDFAST_APM_LOSS_ISA=base (read on every call;
// the tests use it to check the baseline copy).
inline bool use_avx2() {
#ifdef DDFAST_APM_X86
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("DDFAST_APM_LOSS_ISA");
  return cpu && !(env != nullptr && std::strcmp(env, "base") == 0);
#else
  return false;
#endif
}

template <typename T>
double block(bool avx2, const T* z, const Params& p, const int64_t* labels, int64_t i0, int64_t i1,
             acc_t<T>* scratch, T* dz) {
#ifdef DDFAST_APM_X86
  if (avx2) return block_avx2<T>(z, p, labels, i0, i1, scratch, dz);
#endif
  (void)avx2;
  return block_base<T>(z, p, labels, i0, i1, scratch, dz);
}

template <typename T>
double run(const T* z, const Params& p, const int64_t* labels, T* dz) {
  using A = acc_t<T>;
  const int64_t per_sample = (p.K + 1) * std::max<int64_t>(p.C, 1);
  const int64_t bs = std::max<int64_t>(1, kBlockElems / per_sample);
  const int64_t nb = (p.n + bs - 1) / bs;
  std::vector<double> partial(size_t(nb), 0.0);
  const bool par = nb > 1 && p.n * per_sample >= kParallelElems && num_threads() > 1;
  const bool avx2 = use_avx2();
#pragma omp parallel if (par)
  {
    std::vector<A> scratch(size_t(4 * p.C));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * bs, i1 = std::min(p.n, i0 + bs);
      partial[size_t(b)] = block<T>(avx2, z, p, labels, i0, i1, scratch.data(), dz);
    }
  }
  double total = 0.0;
  for (double v : partial) total += v;
  return total * p.inv_batch;
}

}  // namespace apm

std::tuple<at::Tensor, at::Tensor> apm_loss_forward(const at::Tensor& z, const at::Tensor& labels, double inv_batch,
                                                    double alpha, bool log, double eps, bool with_grad) {
  namespace py = pybind11;
  if (!z.defined() || !labels.defined()) throw py::value_error("apm_loss_forward: undefined tensor");
  if (!z.device().is_cpu() || !labels.device().is_cpu())
    throw py::value_error("apm_loss_forward: z and labels must be CPU tensors");
  const auto st = z.scalar_type();
  if (!(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16))
    throw py::value_error("apm_loss_forward: z must be float32, float64, float16 or bfloat16, got " +
                          std::string(c10::toString(st)));
  if (z.dim() != 3)
    throw py::value_error("apm_loss_forward: z must be 3-D [K+1, n, C], got " + std::to_string(z.dim()) + " dims");
  const int64_t K = z.size(0) - 1, n = z.size(1), C = z.size(2);
  if (K < 1)
    throw py::value_error("apm_loss_forward: needs the teacher and at least one checkpoint (K+1 >= 2), got " +
                          std::to_string(K + 1));
  if (labels.dim() != 1 || labels.size(0) != n ||
      !(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt))
    throw py::value_error("apm_loss_forward: labels must be an int64/int32 vector of length n = " +
                          std::to_string(n));
  if (!(inv_batch > 0.0) || !std::isfinite(inv_batch))
    throw py::value_error("apm_loss_forward: inv_batch must be finite and > 0");
  if (!(alpha >= 0.0) || !(eps >= 0.0)) throw py::value_error("apm_loss_forward: alpha and eps must be >= 0");

  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (y[i] < 0 || y[i] >= C)
      throw py::value_error("apm_loss_forward: labels must lie in [0, " + std::to_string(C) + "), got " +
                            std::to_string(y[i]) + " at " + std::to_string(i));

  const at::ScalarType compute = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dz = with_grad ? cached_empty(z.sizes(), z.options(), at::MemoryFormat::Contiguous) : z.new_empty({0});
  double loss = 0.0;
  if (n > 0) {
    apm::Params p;
    p.K = K, p.n = n, p.C = C;
    p.s0 = z.stride(0), p.s1 = z.stride(1), p.s2 = z.stride(2);
    p.inv_batch = inv_batch, p.alpha = alpha, p.eps = eps, p.log = log, p.with_grad = with_grad;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "apm_loss_forward", [&] {
      loss = apm::run<scalar_t>(z.data_ptr<scalar_t>(), p, y, with_grad ? dz.data_ptr<scalar_t>() : nullptr);
    });
  }
  return {at::scalar_tensor(loss, at::TensorOptions().dtype(compute)), dz};
}

}  // namespace ddfast

// Registered from csrc/bindings.cpp (one line there).
void ddfast_register_apm_loss(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("apm_loss_forward", &ddfast::apm_loss_forward, py::arg("z"), py::arg("labels"), py::arg("inv_batch"),
        py::arg("alpha"), py::arg("log"), py::arg("eps"), py::arg("with_grad"),
        "K4 APM loss head: (loss 0-dim float32 (float64 for float64 z), dz contiguous in z's dtype or empty "
        "without with_grad) for z [K+1, n, C] (z[0] teacher, z[1:] checkpoints) and labels [n]");
}
