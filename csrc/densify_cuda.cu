// Kernel K3, CUDA eigensolver for the Triton path (DESIGN §3 "CUDA C++ where Triton is a poor fit").
//
// A batched small symmetric PSD eigensolver is a poor fit for Triton (data-dependent sweep counts,
// n/2 independent 2x2 rotations per step, many barriers) and torch.linalg.eigh on many small
// matrices is slow on the GPU (pytorch#69528), so the eigensolve of K3 has a CUDA C++ kernel: one
// thread block per class Gram matrix, the per-matrix algorithm shared with the CPU build through
// csrc/jacobi.h (one-sided parallel-order Jacobi; the block's threads are its "lanes", a phase ends
// with __syncthreads()). Ragged classes are exact: matrix b is the leading sizes[b] x sizes[b] block
// of its ld x ld slot, nothing is padded into its spectrum.
//
// No torch headers, raw pointers only, so nvcc compile-checks this file on machines whose torch is
// CPU-only (tests/test_densify.py builds it for sm_80 and sm_90a). It is not linked into ddfast._C
// by the CPU build; a CUDA build binds ddfast_densify_eigh_f64 (and the class-gradient kernel) as
// ddfast._C.densify_eigh_cuda, which kernels/densify.py uses when present (else torch.linalg.eigh).
#include <cuda_runtime.h>

#include "jacobi.h"

namespace ddfast {
namespace densify_cuda {

constexpr int kThreads = 256;

// Execution policy of jacobi::eigh_driver on a thread block.
struct BlockLanes {
  template <typename F>
  __host__ __device__ void each(F&& f) const {
#ifdef __CUDA_ARCH__
    f(int(threadIdx.x), int(blockDim.x));
    __syncthreads();
#else
    (void)f;  // host instantiation is never called
#endif
  }
  __host__ __device__ void add(int* counter, int v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(counter, v);
#else
    *counter += v;
#endif
  }
};

template <typename T>
__host__ __device__ size_t shared_bytes(int ld) {
  return size_t(jacobi::scratch_reals(ld)) * sizeof(T) + size_t(jacobi::scratch_ints(ld)) * sizeof(int);
}

// Block b: A_b = a[b] (leading sizes[b] x sizes[b] block of an ld x ld slot) -> w[b][0..n) ascending,
// vt[b] rows = eigenvectors; mt / vt_work: per-matrix scratch slots; status[b]: sweeps used, -1 not
// converged, -2 non-finite.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) eigh_kernel(const T* __restrict__ a, T* mt, T* vt_work, T* w, T* vt,
                                                        int* status, const int* __restrict__ sizes, int ld,
                                                        int max_sweeps, T rel_tol) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* reals = reinterpret_cast<T*>(smem);
  int* ints = reinterpret_cast<int*>(smem + size_t(jacobi::scratch_reals(ld)) * sizeof(T));
  const int b = blockIdx.x;
  const int n = sizes ? sizes[b] : ld;
  const size_t slot = size_t(b) * ld * ld;
  const int st = jacobi::eigh_driver<T>(BlockLanes{}, a + slot, ld, n, mt + slot, ld, vt_work + slot,
                                        w + size_t(b) * ld, vt + slot, ld, max_sweeps, rel_tol, ints, reals);
  if (threadIdx.x == 0) status[b] = st;
}

// Block b: class loss KL(sg(softmax(w/tau)) || softmax(w)) into loss[b], and coef[b] = 2 V diag(dlam) V^T
// (fp32, ld x ld, zero outside the n x n block) for the Triton dX̂ kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) class_grad_kernel(const T* __restrict__ w, const T* __restrict__ vt,
                                                              const int* __restrict__ sizes, int ld, T tau, T* loss,
                                                              float* coef) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* dlam = reinterpret_cast<T*>(smem);
  const int b = blockIdx.x;
  const int n = sizes ? sizes[b] : ld;
  const T* wb = w + size_t(b) * ld;
  const T* v = vt + size_t(b) * ld * ld;
  if (threadIdx.x == 0) loss[b] = n > 0 ? jacobi::softmax_kl<T>(wb, n, tau, dlam) : T(0);
  __syncthreads();
  for (int item = threadIdx.x; item < ld * ld; item += blockDim.x) {
    const int r = item / ld, c = item - r * ld;
    T acc = T(0);
    if (r < n && c < n)
      for (int i = 0; i < n; ++i) acc += dlam[i] * v[i * ld + r] * v[i * ld + c];
    coef[size_t(b) * ld * ld + item] = float(T(2) * acc);
  }
}

}  // namespace densify_cuda
}  // namespace ddfast

// Host launchers (C ABI, return cudaError_t). Buffers are device pointers, batch matrices of ld x ld.
extern "C" int ddfast_densify_eigh_f64(const double* a, double* mt, double* vt_work, double* w, double* vt,
                                       int* status, const int* sizes, int batch, int ld, int max_sweeps,
                                       cudaStream_t stream) {
  using namespace ddfast::densify_cuda;
  if (batch <= 0) return int(cudaSuccess);
  const size_t shm = shared_bytes<double>(ld);
  eigh_kernel<double><<<batch, kThreads, shm, stream>>>(a, mt, vt_work, w, vt, status, sizes, ld, max_sweeps, 0.0);
  return int(cudaGetLastError());
}

extern "C" int ddfast_densify_eigh_f32(const float* a, float* mt, float* vt_work, float* w, float* vt, int* status,
                                       const int* sizes, int batch, int ld, int max_sweeps, cudaStream_t stream) {
  using namespace ddfast::densify_cuda;
  if (batch <= 0) return int(cudaSuccess);
  const size_t shm = shared_bytes<float>(ld);
  eigh_kernel<float><<<batch, kThreads, shm, stream>>>(a, mt, vt_work, w, vt, status, sizes, ld, max_sweeps, 0.0f);
  return int(cudaGetLastError());
}

extern "C" int ddfast_densify_class_grad_f64(const double* w, const double* vt, const int* sizes, int batch, int ld,
                                             double tau, double* loss, float* coef, cudaStream_t stream) {
  using namespace ddfast::densify_cuda;
  if (batch <= 0) return int(cudaSuccess);
  class_grad_kernel<double><<<batch, kThreads, size_t(ld) * sizeof(double), stream>>>(w, vt, sizes, ld, tau, loss,
                                                                                        coef);
  return int(cudaGetLastError());
}
