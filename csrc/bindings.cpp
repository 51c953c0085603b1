// Python bindings of ddfast._C. Kernel sources stay in their own files (one per op); this file
// only registers them, so CUDA sources never need torch headers.
#include <torch/extension.h>

#include "parallel.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddfast C++ CPU kernels (OpenMP)";
  m.def("openmp_enabled", &ddfast::openmp_enabled, "True when the extension was built with OpenMP");
  m.def("num_threads", &ddfast::num_threads, "OpenMP threads the kernels will use");
}
