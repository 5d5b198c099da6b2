// The CUDA emulator of simt.h: fibers scheduled round-robin, one block at a time.
#include "emulation/simt.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(NSA_EMULATE_RACECHECK)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator switches fibers with x86-64 code"
#endif

// Saves the callee-saved registers and the SSE / x87 control words on the current stack, stores the
// stack pointer in *from and resumes the fiber whose stack pointer is `to`. glibc's swapcontext does
// the same plus a system call for the signal mask, which made it the emulator's main cost.
extern "C" void nsa_emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl nsa_emu_switch
  .hidden nsa_emu_switch
  .type nsa_emu_switch, @function
nsa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size nsa_emu_switch, .-nsa_emu_switch
)");

namespace nsa {
namespace emu {
namespace {

// Kernels keep whole fragment arrays in locals; unoptimised frames of the unrolled loops are large.
constexpr size_t kStackBytes = size_t(1) << 20;
constexpr size_t kGuardBytes = 4096;  // below each stack, no access: an overflow faults
constexpr size_t kSmemAlignment = 128;
constexpr unsigned char kPoison = 0xff;  // NaN in bf16, fp16, fp32 and fp64; -1 in integers

struct Copy {
  unsigned char* dst;
  const unsigned char* src;  // null: zero-fill
};

// What a warp's wgmma read from shared memory, checked unchanged when the last of its lanes waits.
struct SmemReads {
  std::vector<std::pair<uint32_t, uint16_t>> elements;  // byte offset, bits
  int lanes_waiting = 32;
};

// One thread's wgmma in flight, by commit group (numbered from 0; the open group is the number of
// commits so far).
struct PendingD {  // an accumulator: its registers hold the poison until the wait writes the result
  float* d;
  int count;
  int64_t group;
  float result[128];
};
struct PendingA {  // register A operands, which must keep their values until the wait
  const uint32_t* a;
  uint32_t values[4];
  int64_t group;
};
struct PendingReads {
  std::shared_ptr<SmemReads> reads;
  int64_t group;
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  unsigned char* stack = nullptr;
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;  // race-check builds
  int unwatched = 0;           // depth of Unwatched scopes
  Indices indices;
  bool done = false;
  bool waiting = false;
  std::vector<Copy> open_group;                 // cp.async since the last commit
  std::deque<std::vector<Copy>> committed;      // oldest first
  std::vector<uint32_t> unfenced;               // 16-byte chunks it wrote by cp.async since its last proxy fence
  bool wgmma_fenced = false;                    // a wgmma.fence since the start or the last wgmma wait
  int64_t wgmma_groups = 0;                     // commit groups so far
  std::vector<PendingD> pending_d;
  std::vector<PendingA> pending_a;
  std::vector<PendingReads> pending_reads;
};

struct WarpState {
  unsigned arrived = 0;
  unsigned mask = 0;
  const char* op = nullptr;
  Combine combine = nullptr;
  const void* inputs[32];
  void* outputs[32];
  std::vector<int> waiters;
  int64_t wgmma_issued = 0;  // the warpgroup's four warps must issue the same sequence
  uint64_t wgmma_hash = 0;
  int64_t syncwarps = 0;  // __syncwarp calls completed
};

// Thrown inside a fiber to end it after an emulation error (the launch then reports the error).
struct FiberAbort {};

struct Stacks {
  std::vector<unsigned char*> bases;
  ~Stacks() {
    for (unsigned char* base : bases) munmap(base, kStackBytes + kGuardBytes);
  }
  unsigned char* get(size_t i) {
    while (bases.size() <= i) {
      void* base = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(base != MAP_FAILED, "nsa emulator: cannot map a fiber stack");
      TORCH_CHECK(mprotect(base, kGuardBytes, PROT_NONE) == 0, "nsa emulator: cannot protect a stack guard page");
      bases.push_back(static_cast<unsigned char*>(base));
    }
    return bases[i] + kGuardBytes;
  }
};

struct Launch {
  const std::function<void()>* body = nullptr;
  size_t smem_bytes = 0;
  std::unique_ptr<unsigned char, void (*)(void*)> smem{nullptr, &std::free};
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int barrier_arrived = 0;
  const char* barrier_file = nullptr;  // call site of the barrier the waiting threads are at
  int barrier_line = 0;
  std::vector<int> barrier_waiters;
  int64_t barriers = 0;  // completed
  // Race checks: the block's synchronisation objects, new for each block (two per barrier or warp,
  // by parity: a thread released from barrier k may reach k + 1 before another has left k), and the
  // launch's end, after which the host reads what every thread wrote.
  std::unique_ptr<uint64_t[]> block_sync;
  uint64_t block_begin = 0, launch_end = 0;
  void* scheduler_fiber = nullptr;
  // Per 16-byte chunk of shared memory: the thread whose cp.async wrote it and has not run
  // fence.proxy.async since (the async proxy, wgmma, may not see the write yet), or -1.
  std::vector<int> unfenced_writer;
  int live = 0;
  int current = -1;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, for AddressSanitizer's fiber API
  size_t scheduler_stack_bytes = 0;
  std::string error;
};

thread_local Launch* g_launch = nullptr;
thread_local Counters g_counters;
thread_local Stacks g_stacks;

// Race-check builds (CMake NSA_SANITIZE_THREAD): each emulated thread is a ThreadSanitizer fiber, and
// switches between fibers order nothing. This file is not instrumented; it tells TSan what orders
// threads on a GPU (barriers, __syncwarp) and which accesses it makes for them (cp.async from issue
// to wait, ldmatrix rows, wgmma operands), and hides its own bookkeeping (containers and strings
// that the fibers share in ways no GPU thread would) inside Unwatched scopes.
#if defined(NSA_EMULATE_RACECHECK)
int* unwatched_depth() {
  return g_launch != nullptr && g_launch->current >= 0 ? &g_launch->fibers[g_launch->current].unwatched : nullptr;
}
struct Unwatched {
  int* depth = unwatched_depth();
  Unwatched() {
    if (depth && (*depth)++ == 0) __tsan_ignore_thread_begin();
  }
  ~Unwatched() {
    if (depth && --*depth == 0) __tsan_ignore_thread_end();
  }
};
// An access the emulator makes for the running thread, checked even inside an Unwatched scope.
template <typename Access>
void watched(Access&& access) {
  int* depth = unwatched_depth();
  const bool lift = depth && *depth > 0;
  if (lift) __tsan_ignore_thread_end();
  access();
  if (lift) __tsan_ignore_thread_begin();
}
void race_read(const void* p, size_t bytes) { watched([&] { __tsan_read_range(const_cast<void*>(p), bytes); }); }
void race_write(void* p, size_t bytes) { watched([&] { __tsan_write_range(p, bytes); }); }
void race_release(void* sync) { __tsan_release(sync); }
void race_acquire(void* sync) { __tsan_acquire(sync); }
// Memory a new block starts with (shared memory, stacks): fresh pages, so that what the previous
// block's threads did there is forgotten rather than ordered before this block (which would order
// the blocks of a launch and hide their races).
void race_fresh(void* p, size_t bytes) {
  if (bytes == 0) return;
  const uintptr_t page = 4096, begin = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  void* mapped = mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
                      MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(mapped != MAP_FAILED, "nsa emulator: cannot renew memory for the race check");
}
// Shared memory on pages of its own (race_fresh renews them for each block), mapped once per host thread.
unsigned char* race_smem() {
  static thread_local unsigned char* const arena = [] {
    void* p = mmap(nullptr, size_t(kMaxSmemPerBlock) + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "nsa emulator: cannot map shared memory");
    return static_cast<unsigned char*>(p);
  }();
  return arena;
}
#else
struct Unwatched {};
void race_read(const void*, size_t) {}
void race_write(void*, size_t) {}
void race_release(void*) {}
void race_acquire(void*) {}
void race_fresh(void*, size_t) {}
#endif

Launch& running() {
  TORCH_CHECK(g_launch != nullptr && g_launch->current >= 0, "nsa emulator: device code called outside a launch");
  return *g_launch;
}

std::string where(const Launch& l, int id) {
  const Indices& i = l.fibers[id].indices;
  std::ostringstream s;
  s << "block (" << i.block_idx.x << ", " << i.block_idx.y << ", " << i.block_idx.z << ") thread (" << i.thread_idx.x
    << ", " << i.thread_idx.y << ", " << i.thread_idx.z << ")";
  return s.str();
}

[[noreturn]] void fail(const std::string& message) {
  Unwatched unwatched;
  Launch& l = running();
  if (l.error.empty()) l.error = where(l, l.current) + ": " + message;
  throw FiberAbort{};
}

// Stack switches, announced to AddressSanitizer in its builds (else it takes a fiber's stack for an
// overflow of the scheduler's).
void resume(Launch& l, Fiber& f) {
#if defined(NSA_EMULATE_RACECHECK)
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, kStackBytes);
#endif
  nsa_emu_switch(&l.scheduler_sp, f.sp);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

void entered(Launch& l, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
}

void suspend(Launch& l, Fiber& f, bool finished) {
#if defined(NSA_EMULATE_RACECHECK)
  __tsan_switch_to_fiber(l.scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.asan_fake_stack, l.scheduler_stack, l.scheduler_stack_bytes);
#endif
  nsa_emu_switch(&f.sp, l.scheduler_sp);
  entered(l, f);
}

void wait(Launch& l, int id) {
  l.fibers[id].waiting = true;
  suspend(l, l.fibers[id], false);
}

void release(Launch& l, std::vector<int>& waiters) {
  for (int id : waiters) l.fibers[id].waiting = false;
  waiters.clear();
}

void release_barrier_if_complete(Launch& l) {
  if (l.barrier_arrived > 0 && l.barrier_arrived == l.live) {
    l.barrier_arrived = 0;
    ++l.barriers;
    release(l, l.barrier_waiters);
  }
}

void* barrier_sync(Launch& l, int64_t barrier) { return &l.block_sync[barrier & 1]; }
void* syncwarp_sync(Launch& l, size_t warp, int64_t syncwarp) { return &l.block_sync[2 + 2 * warp + (syncwarp & 1)]; }

[[noreturn]] void fiber_main() {
  Launch& l = *g_launch;
  const int id = l.current;
  entered(l, l.fibers[id]);
  race_acquire(&l.block_begin);
  try {
    (*l.body)();
    if (!l.fibers[id].pending_d.empty()) fail("thread ended with a wgmma in flight (no wgmma.wait_group covers it)");
  } catch (const FiberAbort&) {
  } catch (const c10::Error& e) {
    Unwatched unwatched;
    if (l.error.empty()) l.error = where(l, id) + ": " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    Unwatched unwatched;
    if (l.error.empty()) l.error = where(l, id) + ": " + e.what();
  }
  race_release(&l.launch_end);
  l.fibers[id].done = true;
  --l.live;
  release_barrier_if_complete(l);
  suspend(l, l.fibers[id], true);  // never resumed
  __builtin_unreachable();
}

// A stack on which nsa_emu_switch "returns" into fiber_main, aligned as after a call.
void* initial_stack(unsigned char* base, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(base, bytes);  // redzones of the frames a previous fiber left there
#endif
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t(15));
  *--sp = 0;                                          // fiber_main's return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // popped by nsa_emu_switch's ret
  for (int reg = 0; reg < 6; ++reg) *--sp = 0;        // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t(0x037f) << 32 | 0x1f80;            // x87 control word, MXCSR: the defaults
  return sp;
}

std::string deadlock_report(const Launch& l) {
  std::ostringstream s;
  s << "deadlock: " << l.live << " threads left, " << l.barrier_arrived << " of them at __syncthreads";
  for (size_t w = 0; w < l.warps.size(); ++w) {
    const WarpState& ws = l.warps[w];
    if (ws.arrived)
      s << "; warp " << w << ": lanes 0x" << std::hex << ws.arrived << " of mask 0x" << ws.mask << std::dec << " in "
        << ws.op;
  }
  return s.str();
}

#if defined(NSA_EMULATE_RACECHECK)
// TSan fibers of finished blocks, oldest first. A fiber is one TSan thread: reused, it is ordered after
// everything its former thread did and saw, so it goes to a new block only once this many threads
// have finished after it (races between blocks closer than that in the emulator's order are seen).
// Creating a fiber for every thread instead costs more than the kernels themselves.
constexpr size_t kRetiredFibers = 1024;
thread_local std::deque<void*> g_retired_fibers;
void* fresh_fiber() {
  if (g_retired_fibers.size() <= kRetiredFibers) return __tsan_create_fiber(0);
  void* fiber = g_retired_fibers.front();
  g_retired_fibers.pop_front();
  return fiber;
}
#endif

void run_block(Launch& l, const dim3& grid, const dim3& block, const uint3& block_idx, bool reverse) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  race_fresh(l.smem.get(), l.smem_bytes);
  std::memset(l.smem.get(), kPoison, l.smem_bytes);
  l.fibers.assign(threads, Fiber{});
  l.warps.assign((threads + 31) / 32, WarpState{});
  l.barrier_arrived = 0;
  l.barrier_waiters.clear();
  l.barriers = 0;
  l.block_sync.reset(new uint64_t[2 + 2 * l.warps.size()]());
#if defined(NSA_EMULATE_RACECHECK)
  struct RetireFibers {
    Launch& l;
    ~RetireFibers() {
      for (Fiber& f : l.fibers) {
        if (!f.tsan_fiber) continue;
        if (f.done) {
          g_retired_fibers.push_back(f.tsan_fiber);
          continue;
        }
        // A thread left inside the kernel (the launch failed): its ignores end, and it is not reused.
        __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
        if (f.unwatched > 0) __tsan_ignore_thread_end();  // the outermost scope began the ignore
        __tsan_switch_to_fiber(l.scheduler_fiber, __tsan_switch_to_fiber_no_sync);
        __tsan_destroy_fiber(f.tsan_fiber);
      }
    }
  } retire_fibers{l};
#endif
  l.unfenced_writer.assign(l.smem_bytes / 16 + 1, -1);
  l.live = threads;
  for (int id = 0; id < threads; ++id) {
    Fiber& f = l.fibers[id];
    f.indices.thread_idx = make_uint3(id % block.x, id / block.x % block.y, id / (block.x * block.y));
    f.indices.block_idx = block_idx;
    f.indices.block_dim = block;
    f.indices.grid_dim = grid;
    f.stack = g_stacks.get(id);
    race_fresh(f.stack, kStackBytes);
    f.sp = initial_stack(f.stack, kStackBytes);
#if defined(NSA_EMULATE_RACECHECK)
    f.tsan_fiber = fresh_fiber();
#endif
  }
  // What the host did before the block (the launch's arguments, this block's fresh memory), for the
  // threads of reused fibers; the host has seen nothing of the launch's threads yet.
  race_release(&l.block_begin);
  while (l.live > 0) {
    bool ran = false;
    for (int k = 0; k < threads; ++k) {
      const int id = reverse ? threads - 1 - k : k;
      Fiber& f = l.fibers[id];
      if (f.done || f.waiting) continue;
      l.current = id;
      resume(l, f);
      l.current = -1;
      ran = true;
      TORCH_CHECK(l.error.empty(), "nsa emulator: ", l.error);
    }
    TORCH_CHECK(ran, "nsa emulator: block (", block_idx.x, ", ", block_idx.y, ", ", block_idx.z, "): ",
                deadlock_report(l));
  }
  for (size_t w = 0; w < l.warps.size(); ++w) {
    const size_t first = w / 4 * 4;
    const WarpState &mine = l.warps[w], &leader = l.warps[first];
    TORCH_CHECK(mine.wgmma_issued == 0 || first + 4 <= l.warps.size(), "nsa emulator: block (", block_idx.x, ", ",
                block_idx.y, ", ", block_idx.z, "): warp ", w, " issued wgmma without a whole warpgroup");
    TORCH_CHECK(mine.wgmma_issued == leader.wgmma_issued && mine.wgmma_hash == leader.wgmma_hash,
                "nsa emulator: block (", block_idx.x, ", ", block_idx.y, ", ", block_idx.z, "): warp ", w, " issued ",
                mine.wgmma_issued, " wgmma, warp ", first, " of its warpgroup ", leader.wgmma_issued,
                mine.wgmma_issued == leader.wgmma_issued ? " with other operands" : "",
                " (a warpgroup's warps must issue the same ones)");
  }
}

void check_smem_range(const Launch& l, const void* p, size_t bytes, const char* op) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < l.smem.get() || c + bytes > l.smem.get() + l.smem_bytes)
    fail(std::string(op) + ": address outside the block's dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(c) % 16 != 0) fail(std::string(op) + ": shared address not 16-byte aligned");
}

void apply(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    race_write(c.dst, 16);
    if (c.src) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}

uint16_t element16(const void* row, int col) { return static_cast<const uint16_t*>(row)[col]; }

template <bool kTrans>
void ldmatrix_combine(const void* const* in, void* const* out, unsigned) {
  ++g_counters.ldmatrix;
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* r = static_cast<uint32_t*>(out[lane]);
    for (int m = 0; m < 4; ++m) {
      // Matrix m's rows are at the addresses of lanes 8m .. 8m+7.
      const void* const* rows = reinterpret_cast<const void* const*>(in) + 8 * m;
      auto row = [&](int j) { return *static_cast<const void* const*>(rows[j]); };
      uint16_t lo, hi;
      if (kTrans) {  // element (2t, g) and (2t+1, g) of the stored matrix
        lo = element16(row(2 * (lane % 4)), lane / 4);
        hi = element16(row(2 * (lane % 4) + 1), lane / 4);
      } else {       // element (g, 2t) and (g, 2t+1)
        lo = element16(row(lane / 4), 2 * (lane % 4));
        hi = element16(row(lane / 4), 2 * (lane % 4) + 1);
      }
      r[m] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

float to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

template <bool kBf16>
void mma_combine(const void* const* in, void* const* out, unsigned) {
  ++g_counters.mma;
  float a[16][16], b[16][8], c[16][8];
  auto lo = [](uint32_t r) { return static_cast<uint16_t>(r & 0xffff); };
  auto hi = [](uint32_t r) { return static_cast<uint16_t>(r >> 16); };
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn& x = *static_cast<const MmaIn*>(in[lane]);
    const int g = lane / 4, t = lane % 4;
    // PTX ISA, mma.m16n8k16 .f16/.bf16: A a0..a7, B b0..b3, C c0..c3 per lane.
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i % 2) * 8, col = 2 * t + (i / 2) * 8;
      a[row][col] = to_float(lo(x.a[i]), kBf16);
      a[row][col + 1] = to_float(hi(x.a[i]), kBf16);
    }
    for (int i = 0; i < 2; ++i) {
      b[2 * t + 8 * i][g] = to_float(lo(x.b[i]), kBf16);
      b[2 * t + 8 * i + 1][g] = to_float(hi(x.b[i]), kBf16);
    }
    for (int i = 0; i < 4; ++i) c[g + (i / 2) * 8][2 * t + i % 2] = x.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    float* d = static_cast<float*>(out[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
      float sum = c[row][col];
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[i] = sum;
    }
  }
}

struct WgmmaIn {
  uint32_t a[4];
  bool a_in_registers, accumulate, trans_b, bf16;
  uint64_t desc_a, desc_b;
  int n, warp_rank;
  float d[256 / 2];
};

// A 16-bit element of a descriptor's matrix: row `mn` (M or N), column `k`, K-major or MN-major.
// PTX ISA canonical layouts without swizzle, in bytes: K-major ((8,m),(8,2k)):((16,SBO),(2,LBO)),
// MN-major ((8,m),(8,k)):((2,SBO),(16,LBO)).
uint16_t descriptor_element(const Launch& l, uint64_t desc, int mn, int k, bool mn_major, SmemReads& reads) {
  const uint64_t start = (desc & 0x3FFF) << 4, leading = (desc >> 16 & 0x3FFF) << 4, stride = (desc >> 32 & 0x3FFF) << 4;
  if (desc >> 62 != 0 || (desc >> 49 & 0x7) != 0) fail("wgmma: only no-swizzle descriptors with base offset 0 are emulated");
  const uint64_t offset = mn_major ? start + (mn % 8) * 2 + (mn / 8) * stride + (k % 8) * 16 + (k / 8) * leading
                                   : start + (mn % 8) * 16 + (mn / 8) * stride + (k % 8) * 2 + (k / 8) * leading;
  if (offset + 2 > l.smem_bytes) fail("wgmma: operand outside the block's dynamic shared memory");
  const int writer = l.unfenced_writer[offset / 16];
  if (writer >= 0)
    fail("wgmma reads shared memory (byte " + std::to_string(offset) + ") that thread " + std::to_string(writer) +
         " wrote by cp.async without a fence.proxy.async since");
  uint16_t bits;
  race_read(l.smem.get() + offset, 2);  // at issue, by the warp's last lane, and again at its wait
  std::memcpy(&bits, l.smem.get() + offset, 2);
  reads.elements.emplace_back(static_cast<uint32_t>(offset), bits);
  return bits;
}

struct WgmmaOut {
  float d[256 / 2];
  std::shared_ptr<SmemReads> reads;
};

void wgmma_combine(const void* const* in, void* const* out, unsigned) {
  const WgmmaIn& first = *static_cast<const WgmmaIn*>(in[0]);
  const int n = first.n;
  for (int lane = 1; lane < 32; ++lane) {
    const WgmmaIn& x = *static_cast<const WgmmaIn*>(in[lane]);
    if (x.n != n || x.desc_a != first.desc_a || x.desc_b != first.desc_b || x.accumulate != first.accumulate ||
        x.trans_b != first.trans_b || x.a_in_registers != first.a_in_registers || x.warp_rank != first.warp_rank)
      fail("wgmma: the lanes of a warp passed different operands");
  }
  g_counters.wgmma += n / 8;
  Launch& l = running();
  WarpState& warp = l.warps[l.current / 32];
  ++warp.wgmma_issued;
  for (const uint64_t x : {first.a_in_registers ? 0 : first.desc_a, first.desc_b, uint64_t(n),
                           uint64_t(first.accumulate) | uint64_t(first.trans_b) << 1 |
                               uint64_t(first.a_in_registers) << 2 | uint64_t(first.bf16) << 3})
    warp.wgmma_hash = (warp.wgmma_hash ^ x) * 0x100000001b3ull;
  auto reads = std::make_shared<SmemReads>();
  const bool bf16 = first.bf16;
  std::vector<float> a(16 * 16), b(16 * n);
  for (int k = 0; k < 16; ++k)
    for (int col = 0; col < n; ++col) b[k * n + col] = to_float(descriptor_element(l, first.desc_b, col, k, first.trans_b, *reads), bf16);
  if (first.a_in_registers) {
    for (int lane = 0; lane < 32; ++lane) {
      const WgmmaIn& x = *static_cast<const WgmmaIn*>(in[lane]);
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {  // the mma.m16n8k16 A fragment
        const int row = g + (i % 2) * 8, col = 2 * t + (i / 2) * 8;
        a[row * 16 + col] = to_float(static_cast<uint16_t>(x.a[i] & 0xffff), bf16);
        a[row * 16 + col + 1] = to_float(static_cast<uint16_t>(x.a[i] >> 16), bf16);
      }
    }
  } else {
    for (int row = 0; row < 16; ++row)
      for (int k = 0; k < 16; ++k)
        a[row * 16 + k] = to_float(descriptor_element(l, first.desc_a, 16 * first.warp_rank + row, k, false, *reads), bf16);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const WgmmaIn& x = *static_cast<const WgmmaIn*>(in[lane]);
    WgmmaOut& o = *static_cast<WgmmaOut*>(out[lane]);
    float* d = o.d;
    o.reads = reads;
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < n / 8; ++j)
      for (int i = 0; i < 4; ++i) {  // the mma.m16n8k16 C fragment of columns 8j .. 8j + 7
        const int row = g + (i / 2) * 8, col = 8 * j + 2 * t + i % 2;
        float sum = first.accumulate ? x.d[4 * j + i] : 0.f;
        for (int k = 0; k < 16; ++k) sum += a[row * 16 + k] * b[k * n + col];
        d[4 * j + i] = sum;
      }
  }
}

}  // namespace

Counters& counters() { return g_counters; }

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "nsa emulator: invalid block (", block.x, ", ",
              block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x < (uint64_t(1) << 31) && grid.y <= 65535 && grid.z <= 65535, "nsa emulator: invalid grid (",
              grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(smem <= size_t(kMaxSmemPerBlock), "nsa emulator: ", smem,
              " bytes of dynamic shared memory, more than a block may have (", kMaxSmemPerBlock, ")");
  TORCH_CHECK(g_launch == nullptr, "nsa emulator: a kernel launched another kernel");
  Launch l;
  l.body = &body;
  l.smem_bytes = smem;
#if defined(NSA_EMULATE_RACECHECK)
  l.smem = std::unique_ptr<unsigned char, void (*)(void*)>(race_smem(), [](void*) {});
#else
  // aligned_alloc wants a multiple of the alignment; one spare line keeps a zero-byte launch valid.
  const size_t rounded = (smem / kSmemAlignment + 1) * kSmemAlignment;
  l.smem.reset(static_cast<unsigned char*>(std::aligned_alloc(kSmemAlignment, rounded)));
#endif
  TORCH_CHECK(l.smem, "nsa emulator: cannot allocate ", smem, " bytes of shared memory");
  const char* order = std::getenv("NSA_EMULATE_ORDER");
  const bool reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
  g_launch = &l;
#if defined(NSA_EMULATE_RACECHECK)
  l.scheduler_fiber = __tsan_get_current_fiber();
#endif
  ++g_counters.launches;
  try {
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t b = reverse ? blocks - 1 - k : k;
      const uint3 block_idx = make_uint3(b % grid.x, b / grid.x % grid.y, b / (uint64_t(grid.x) * grid.y));
      run_block(l, grid, block, block_idx, reverse);
      ++g_counters.blocks;
    }
  } catch (...) {
    g_launch = nullptr;
    race_acquire(&l.launch_end);
    throw;
  }
  g_launch = nullptr;
  race_acquire(&l.launch_end);  // the host reads the results after the launch
}

Indices indices() {
  Launch& l = running();
  return l.fibers[l.current].indices;
}

unsigned char* dynamic_smem() { return running().smem.get(); }

void sync_block(const char* file, int line) {
  Unwatched unwatched;
  Launch& l = running();
  const int id = l.current;
  // One barrier, one call site: threads that meet at different __syncthreads hang or misbehave on a GPU.
  if (l.barrier_arrived == 0) {
    l.barrier_file = file;
    l.barrier_line = line;
  } else if (line != l.barrier_line || std::strcmp(file, l.barrier_file) != 0) {
    fail("__syncthreads at " + std::string(file) + ":" + std::to_string(line) + " while " +
         std::to_string(l.barrier_arrived) + " threads wait at the one at " + l.barrier_file + ":" +
         std::to_string(l.barrier_line));
  }
  ++l.barrier_arrived;
  l.barrier_waiters.push_back(id);
  l.fibers[id].waiting = true;
  void* sync = barrier_sync(l, l.barriers);
  race_release(sync);
  release_barrier_if_complete(l);
  if (l.fibers[id].waiting) suspend(l, l.fibers[id], false);
  race_acquire(sync);
}

void warp_collective(unsigned mask, const char* op, Combine combine, const void* input, void* output) {
  Unwatched unwatched;
  Launch& l = running();
  const int id = l.current, lane = id % 32;
  WarpState& w = l.warps[id / 32];
  if (!(mask >> lane & 1u)) fail(std::string(op) + ": lane " + std::to_string(lane) + " is not in its mask");
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
    w.combine = combine;
    std::fill(std::begin(w.inputs), std::end(w.inputs), nullptr);
    std::fill(std::begin(w.outputs), std::end(w.outputs), nullptr);
  } else if (w.mask != mask || w.combine != combine) {
    std::ostringstream s;
    s << "divergent warp: this lane calls " << op << " with mask 0x" << std::hex << mask << " while lanes 0x"
      << w.arrived << " wait in " << w.op << " with mask 0x" << w.mask;
    fail(s.str());
  }
  w.inputs[lane] = input;
  w.outputs[lane] = output;
  w.arrived |= 1u << lane;
  // __syncwarp orders the memory accesses of its lanes; the other collectives exchange registers only.
  void* sync = combine == syncwarp_combine ? syncwarp_sync(l, id / 32, w.syncwarps) : nullptr;
  if (sync) race_release(sync);
  if (w.arrived == w.mask) {
    w.combine(w.inputs, w.outputs, w.mask);
    w.arrived = 0;
    if (sync) ++w.syncwarps;
    release(l, w.waiters);
  } else {
    w.waiters.push_back(id);
    wait(l, id);
  }
  if (sync) race_acquire(sync);
}

void ballot_combine(const void* const* in, void* const* out, unsigned mask) {
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (in[lane] && *static_cast<const int*>(in[lane])) bits |= 1u << lane;
  for (int lane = 0; lane < 32; ++lane)
    if (out[lane]) *static_cast<unsigned*>(out[lane]) = bits;
}

void syncwarp_combine(const void* const*, void* const*, unsigned) {}

void cp_async_16(void* smem, const void* gmem, bool valid) {
  Unwatched unwatched;
  Launch& l = running();
  check_smem_range(l, smem, 16, "cp.async");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async: global address not 16-byte aligned");
  std::memset(smem, kPoison, 16);  // undefined until a wait covers the copy
  // The copy may land any time until the wait: a write at both ends (apply) for the race check.
  race_write(smem, 16);
  if (valid) race_read(gmem, 16);
  ++g_counters.cp_async;
  l.fibers[l.current].open_group.push_back({static_cast<unsigned char*>(smem),
                                            valid ? static_cast<const unsigned char*>(gmem) : nullptr});
}

void cp_async_commit() {
  Unwatched unwatched;
  Fiber& f = running().fibers[running().current];
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending) {
  Unwatched unwatched;
  Launch& l = running();
  Fiber& f = l.fibers[l.current];
  while (f.committed.size() > static_cast<size_t>(pending)) {
    apply(f.committed.front());
    for (const Copy& c : f.committed.front()) {
      const auto chunk = static_cast<uint32_t>((c.dst - l.smem.get()) / 16);
      l.unfenced_writer[chunk] = l.current;
      f.unfenced.push_back(chunk);
    }
    f.committed.pop_front();
  }
}

void fence_proxy_async() {
  Unwatched unwatched;
  Launch& l = running();
  Fiber& f = l.fibers[l.current];
  for (const uint32_t chunk : f.unfenced)
    if (l.unfenced_writer[chunk] == l.current) l.unfenced_writer[chunk] = -1;
  f.unfenced.clear();
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  Unwatched unwatched;
  Launch& l = running();
  check_smem_range(l, smem, 16, trans ? "ldmatrix.trans" : "ldmatrix");
  race_read(smem, 16);  // the lane's row
  // Each lane passes a pointer to its row address; the combine reads the rows.
  const void* address = smem;
  warp_collective(0xffffffffu, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4",
                  trans ? ldmatrix_combine<true> : ldmatrix_combine<false>, &address, &r);
}

uint32_t shared_offset(const void* p) {
  Unwatched unwatched;
  Launch& l = running();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < l.smem.get() || c > l.smem.get() + l.smem_bytes) fail("shared address outside the block's dynamic shared memory");
  return static_cast<uint32_t>(c - l.smem.get());
}

void wgmma_m64nNk16(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool accumulate,
                    bool trans_b, bool bf16) {
  Unwatched unwatched;
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: n must be a multiple of 8 in [8, 256]");
  Launch& l = running();
  Fiber& f = l.fibers[l.current];
  if (!f.wgmma_fenced) fail("wgmma.mma_async without a wgmma.fence since the thread started or last waited");
  const int count = n / 2;
  PendingD* chain = nullptr;  // the in-flight wgmma on these registers, which this one accumulates onto
  for (PendingD& p : f.pending_d) {
    if (p.d == d && p.count == count) chain = &p;
    else if (d < p.d + p.count && p.d < d + count) fail("wgmma: accumulators overlap those of a wgmma in flight");
  }
  WgmmaIn in{};
  in.a_in_registers = a_regs != nullptr;
  if (a_regs) std::memcpy(in.a, a_regs, sizeof(in.a));
  in.accumulate = accumulate;
  in.trans_b = trans_b;
  in.bf16 = bf16;
  in.desc_a = desc_a;
  in.desc_b = desc_b;
  in.n = n;
  in.warp_rank = static_cast<int>(indices().thread_idx.x / 32 % 4);
  std::memcpy(in.d, chain ? chain->result : d, sizeof(float) * count);
  WgmmaOut out;
  warp_collective(0xffffffffu, bf16 ? "wgmma.m64nNk16.bf16" : "wgmma.m64nNk16.f16", wgmma_combine, &in, &out);
  const int64_t group = f.wgmma_groups;
  if (!chain) {
    f.pending_d.push_back(PendingD{d, count, group, {}});
    chain = &f.pending_d.back();
  }
  std::memcpy(chain->result, out.d, sizeof(float) * count);
  chain->group = group;
  std::memset(d, kPoison, sizeof(float) * count);  // undefined until the wait
  if (a_regs) f.pending_a.push_back(PendingA{a_regs, {a_regs[0], a_regs[1], a_regs[2], a_regs[3]}, group});
  f.pending_reads.push_back(PendingReads{std::move(out.reads), group});
}

void wgmma_fence() { running().fibers[running().current].wgmma_fenced = true; }

void wgmma_commit() { ++running().fibers[running().current].wgmma_groups; }

void wgmma_wait(int pending) {
  Unwatched unwatched;
  Launch& l = running();
  Fiber& f = l.fibers[l.current];
  const int64_t done = f.wgmma_groups - pending;  // groups below this one are complete
  auto settle = [done](auto& list, auto&& complete) {
    size_t kept = 0;
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].group < done) complete(list[i]);
      else list[kept++] = std::move(list[i]);
    }
    list.resize(kept);
  };
  settle(f.pending_d, [](PendingD& p) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(p.d);
    for (size_t i = 0; i < sizeof(float) * p.count; ++i)
      if (bytes[i] != kPoison) fail("wgmma: accumulator registers written while the wgmma was in flight");
    std::memcpy(p.d, p.result, sizeof(float) * p.count);
  });
  settle(f.pending_a, [](PendingA& p) {
    if (std::memcmp(p.a, p.values, sizeof(p.values)) != 0)
      fail("wgmma: A registers changed while the wgmma was in flight");
  });
  settle(f.pending_reads, [&l](PendingReads& p) {
    if (--p.reads->lanes_waiting > 0) return;
    for (const auto& [offset, bits] : p.reads->elements) {
      uint16_t now;
      race_read(l.smem.get() + offset, 2);
      std::memcpy(&now, l.smem.get() + offset, 2);
      if (now != bits)
        fail("wgmma: shared memory at byte " + std::to_string(offset) + " changed while a wgmma read it");
    }
  });
  f.wgmma_fenced = false;  // the thread goes on to use the results: the next wgmma needs a fence
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Unwatched unwatched;
  MmaIn in;
  std::memcpy(in.a, a, sizeof(in.a));
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, d, sizeof(in.c));
  float out[4];
  warp_collective(0xffffffffu, bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16",
                  bf16 ? mma_combine<true> : mma_combine<false>, &in, &out);
  std::memcpy(d, out, sizeof(out));
}

}  // namespace emu
}  // namespace nsa
