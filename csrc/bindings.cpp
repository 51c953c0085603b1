// Python bindings of ddfast._C. Kernel sources stay in their own files (one per op); this file
// only registers them, so CUDA sources never need torch headers.
#include <torch/extension.h>

#include "buffer_cache.h"
#include "parallel.h"
#include "stat_match.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddfast C++ CPU kernels (OpenMP)";
  m.def("openmp_enabled", &ddfast::openmp_enabled, "True when the extension was built with OpenMP");
  m.def("num_threads", &ddfast::num_threads, "OpenMP threads the kernels will use");
  m.def("stat_match_forward", &ddfast::stat_match_forward, py::arg("x"), py::arg("patch"),
        "K1 forward: (cmean[C], cm2[C], pmean[K], pm2[K]) of x [B,C,H,W]; M2 = sum of squared "
        "deviations; float64; patch pair of x bilinearly resized to multiples of patch when it does not "
        "divide H or W; empty pmean/pm2 when patch == 0");
  m.def("stat_match_backward", &ddfast::stat_match_backward, py::arg("x"), py::arg("cmean"),
        py::arg("g_cmean"), py::arg("g_cvar"), py::arg("pmean"), py::arg("g_pmean"), py::arg("g_pvar"),
        py::arg("patch"), py::arg("count_c"), py::arg("count_p"),
        "K1 backward: dx (x's dtype and memory format) from the gradients of the channel/patch "
        "means and variances (variance = M2 / count)");
  m.def("set_buffer_cache_limit", &ddfast::set_buffer_cache_limit, py::arg("bytes"),
        "Most bytes of freed kernel outputs kept page-resident for reuse (0 frees them and disables)");
  m.def("buffer_cache_limit", &ddfast::buffer_cache_limit, "The buffer cache's limit in bytes");
  m.def("buffer_cache_held", &ddfast::buffer_cache_held, "Bytes of free buffers the cache keeps now");
  { void ddfast_register_densify(pybind11::module_&); ddfast_register_densify(m); }  // K3 densify_forward, jacobi_eigh (csrc/densify.cpp)
  { void ddfast_register_apm_loss(pybind11::module_&); ddfast_register_apm_loss(m); }  // K4 apm_loss_forward (csrc/apm_loss.cpp)
  { void ddfast_register_attention_match(pybind11::module_&); ddfast_register_attention_match(m); }  // K2 attention_match_forward (csrc/attention_match.cpp)
  { void ddfast_register_ln_lrelu(pybind11::module_&); ddfast_register_ln_lrelu(m); }  // DiM critic block ln_lrelu_forward/backward/double_backward (csrc/ln_lrelu.cpp)
}
