// The CPU block cache (see cpu_block_cache.h).

#include "cpu_block_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define DPT_FAST_HAS_ATFORK 1
#endif

namespace dpt_fast::cpu_block_cache {
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
class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(int64_t limit) : limit_(limit) {}

  // The cache every tensor's deleter returns its block to. Never destroyed: a tensor may be freed
  // after static destructors ran (at interpreter exit), and its deleter still needs the cache; the
  // blocks then go back with the process.
  static BlockCache& instance() {
    static const bool created = [] {  // once, thread-safe (a function-local static)
      current_ = new BlockCache(kDefaultLimit);
      register_fork_handler();
      return true;
    }();
    (void)created;
    return *current_;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (this != current_) {  // a tensor from before a fork() (resize_, copy-on-write copies)
      return current_->allocate(nbytes);
    }
    if (static_cast<int64_t>(nbytes) < kCachedMinBytes) {
      return c10::GetCPUAllocator()->allocate(nbytes);
    }
    Block* block = take(nbytes);
    if (block == nullptr) {
      block = new_block(nbytes);
    }
    report(block, static_cast<int64_t>(block->capacity));
    return {block->ptr, block, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  // The data pointer is the whole block, so copy-on-write (torch._lazy_clone) may wrap it.
  bool is_simple_data_ptr(const c10::DataPtr& data_ptr) const override {
    return data_ptr.get_deleter() == &BlockCache::give_back ||
           data_ptr.get() == data_ptr.get_context();
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

  void set_limit(int64_t limit) {
    TORCH_CHECK(limit >= 0, "the CPU block cache limit must be >= 0 bytes, got ", limit);
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      evict_until_room_for(0, evicted);
    }
    destroy(evicted);
  }

  void empty_cache() {
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      evicted.assign(blocks_.begin(), blocks_.end());
      blocks_.clear();
      bytes_ = 0;
    }
    destroy(evicted);
  }

 private:
  // A new block of at least nbytes. When the system has no memory left, the cached blocks are
  // freed and the allocation retried once, as CUDA's caching allocator does.
  Block* new_block(size_t nbytes) {
    const size_t capacity = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* ptr = nullptr;
    try {
      ptr = c10::alloc_cpu(capacity);
    } catch (const c10::Error&) {
      empty_cache();
      ptr = c10::alloc_cpu(capacity);
    }
    return new Block{ptr, capacity};
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

  // Moves the oldest blocks into `evicted` until a block of `capacity` bytes fits under the limit
  // and the block count (the caller holds the lock and frees them after releasing it). Evicting
  // the oldest rather than refusing the newest keeps the cache on the sizes in use now: blocks of
  // an earlier phase (another batch size) would otherwise hold the space for good.
  void evict_until_room_for(int64_t capacity, std::vector<Block*>& evicted) {
    while (!blocks_.empty() && (bytes_ + capacity > limit_ ||
                                (capacity > 0 && blocks_.size() >= kMaxBlocks))) {
      evicted.push_back(blocks_.front());
      bytes_ -= static_cast<int64_t>(blocks_.front()->capacity);
      blocks_.erase(blocks_.begin());
    }
  }

  // The DataPtr deleter: caches the block (making room for it) when it fits under the limit at
  // all, else frees it.
  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
    BlockCache& self = instance();
    self.report(block, -static_cast<int64_t>(block->capacity));
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(self.mutex_);
      const auto capacity = static_cast<int64_t>(block->capacity);
      if (capacity <= self.limit_) {
        self.evict_until_room_for(capacity, evicted);
        self.blocks_.push_back(block);
        self.bytes_ += capacity;
        block = nullptr;
      }
    }
    destroy(evicted);
    if (block != nullptr) {
      destroy(block);
    }
  }

  // Tells torch.profiler(profile_memory=True) about a block handed out (+) or given back (−), as
  // c10's own CPU allocator does for its allocations.
  void report(Block* block, int64_t delta) {
    // (In a fork()ed child, blocks from the parent's cache come back to a fresh one: clamp.)
    const int64_t in_use = std::max<int64_t>(0, in_use_.fetch_add(delta) + delta);
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block->ptr, delta, static_cast<size_t>(in_use),
                                       static_cast<size_t>(in_use + bytes()),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  static void destroy(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  static void destroy(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      destroy(block);
    }
  }

  // A fork()ed child (e.g. a DataLoader worker) gets a fresh cache: another thread may have held
  // the parent's lock at the fork, and it would never be released in the child. The parent's
  // cache object and its blocks are left to the child's copy of memory.
  static void register_fork_handler() {
#ifdef DPT_FAST_HAS_ATFORK
    // The child runs one thread: reading the old cache's limit without its lock is safe there.
    pthread_atfork(nullptr, nullptr, [] { current_ = new BlockCache(current_->limit_); });
#endif
  }

  static inline BlockCache* current_ = nullptr;  // set by instance(), replaced in fork children

  std::mutex mutex_;
  std::vector<Block*> blocks_;  // cached blocks, oldest first
  int64_t bytes_ = 0;           // total capacity of blocks_
  int64_t limit_;
  std::atomic<int64_t> in_use_{0};  // capacity of the blocks tensors hold
};

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor t = at::detail::empty_generic(sizes, &BlockCache::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                           std::nullopt);
  // As at::empty does under torch.use_deterministic_algorithms: a reused block holds stale,
  // plausible values, and NaN makes an element a kernel never writes show up in tests.
  const at::Context& context = at::globalContext();
  if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory() &&
      at::isFloatingType(dtype)) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

int64_t cached_bytes() { return BlockCache::instance().bytes(); }

int64_t limit() { return BlockCache::instance().limit(); }

void set_limit(int64_t bytes) { BlockCache::instance().set_limit(bytes); }

void empty_cache() { BlockCache::instance().empty_cache(); }

}  // namespace dpt_fast::cpu_block_cache
