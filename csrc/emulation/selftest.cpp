// Small kernels that break CUDA's rules one at a time, so that a test sees each emulator check fire
// (tests/test_cuda_emulated.py, hook _emulation_selftest). A check that never fires looks just like a
// kernel that never breaks its rule.
#include "emulation/simt.h"

#include <c10/util/Exception.h>

#include "common/mma_layout.h"

#include <cmath>
#include <functional>
#include <map>
#include <string>

namespace nsa {
namespace emu {
namespace {

struct Case {
  dim3 grid, block;
  size_t smem;
  std::function<void()> body;
};

float* smem_floats() { return reinterpret_cast<float*>(dynamic_smem()); }
unsigned lane() { return threadIdx.x % 32; }

// A warpgroup's wgmma of A [64 x 16] by B [8 x 16]^T, all ones in bf16, loaded by cp.async into the
// core-matrix layout (A at byte 0, B after it): every result is 16. `broken` names the rule the
// kernel breaks ("" for none).
constexpr uint32_t kWgmmaB = 64 * 16 * 2;
constexpr size_t kWgmmaSmem = kWgmmaB + 8 * 16 * 2;
void wgmma_kernel(const std::string& broken) {
  alignas(16) static const uint16_t ones[8] = {0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80};
  const int c = static_cast<int>(threadIdx.x);  // one 16-byte chunk of A per thread, of B for 16 of them
  cp_async_16(dynamic_smem() + mma::core_offset(64, c / 2, c % 2 * 8), ones, true);
  if (c < 16) cp_async_16(dynamic_smem() + kWgmmaB + mma::core_offset(8, c / 2, c % 2 * 8), ones, true);
  cp_async_commit();
  cp_async_wait(0);
  if (broken != "unfenced_cp_async") fence_proxy_async();
  __syncthreads();
  if (broken == "warpgroup_mismatch" && threadIdx.x / 32 == 3) return;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t a[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};
  const bool a_in_registers = broken == "a_registers_changed";
  if (broken != "without_fence") wgmma_fence();
  wgmma_m64nNk16(d, 8, a_in_registers ? a : nullptr, mma::k_major_descriptor(0, 64, 0, 0),
                 mma::k_major_descriptor(kWgmmaB, 8, 0, 0), false, false, true);
  wgmma_commit();
  const float before = d[0];
  if (broken == "accumulator_written") d[0] = 0.f;
  if (broken == "a_registers_changed") a[0] = 0u;
  if (broken == "shared_changed" && threadIdx.x == 0) dynamic_smem()[kWgmmaB] ^= 1;
  if (broken == "in_flight_at_exit") return;
  wgmma_wait(0);
  if (broken == "read_before_wait") TORCH_CHECK(false, "before the wait ", before, ", after ", d[0]);
  for (const float x : d) TORCH_CHECK(x == 16.f, "wgmma kernel computed ", x);
}

Case wgmma_case(const std::string& broken) {
  return {dim3(1), dim3(128), kWgmmaSmem, [broken] { wgmma_kernel(broken); }};
}

const std::map<std::string, Case>& cases() {
  static const std::map<std::string, Case> all = {
      // Follows every rule: the hook returns no error.
      {"clean", {dim3(2), dim3(64), 64 * sizeof(float), [] {
         smem_floats()[threadIdx.x] = float(threadIdx.x);
         __syncthreads();
         const float other = __shfl_xor_sync(0xffffffffu, smem_floats()[63 - threadIdx.x], 1);
         TORCH_CHECK(other == float(63 - (threadIdx.x ^ 1)), "clean kernel read ", other);
       }}},
      {"divergent_collective", {dim3(1), dim3(32), 0, [] {
         if (lane() < 16) __shfl_xor_sync(0xffffffffu, 1.0f, 1);
         else __ballot_sync(0xffffffffu, 1);
       }}},
      {"lane_outside_mask", {dim3(1), dim3(32), 0, [] { __shfl_xor_sync(0x0000ffffu, 1.0f, 1); }}},
      {"lane_skips_collective", {dim3(1), dim3(32), 0, [] {
         if (lane() == 31) return;
         __syncwarp();
       }}},
      {"barrier_call_sites", {dim3(1), dim3(64), 0, [] {
         if (threadIdx.x < 32) __syncthreads();
         else __syncthreads();
       }}},
      {"barrier_deadlock", {dim3(1), dim3(32), 0, [] {
         if (lane() == 0) __syncthreads();
         else __syncwarp(0xfffffffeu);
         __syncwarp();
       }}},
      {"ldmatrix_out_of_range", {dim3(1), dim3(32), 256, [] {
         uint32_t r[4];
         ldmatrix_x4(r, dynamic_smem() + 16 * lane() + 16, false);
       }}},
      {"ldmatrix_misaligned", {dim3(1), dim3(32), 1024, [] {
         uint32_t r[4];
         ldmatrix_x4(r, dynamic_smem() + 16 * lane() + 8, true);
       }}},
      {"cp_async_misaligned_global", {dim3(1), dim3(32), 1024, [] {
         alignas(16) static const float source[8] = {1, 2, 3, 4, 5, 6, 7, 8};
         cp_async_16(dynamic_smem() + 16 * lane(), source + 1, true);
       }}},
      // Not errors but poison: the kernel reports what it read.
      {"smem_read_before_write", {dim3(1), dim3(32), 32 * sizeof(float), [] {
         TORCH_CHECK(false, "read ", smem_floats()[lane()]);
       }}},
      {"cp_async_read_before_wait", {dim3(1), dim3(32), 32 * 4 * sizeof(float), [] {
         alignas(16) static const float source[4] = {1, 1, 1, 1};
         float* mine = smem_floats() + 4 * lane();
         cp_async_16(mine, source, true);
         cp_async_commit();
         const float before = mine[0];
         cp_async_wait(0);
         TORCH_CHECK(false, "before the wait ", before, ", after ", mine[0]);
       }}},
      {"block_too_large", {dim3(1), dim3(1025), 0, [] {}}},
      {"grid_too_large", {dim3(1, 65536), dim3(32), 0, [] {}}},
      {"smem_too_large", {dim3(1), dim3(32), size_t(kMaxSmemPerBlock) + 1, [] {}}},
      // Races: no error under plain emulation (they check no values) but each reported by the
      // race-check build (tests/test_cuda_racecheck.py), as compute-sanitizer's racecheck would.
      {"race_shared_store", {dim3(1), dim3(64), 2 * sizeof(float), [] {
         if (threadIdx.x == 0) smem_floats()[0] = 1.f;
         if (threadIdx.x == 32) smem_floats()[1] = smem_floats()[0];  // another warp, no barrier between
       }}},
      {"race_cp_async_ldmatrix", {dim3(1), dim3(64), 32 * 16, [] {
         alignas(16) static const float source[4] = {1, 1, 1, 1};
         if (threadIdx.x < 32) {  // warp 0 loads 32 rows, which warp 1 reads without a barrier
           cp_async_16(dynamic_smem() + 16 * lane(), source, true);
           cp_async_commit();
           cp_async_wait(0);
         } else {
           uint32_t r[4];
           ldmatrix_x4(r, dynamic_smem() + 16 * lane(), false);
         }
       }}},
      {"race_between_blocks", {dim3(2), dim3(32), 0, [] {
         static volatile float written_by_every_block;  // volatile: a store nobody reads stays
         if (lane() == 0) written_by_every_block = float(blockIdx.x);
       }}},
      // Ordered by __syncwarp: no report.
      {"syncwarp_orders", {dim3(1), dim3(32), 32 * sizeof(float), [] {
         smem_floats()[lane()] = float(lane());
         __syncwarp();
         const float other = smem_floats()[lane() ^ 1];
         TORCH_CHECK(other == float(lane() ^ 1), "syncwarp kernel read ", other);
       }}},
      {"wgmma_clean", wgmma_case("")},
      {"wgmma_without_fence", wgmma_case("without_fence")},
      {"wgmma_unfenced_cp_async", wgmma_case("unfenced_cp_async")},
      {"wgmma_read_before_wait", wgmma_case("read_before_wait")},
      {"wgmma_accumulator_written", wgmma_case("accumulator_written")},
      {"wgmma_a_registers_changed", wgmma_case("a_registers_changed")},
      {"wgmma_shared_changed", wgmma_case("shared_changed")},
      {"wgmma_warpgroup_mismatch", wgmma_case("warpgroup_mismatch")},
      {"wgmma_in_flight_at_exit", wgmma_case("in_flight_at_exit")},
  };
  return all;
}

}  // namespace

std::vector<std::string> selftest_cases() {
  std::vector<std::string> names;
  for (const auto& [name, c] : cases()) names.push_back(name);
  return names;
}

std::string selftest(const std::string& name) {
  const auto it = cases().find(name);
  TORCH_CHECK(it != cases().end(), "nsa emulator: no self-test case '", name, "'");
  try {
    launch(it->second.grid, it->second.block, it->second.smem, it->second.body);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace emu
}  // namespace nsa
