#include "moe/core/allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace moe {

namespace {

constexpr size_t kLarge = size_t{1} << 20;  // cache blocks of at least 1 MiB
constexpr size_t kRound = size_t{1} << 16;  // bucket granularity: 64 KiB
constexpr size_t kAlign = 64;

// The one place that knows LibTorch's allocator interface changed: from 2.3
// `allocate` is no longer const and `copy_data` is pure virtual.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define MOE_ALLOCATE_CONST
#define MOE_ALLOCATOR_HAS_COPY_DATA 1
#else
#define MOE_ALLOCATE_CONST const
#define MOE_ALLOCATOR_HAS_COPY_DATA 0
#endif

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(int64_t limit) : limit_(static_cast<size_t>(limit)) {}

  c10::DataPtr allocate(size_t n) MOE_ALLOCATE_CONST override {
    void* p = take(n);
    return {p, p, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::release; }
#if MOE_ALLOCATOR_HAS_COPY_DATA
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#endif

  static CachingCpuAllocator* instance;

 private:
  static size_t bucket(size_t n) { return (n + kRound - 1) / kRound * kRound; }

  void* take(size_t n) const {
    if (n == 0) return nullptr;
    if (n < kLarge) return raw_alloc(n);
    const size_t b = bucket(n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(b);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= b;
        live_[p] = b;
        return p;
      }
    }
    void* p = raw_alloc(b);
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = b;
    return p;
  }

  static void* raw_alloc(size_t n) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, n) != 0 || !p) throw std::bad_alloc();
    return p;
  }

  static void release(void* p) {
    if (!p) return;
    CachingCpuAllocator* self = instance;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->live_.find(p);
      if (it != self->live_.end()) {
        const size_t b = it->second;
        self->live_.erase(it);
        if (self->cached_bytes_ + b <= self->limit_) {
          self->free_[b].push_back(p);
          self->cached_bytes_ += b;
          return;
        }
      }
    }
    std::free(p);
  }

  size_t limit_;
  mutable std::mutex mu_;
  mutable std::map<size_t, std::vector<void*>> free_;
  mutable std::unordered_map<void*, size_t> live_;
  mutable size_t cached_bytes_ = 0;
};

CachingCpuAllocator* CachingCpuAllocator::instance = nullptr;
std::once_flag g_install_once;

}  // namespace

void install_caching_cpu_allocator(int64_t cache_limit_bytes) {
  std::call_once(g_install_once, [&] {
    // Never destroyed: tensors may outlive static destruction.
    CachingCpuAllocator::instance = new CachingCpuAllocator(cache_limit_bytes);
    c10::SetCPUAllocator(CachingCpuAllocator::instance, /*priority=*/10);
  });
}

}  // namespace moe
