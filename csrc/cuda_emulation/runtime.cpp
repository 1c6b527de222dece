// CUDA emulation runtime (see cuda_emulation.h): the fiber scheduler of a block, barriers,
// shuffles, shared memory, the allocation registry behind the bounds checks, and the C entry
// points the Python side uses (dpt_fast/testing_cuda_emulation.py).
#include "cuda_emulation.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <chrono>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace cuda_emu {
namespace {

// ---------------------------------------------------------------------------------------------
// Allocation registry: every CPU allocation PyTorch makes once this library is loaded, so a raw
// pointer handed to a kernel becomes a CheckedPtr over exactly its allocation.
// ---------------------------------------------------------------------------------------------

std::mutex registry_mutex;
std::map<uintptr_t, size_t>& registry() {  // begin -> bytes
  static auto* map = new std::map<uintptr_t, size_t>();  // never destroyed: frees run at exit
  return *map;
}

struct TrackedAllocation {
  c10::DataPtr inner;
};

void delete_tracked(void* ctx) {
  auto* allocation = static_cast<TrackedAllocation*>(ctx);
  {
    const std::lock_guard<std::mutex> lock(registry_mutex);
    registry().erase(reinterpret_cast<uintptr_t>(allocation->inner.get()));
  }
  delete allocation;
}

// Wraps PyTorch's CPU allocator, recording [begin, begin + bytes) of each live allocation.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr inner = base_->allocate(bytes);
    void* data = inner.get();
    const c10::Device device = inner.device();
    if (data == nullptr) {
      return inner;
    }
    {
      const std::lock_guard<std::mutex> lock(registry_mutex);
      registry()[reinterpret_cast<uintptr_t>(data)] = bytes;
    }
    return {data, new TrackedAllocation{std::move(inner)}, &delete_tracked, device};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

// Installed when the library loads (priority above PyTorch's default CPU allocator's).
const bool allocator_installed = [] {
  static TrackingAllocator tracker(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&tracker, /*priority=*/100);
  return true;
}();

// ---------------------------------------------------------------------------------------------
// Context switches. On x86-64 a hand-written switch of the callee-saved registers and the stack
// pointer: glibc's swapcontext also saves the signal mask with a system call, which made it
// several times slower, and a test run switches millions of times. Elsewhere, ucontext.
// ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch,.-cuda_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A context that starts `entry` (which must never return) on the stack [stack, stack + size).
void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top);
  *--slot = nullptr;                         // entry's return address: ends backtraces
  *--slot = reinterpret_cast<void*>(entry);  // popped by `ret`: entry starts at rsp % 16 == 8,
                                             // as after a call
  for (int i = 0; i < 6; ++i) {
    *--slot = nullptr;  // rbp, rbx, r12-r15
  }
  c.sp = slot;
}

void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc{};
};

void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------
// Scheduler state.
// ---------------------------------------------------------------------------------------------

constexpr size_t kFiberStack = 256 * 1024;

enum class Wait { kNone, kBarrier, kShuffleSlot, kShuffleDone, kDone };

struct Fiber {
  ThreadState state{};
  int linear = 0;
  Context context;
  Wait wait = Wait::kNone;
  uint64_t ticket = 0;  // the barrier or shuffle generation it waits for
  int line = 0;         // of the barrier or shuffle it waits at
  size_t shared_index = 0;
};

// A warp's shuffle rendezvous: lanes deposit values until all of `mask` have, then read.
struct WarpSlot {
  unsigned mask = 0;
  unsigned arrived = 0;
  unsigned unread = 0;
  bool complete = false;
  uint64_t generation = 0;
  int line = 0;
  size_t bytes = 0;
  const char* what = "";
  unsigned char values[kWarpSize][16] = {};
};

struct SharedAllocation {
  std::unique_ptr<unsigned char[]> memory;
  size_t bytes;
  const char* what;
};

struct Launch {
  std::string kernel;
  dim3 grid;
  dim3 block;
  size_t dynamic_bytes = 0;
  const std::function<void()>* body = nullptr;
  std::chrono::steady_clock::time_point deadline;
  // Block state.
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  std::vector<WarpSlot> warps;
  int barrier_arrived = 0;
  int barrier_line = 0;
  uint64_t barrier_generation = 0;
  std::vector<SharedAllocation> shared;
  std::unique_ptr<unsigned char[]> dynamic;
  std::exception_ptr error;
  Context scheduler;
};

thread_local Launch* launch = nullptr;
// Fiber stacks, kept from launch to launch (allocating and faulting in 256 of them per launch
// cost more than small kernels' whole run).
thread_local std::vector<std::unique_ptr<unsigned char[]>> stacks;
thread_local Fiber* fiber = nullptr;

std::mutex settings_mutex;
uint64_t schedule_seed = 0;
double launch_timeout_s = 20.0;
std::unordered_map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute
std::set<std::string> kernels_run;

std::string where() {
  std::ostringstream os;
  if (launch != nullptr) {
    os << "kernel " << launch->kernel;
    os << ", block (" << launch->block_idx.x << ", " << launch->block_idx.y << ", "
       << launch->block_idx.z << ")";
    if (fiber != nullptr) {
      const uint3 t = fiber->state.thread_idx;
      os << ", thread (" << t.x << ", " << t.y << ", " << t.z << ")";
    }
  }
  return os.str();
}

// Back to the scheduler; returns when the scheduler runs this fiber again.
void yield(Wait wait, uint64_t ticket, int line) {
  fiber->wait = wait;
  fiber->ticket = ticket;
  fiber->line = line;
  Fiber* self = fiber;
  switch_context(self->context, launch->scheduler);
  fiber = self;
  current_thread = &self->state;
}

bool can_run(const Launch& l, const Fiber& f) {
  switch (f.wait) {
    case Wait::kNone:
      return true;
    case Wait::kBarrier:
      return l.barrier_generation != f.ticket;
    case Wait::kShuffleSlot:
      return !l.warps[f.linear / kWarpSize].complete;
    case Wait::kShuffleDone: {
      const WarpSlot& w = l.warps[f.linear / kWarpSize];
      return w.complete && w.generation == f.ticket;
    }
    case Wait::kDone:
      return false;
  }
  return false;
}

// A fiber's entry: runs the kernel, then hands back to the scheduler for good.
void fiber_main() {
  try {
    (*launch->body)();
  } catch (...) {
    launch->error = std::current_exception();
  }
  fiber->wait = Wait::kDone;
  Context finished;
  switch_context(finished, launch->scheduler);
  std::abort();  // never resumed
}

// Why nothing can run: where the unfinished threads wait.
std::string deadlock_report(const Launch& l) {
  std::map<std::string, std::vector<int>> groups;
  for (const Fiber& f : l.fibers) {
    std::string key;
    switch (f.wait) {
      case Wait::kBarrier:
        key = "wait at __syncthreads() on line " + std::to_string(f.line);
        break;
      case Wait::kShuffleSlot:
      case Wait::kShuffleDone:
        key = "wait at a warp shuffle on line " + std::to_string(f.line);
        break;
      case Wait::kDone:
        key = "have exited";
        break;
      case Wait::kNone:
        key = "are runnable";
        break;
    }
    groups[key].push_back(f.linear);
  }
  std::ostringstream os;
  os << "deadlock: no thread can proceed;";
  for (const auto& [key, threads] : groups) {
    os << " " << threads.size() << " thread(s) " << key << " (e.g. thread " << threads.front()
       << ");";
  }
  return os.str();
}

void run_block(Launch& l, std::mt19937_64& rng) {
  const int n = static_cast<int>(l.block.x * l.block.y * l.block.z);
  l.fibers.assign(n, Fiber{});
  l.warps.assign((n + kWarpSize - 1) / kWarpSize, WarpSlot{});
  l.barrier_arrived = 0;
  l.barrier_generation = 0;
  l.shared.clear();
  if (l.dynamic_bytes > 0) {
    l.dynamic.reset(new unsigned char[l.dynamic_bytes]);
    std::memset(l.dynamic.get(), 0xff, l.dynamic_bytes);  // NaN in every float type
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.linear = i;
    f.state.thread_idx = {i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
    f.state.block_idx = l.block_idx;
    f.state.block_dim = l.block;
    f.state.grid_dim = l.grid;
    make_context(f.context, stacks[i].get(), kFiberStack, fiber_main);
  }
  std::vector<int> order;
  int done = 0;
  while (done < n) {
    order.clear();
    for (int i = 0; i < n; ++i) {
      if (can_run(l, l.fibers[i])) {
        order.push_back(i);
      }
    }
    if (order.empty()) {
      fiber = nullptr;
      fail(deadlock_report(l));
    }
    if (schedule_seed != 0) {
      std::shuffle(order.begin(), order.end(), rng);
    }
    for (const int i : order) {
      Fiber& f = l.fibers[i];
      if (!can_run(l, f)) {
        continue;  // an earlier fiber of this round took the slot it was waiting for
      }
      f.wait = Wait::kNone;
      fiber = &f;
      current_thread = &f.state;
      switch_context(l.scheduler, f.context);
      fiber = nullptr;
      current_thread = nullptr;
      if (l.error) {
        std::rethrow_exception(l.error);
      }
      if (f.wait == Wait::kDone) {
        ++done;
      }
    }
    check_deadline();
  }
  size_t static_bytes = 0;
  for (const SharedAllocation& a : l.shared) {
    static_bytes += a.bytes;
  }
  if (static_bytes > kStaticSharedLimit) {
    fail("static shared memory of " + std::to_string(static_bytes) + " bytes exceeds " +
         std::to_string(kStaticSharedLimit));
  }
  if (static_bytes + l.dynamic_bytes > static_cast<size_t>(kOptinSharedLimit)) {
    fail("shared memory of " + std::to_string(static_bytes + l.dynamic_bytes) +
         " bytes exceeds the device's " + std::to_string(kOptinSharedLimit));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points of cuda_emulation.h.
// ---------------------------------------------------------------------------------------------

void fail(const std::string& message) {
  const std::string context = where();
  throw std::runtime_error("CUDA emulation: " + (context.empty() ? "" : context + ": ") +
                           message);
}

void check_deadline() {
  if (launch != nullptr && std::chrono::steady_clock::now() > launch->deadline) {
    fail("launch ran longer than its time limit (" + std::to_string(launch_timeout_s) +
         " s): an endless loop or a deadlock");
  }
}

void out_of_bounds(const char* buffer, int64_t index, int64_t extent, size_t element_size) {
  fail("out-of-bounds access to " + std::string(buffer) + ": element " + std::to_string(index) +
       " of " + std::to_string(extent) + " (" + std::to_string(element_size) + "-byte elements)");
}

void index_out_of_range(const char* buffer, int64_t index, int64_t size) {
  fail("index " + std::to_string(index) + " out of range [0, " + std::to_string(size) + ") in " +
       buffer);
}

const char* describe_shared_array(size_t element_size, const int64_t* dims, int rank) {
  // Interned: a few distinct strings per kernel, kept for the process's life.
  static std::mutex mutex;
  static std::set<std::string> names;
  std::ostringstream os;
  os << "__shared__ array of " << element_size << "-byte elements";
  for (int i = 0; i < rank; ++i) {
    os << "[" << dims[i] << "]";
  }
  const std::lock_guard<std::mutex> lock(mutex);
  return names.insert(os.str()).first->c_str();
}

void syncthreads(int line) {
  Launch& l = *launch;
  if (l.barrier_arrived == 0) {
    l.barrier_line = line;
  } else if (l.barrier_line != line) {
    fail("threads of one block reached different __syncthreads() (lines " +
         std::to_string(l.barrier_line) + " and " + std::to_string(line) + ")");
  }
  const uint64_t generation = l.barrier_generation;
  if (++l.barrier_arrived == static_cast<int>(l.fibers.size())) {
    l.barrier_arrived = 0;
    ++l.barrier_generation;  // releases every waiting thread
  }
  yield(Wait::kBarrier, generation, line);  // even the last to arrive: the next round reorders
}

void shuffle(unsigned mask, const void* value, size_t bytes, int src_lane, void* result, int line,
             const char* what) {
  Launch& l = *launch;
  const int lane = fiber->linear % kWarpSize;
  const unsigned bit = 1u << lane;
  WarpSlot& w = l.warps[fiber->linear / kWarpSize];
  const int warp_first = fiber->linear - lane;
  const int lanes = std::min<int>(kWarpSize, static_cast<int>(l.fibers.size()) - warp_first);
  const unsigned existing = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1);
  if ((mask & bit) == 0) {
    fail(std::string(what) + " on line " + std::to_string(line) + ": the calling lane " +
         std::to_string(lane) + " is not in the mask");
  }
  if ((mask & ~existing) != 0) {
    fail(std::string(what) + " on line " + std::to_string(line) +
         ": the mask names lanes the warp does not have");
  }
  while (w.complete) {  // the previous shuffle's values are still being read
    yield(Wait::kShuffleSlot, 0, line);
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.line = line;
    w.bytes = bytes;
    w.what = what;
  } else if (w.mask != mask || w.line != line || w.bytes != bytes) {
    fail(std::string("lanes of one warp reached different shuffles: ") + w.what + " on line " +
         std::to_string(w.line) + " and " + what + " on line " + std::to_string(line));
  }
  std::memcpy(w.values[lane], value, bytes);
  w.arrived |= bit;
  const uint64_t generation = w.generation;
  if (w.arrived == w.mask) {
    w.complete = true;
    w.unread = w.mask;
  }
  yield(Wait::kShuffleDone, generation, line);
  if ((w.mask & (1u << src_lane)) == 0) {
    fail(std::string(what) + " on line " + std::to_string(line) + ": lane " +
         std::to_string(lane) + " reads lane " + std::to_string(src_lane) +
         ", which is not in the mask");
  }
  std::memcpy(result, w.values[src_lane], bytes);
  w.unread &= ~bit;
  if (w.unread == 0) {
    w.complete = false;
    w.arrived = 0;
    ++w.generation;
  }
}

void* shared_array(size_t bytes, size_t align, const char* what) {
  Launch& l = *launch;
  const size_t index = fiber->shared_index++;
  if (index == l.shared.size()) {
    const size_t padded = bytes + 16;
    SharedAllocation a{std::unique_ptr<unsigned char[]>(new unsigned char[padded]), bytes, what};
    std::memset(a.memory.get(), 0xff, padded);  // NaN in every float type
    l.shared.push_back(std::move(a));
  }
  SharedAllocation& a = l.shared.at(index);
  if (a.bytes != bytes || a.what != what) {
    fail("threads of one block declared different __shared__ arrays");
  }
  (void)align;  // new[] of 16 + bytes is aligned to 16 (operator new's alignment), enough here
  return a.memory.get();
}

void* dynamic_shared(size_t* bytes) {
  *bytes = launch->dynamic_bytes;
  return launch->dynamic.get();
}

void find_allocation(const void* p, const void** begin, const void** end) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  const std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().upper_bound(address);
  if (it != registry().begin()) {
    --it;
    if (address >= it->first && address < it->first + it->second) {
      *begin = reinterpret_cast<const void*>(it->first);
      *end = reinterpret_cast<const void*>(it->first + it->second);
      return;
    }
  }
  fail("a kernel argument points outside every CPU allocation made since the emulation was "
       "loaded (tensors must be allocated after loading it)");
}

int optin_shared_limit() { return kOptinSharedLimit; }

void set_max_dynamic_shared(const void* kernel, int bytes) {
  const std::lock_guard<std::mutex> lock(settings_mutex);
  max_dynamic_shared[kernel] = bytes;
}

std::string kernel_name_from_signature(const char* pretty_function) {
  // "... [with auto kernel = dpt_fast::caa_cuda::{anonymous}::caa_pv_kernel<float, 4>]" (g++).
  std::string s(pretty_function);
  const std::string key = "kernel = ";
  size_t start = s.find(key);
  if (start == std::string::npos) {
    return s;
  }
  start += key.size();
  size_t stop = s.find_first_of(";]", start);
  std::string name = s.substr(start, stop - start);
  const size_t ns = name.rfind("::", name.find('<'));
  return ns == std::string::npos ? name : name.substr(ns + 2);
}

void run_grid(const std::string& kernel, const void* kernel_id, dim3 grid, dim3 block,
              size_t dynamic_shared_bytes, const std::function<void()>& body) {
  if (launch != nullptr) {
    fail("kernel " + kernel + " launched from inside a kernel");
  }
  Launch l;
  l.kernel = kernel;
  l.grid = grid;
  l.block = block;
  l.dynamic_bytes = dynamic_shared_bytes;
  l.body = &body;
  uint64_t seed = 0;
  int dynamic_limit = 48 * 1024;
  {
    const std::lock_guard<std::mutex> lock(settings_mutex);
    seed = schedule_seed;
    l.deadline = std::chrono::steady_clock::now() +
                 std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                     std::chrono::duration<double>(launch_timeout_s));
    const auto it = max_dynamic_shared.find(kernel_id);
    if (it != max_dynamic_shared.end()) {
      dynamic_limit = it->second;
    }
    kernels_run.insert(kernel.substr(0, kernel.find('<')));
  }
  launch = &l;
  try {
    // The launch configuration checks of a real launch (invalid configuration errors).
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
      fail("empty grid or block (invalid configuration)");
    }
    if (threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535) {
      fail("grid or block too large (invalid configuration)");
    }
    if (dynamic_shared_bytes > static_cast<size_t>(dynamic_limit)) {
      fail(std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory, over the " +
           std::to_string(dynamic_limit) +
           " the kernel may use (cudaFuncSetAttribute raises it up to the opt-in limit)");
    }
    while (stacks.size() < threads) {
      stacks.emplace_back(new unsigned char[kFiberStack]);
    }
    // Blocks run one at a time, in an order the seed permutes (they must not depend on it).
    std::vector<uint3> blocks;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blocks.push_back({x, y, z});
        }
      }
    }
    std::mt19937_64 rng(seed);
    if (seed != 0) {
      std::shuffle(blocks.begin(), blocks.end(), rng);
    }
    for (const uint3& b : blocks) {
      l.block_idx = b;
      run_block(l, rng);
    }
  } catch (...) {
    launch = nullptr;
    fiber = nullptr;
    current_thread = nullptr;
    throw;
  }
  launch = nullptr;
}

}  // namespace cuda_emu

// Local arrays (registers on the GPU: `acc_t s[KT]`) are checked by g++'s -fsanitize=bounds, whose
// calls land here instead of in the UBSan runtime: an index past a local array fails the launch
// like any other out-of-bounds access, naming the kernel and the source line.
namespace {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanOutOfBoundsData {
  UbsanSourceLocation location;
  // The array and index type descriptors follow; not needed for the message.
};
}  // namespace

extern "C" {

[[noreturn]] __attribute__((visibility("default"))) void __ubsan_handle_out_of_bounds(
    void* data, void* index) {
  const auto* d = static_cast<const UbsanOutOfBoundsData*>(data);
  cuda_emu::fail("index " + std::to_string(reinterpret_cast<intptr_t>(index)) +
                 " out of bounds of a local array at " + d->location.file + ":" +
                 std::to_string(d->location.line));
}

[[noreturn]] __attribute__((visibility("default"))) void __ubsan_handle_out_of_bounds_abort(
    void* data, void* index) {
  __ubsan_handle_out_of_bounds(data, index);
}

}  // extern "C"

// C entry points for the Python side (ctypes).
extern "C" {

__attribute__((visibility("default"))) void cuda_emu_set_schedule(uint64_t seed) {
  const std::lock_guard<std::mutex> lock(cuda_emu::settings_mutex);
  cuda_emu::schedule_seed = seed;
}

__attribute__((visibility("default"))) void cuda_emu_set_timeout(double seconds) {
  const std::lock_guard<std::mutex> lock(cuda_emu::settings_mutex);
  cuda_emu::launch_timeout_s = seconds;
}

// The kernels launched since the library was loaded, comma-separated, into buf (NUL-terminated,
// truncated to size); returns the full length.
__attribute__((visibility("default"))) size_t cuda_emu_kernels_run(char* buf, size_t size) {
  const std::lock_guard<std::mutex> lock(cuda_emu::settings_mutex);
  std::string names;
  for (const std::string& name : cuda_emu::kernels_run) {
    names += (names.empty() ? "" : ",") + name;
  }
  if (size > 0) {
    const size_t n = std::min(size - 1, names.size());
    std::memcpy(buf, names.data(), n);
    buf[n] = '\0';
  }
  return names.size();
}

}  // extern "C"
