// See result_cache.h.

#include "result_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace dpt_fast::cpu {
namespace {

// Block sizes are rounded up to this, so requests of nearly the same size share blocks.
constexpr size_t kGranule = size_t{2} << 20;
constexpr int64_t kDefaultLimit = int64_t{1} << 30;
constexpr size_t kMaxBlocks = 16;

struct Block {
  void* ptr;
  size_t capacity;
};

// A c10::Allocator, so the tensors' storages are ordinary resizable CPU storages whose memory
// comes from (and returns to) the cache.
class ResultCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (static_cast<int64_t>(nbytes) < kCachedMinBytes) {
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    }
    Block* block = take(nbytes);
    if (block == nullptr) {
      const size_t capacity = (nbytes + kGranule - 1) / kGranule * kGranule;
      block = new Block{c10::alloc_cpu(capacity), capacity};
    }
    return {block->ptr, block, &ResultCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return bytes_;
  }

  int64_t limit() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "the result cache limit must be >= 0 bytes, got ", bytes);
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evicted = evict_down_to(limit_);
    }
    for (Block* block : evicted) {
      destroy(block);
    }
  }

  void release() {
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      evicted = evict_down_to(0);
    }
    for (Block* block : evicted) {
      destroy(block);
    }
  }

 private:
  // Takes blocks out, oldest first, until the cache holds at most `target` bytes; the caller
  // holds the lock and frees them after releasing it.
  std::vector<Block*> evict_down_to(int64_t target) {
    std::vector<Block*> evicted;
    while (bytes_ > target) {
      evicted.push_back(blocks_.front());
      bytes_ -= static_cast<int64_t>(blocks_.front()->capacity);
      blocks_.erase(blocks_.begin());
    }
    return evicted;
  }

  // The smallest cached block that holds nbytes without wasting more than half of itself.
  Block* take(size_t nbytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto best = blocks_.end();
    for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
      const size_t capacity = (*it)->capacity;
      if (capacity >= nbytes && capacity / 2 <= nbytes &&
          (best == blocks_.end() || capacity < (*best)->capacity)) {
        best = it;
      }
    }
    if (best == blocks_.end()) {
      return nullptr;
    }
    Block* block = *best;
    blocks_.erase(best);
    bytes_ -= static_cast<int64_t>(block->capacity);
    return block;
  }

  // The DataPtr deleter: keeps the block if it fits under the limit, else frees it.
  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
    ResultCache& self = instance();
    {
      const std::lock_guard<std::mutex> lock(self.mutex_);
      const auto capacity = static_cast<int64_t>(block->capacity);
      if (self.bytes_ + capacity <= self.limit_ && self.blocks_.size() < kMaxBlocks) {
        self.blocks_.push_back(block);
        self.bytes_ += capacity;
        return;
      }
    }
    destroy(block);
  }

  static void destroy(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

 public:
  // Never destroyed: a tensor may be freed after static destructors ran (at interpreter exit),
  // and its deleter still needs the cache. The blocks then go back with the process.
  static ResultCache& instance() {
    static auto* cache = new ResultCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::vector<Block*> blocks_;  // cached blocks, oldest first
  int64_t bytes_ = 0;
  int64_t limit_ = kDefaultLimit;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &ResultCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

int64_t cached_bytes() { return ResultCache::instance().bytes(); }

int64_t cache_limit() { return ResultCache::instance().limit(); }

void set_cache_limit(int64_t bytes) { ResultCache::instance().set_limit(bytes); }

void release_cache() { ResultCache::instance().release(); }

}  // namespace dpt_fast::cpu
