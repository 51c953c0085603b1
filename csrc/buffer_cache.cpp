// Page-resident output buffers for the CPU kernels.
//
// Why: a kernel output of tens of MB (K1's dx of a [100,128,32,32] activation is 52 MB) is above
// glibc's mmap threshold, so every call gets fresh pages from the kernel and pays one page fault
// plus zeroing per 4 KiB on first touch: measured ~10 ms of a 30 ms forward+backward, a third of the
// kernel's time spent before it writes a byte. GPU frameworks avoid this with a caching allocator;
// PyTorch's CPU allocator has none. So outputs >= kMinCachedBytes are carved from buffers that the
// previous calls freed (exact size match, most recently freed first): the pages are already mapped.
//
// Bound: freed buffers are kept up to the limit (set_buffer_cache_limit, default 256 MB or
// $DDFAST_CPU_BUFFER_CACHE_MB); past it the least recently freed ones go back to the system.
// Buffers in use are not counted: they are ordinary tensor storage until their deleter runs.
#include "buffer_cache.h"

#include <torch/extension.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace ddfast {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kAlignment = 64;
constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

int64_t default_limit() {
  const char* env = std::getenv("DDFAST_CPU_BUFFER_CACHE_MB");
  if (env != nullptr && *env != '\0') return std::max<int64_t>(0, std::atoll(env)) << 20;
  return int64_t(256) << 20;
}

// Fresh buffers: ask for transparent huge pages on the 2 MiB-aligned interior, so the one-time
// first touch costs a few large faults (a no-op where THP is off).
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < 4 * kHugePage) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(ptr) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHugePage - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

class BufferCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->first == bytes) {
          void* p = it->second;
          free_.erase(it);
          held_ -= bytes;
          return p;
        }
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kAlignment, bytes) != 0) throw std::bad_alloc();
    advise_huge_pages(p, bytes);
    return p;
  }

  void give(void* p, size_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (int64_t(bytes) > limit_) {
        release.push_back(p);
      } else {
        free_.emplace_front(bytes, p);
        held_ += bytes;
        evict_locked(&release);
      }
    }
    for (void* q : release) std::free(q);
  }

  void set_limit(int64_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = std::max<int64_t>(0, bytes);
      evict_locked(&release);
    }
    for (void* q : release) std::free(q);
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

 private:
  void evict_locked(std::vector<void*>* release) {
    while (held_ > limit_ && !free_.empty()) {
      held_ -= int64_t(free_.back().first);
      release->push_back(free_.back().second);
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<std::pair<size_t, void*>> free_;  // most recently freed first
  int64_t held_ = 0;
  int64_t limit_ = default_limit();
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

std::vector<int64_t> strides_for(at::IntArrayRef sizes, at::MemoryFormat format) {
  std::vector<int64_t> order(sizes.size());  // dimensions from outermost to innermost in memory
  for (size_t d = 0; d < sizes.size(); ++d) order[d] = int64_t(d);
  if (format == at::MemoryFormat::ChannelsLast) {
    TORCH_CHECK(sizes.size() == 4, "cached_empty: channels_last needs 4 dimensions");
    order = {0, 2, 3, 1};
  } else {
    TORCH_CHECK(format == at::MemoryFormat::Contiguous, "cached_empty: unsupported memory format");
  }
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (size_t i = order.size(); i-- > 0;) {
    strides[order[i]] = step;
    step *= std::max<int64_t>(sizes[order[i]], 1);
  }
  return strides;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_CHECK(options.device().is_cpu(), "cached_empty: CPU tensors only");
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes || cache().limit() < int64_t(bytes))
    return at::empty(sizes, options.memory_format(format));
  void* p = cache().take(bytes);
  return torch::from_blob(p, sizes, strides_for(sizes, format), [bytes](void* q) { cache().give(q, bytes); },
                          options);
}

void set_buffer_cache_limit(int64_t bytes) { cache().set_limit(bytes); }
int64_t buffer_cache_limit() { return cache().limit(); }
int64_t buffer_cache_held() { return cache().held(); }

}  // namespace ddfast
