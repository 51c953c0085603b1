// OpenMP helpers shared by the CPU kernels.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ddfast {

inline bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// index of the calling thread inside an OpenMP parallel region (0 outside one)
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace ddfast
