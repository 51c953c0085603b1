// A small cache of page-resident CPU buffers for the kernels' activation-sized outputs (K1's dx,
// K3's d images). See csrc/buffer_cache.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ddfast {

// An uninitialised tensor of `sizes` in `format` (Contiguous or ChannelsLast) whose storage comes
// from the cache when it is at least kMinCachedBytes; smaller requests are a plain at::empty.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

// Upper bound on the bytes the cache keeps while nobody uses them (0: cache nothing and free what is
// kept). Default: $DDFAST_CPU_BUFFER_CACHE_MB, else 256 MB.
void set_buffer_cache_limit(int64_t bytes);
int64_t buffer_cache_limit();
// Bytes kept now (free buffers waiting for reuse).
int64_t buffer_cache_held();

}  // namespace ddfast
