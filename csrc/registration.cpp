// The one TORCH_LIBRARY of nsa_ext: every operator schema lives here. Kernels register per backend
// (csrc/api/*.cpp); fake tensors and autograd are registered in Python (nsa_ext/ops.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/decode_split.h"
#include "common/masks.h"
#include "common/mma_layout.h"
#include "common/selection.h"
#include "common/tile_schedule.h"
#ifdef NSA_EMULATE_CUDA
#include "emulation/simt.h"
#endif

TORCH_LIBRARY(nsa, m) {
  m.set_python_module("nsa_ext.ops");
  // Sliding-window attention (spec section 5). Padded q [B, TQ, Hq, Dk] or packed [total_q, Hq, Dk]
  // with cu_seqlens; out [.., Hq, Dv], lse [.., Hq]. dlse may be None (lse unused downstream).
  m.def(
      "sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, int window, float scale, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) -> (Tensor out, Tensor lse)");
  m.def(
      "sliding_window_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int window, float scale, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Compressed attention (spec section 2): k_cmp/v_cmp hold compressed tokens. Padded: TK is
  // max_seqlen_k; packed: cu_seqlens_k are the original key lengths (token offsets are derived).
  m.def(
      "compressed_attention_fwd(Tensor q, Tensor k_cmp, Tensor v_cmp, int compress_block, int compress_stride, "
      "float scale, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "compressed_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor out, "
      "Tensor lse, int compress_block, int compress_stride, float scale, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Top-n block selection (spec section 3), not differentiable. q [B, TQ, Hq, Dk] / [total_q, Hq, Dk],
  // k_cmp [B, TC, Hk, Dk] / [total_c, Hk, Dk], lse [.., Hq] of compressed_attention. Returns int32
  // [.., Hk, select_count] block ids, ascending, -1 padded. TK is max_seqlen_k (padded) or the
  // original key lengths in cu_seqlens_k (packed; k_cmp rows follow compressed_seqlens of them).
  m.def(
      "select_blocks(Tensor q, Tensor k_cmp, Tensor lse, int compress_block, int compress_stride, "
      "int select_block, int select_count, int init_blocks, int local_blocks, float scale, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) -> Tensor");
  // Selected-block attention (spec section 4): indices int32 [B, TQ, Hk, n] (packed [total_q, Hk, n])
  // name the blocks of select_block keys each (query, kv head) row attends to; -1, out-of-range and
  // future ids are ignored, a repeated id counts once. Not differentiable in indices.
  m.def(
      "selection_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor indices, int select_block, float scale, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k) -> (Tensor out, Tensor lse)");
  m.def(
      "selection_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor indices, "
      "Tensor out, Tensor lse, int select_block, float scale, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Fused decoding (spec sections 2-7 for TQ new queries per sequence; forward only): q [B, TQ, Hq, Dk]
  // over a padded cache k/v_cache [B, capacity, Hk, D] with cache_seqlens int32 [B] live keys (new
  // ones included), compressed tokens k/v_cmp_cache [B, token_capacity, Hk, D], the window's own
  // k/v_swa_cache or None (shared with k/v), gates [B, TQ, Hq, 3] (g_cmp, g_slc, g_swa). Returns the gated sum
  // out [B, TQ, Hq, Dv] and the selected blocks int32 [B, TQ, Hk, select_count].
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_cmp_cache, Tensor v_cmp_cache, "
      "Tensor? k_swa_cache, Tensor? v_swa_cache, Tensor gates, Tensor cache_seqlens, int compress_block, int compress_stride, int select_block, int select_count, "
      "int init_blocks, int local_blocks, int window, float scale) -> (Tensor out, Tensor indices)");
}

namespace {

using Cell = std::pair<int, int>;
using Table = std::vector<std::vector<Cell>>;  // [lane][element] -> (row, col)

// The fragment tables of common/mma_layout.h for all 32 lanes, for tests/test_fragment_layout.py.
Table fragment_layout(const std::string& kind) {
  namespace mma = nsa::mma;
  Table table(32);
  for (int lane = 0; lane < 32; ++lane) {
    auto& row = table[lane];
    auto add = [&](mma::RowCol rc) { row.emplace_back(rc.row, rc.col); };
    if (kind == "mma_a") {
      for (int i = 0; i < 8; ++i) add(mma::a_element(lane, i));
    } else if (kind == "mma_b") {
      for (int i = 0; i < 4; ++i) add(mma::b_element(lane, i));
    } else if (kind == "mma_c") {
      for (int i = 0; i < 4; ++i) add(mma::c_element(lane, i));
    } else if (kind == "ldmatrix" || kind == "ldmatrix_trans") {
      for (int i = 0; i < 2; ++i) add(mma::ldmatrix_element(lane, i, kind == "ldmatrix_trans"));
    } else if (kind == "a_from_c") {  // (n-block, c index) feeding A element i
      for (int i = 0; i < 8; ++i) row.emplace_back(mma::n_block_of_a(i), mma::c_index_of_a(i));
    } else {
      const mma::Operand op = kind.ends_with("_a")        ? mma::Operand::kA
                              : kind.ends_with("_b_rows") ? mma::Operand::kBRows
                              : kind.ends_with("_b_trans") ? mma::Operand::kBTrans
                                                           : throw pybind11::value_error("unknown layout " + kind);
      if (kind.starts_with("x4_address")) {
        add(mma::ldmatrix_x4_address(op, lane));
      } else if (kind.starts_with("x4_element")) {
        for (int reg = 0; reg < 4; ++reg)
          for (int half = 0; half < 2; ++half) add(mma::ldmatrix_x4_element(op, lane, reg, half));
      } else {
        throw pybind11::value_error("unknown layout " + kind);
      }
    }
  }
  return table;
}

nsa::VisibilityMask mask_of(const std::string& kind, int64_t a, int64_t b) {
  if (kind == "window") return nsa::VisibilityMask::sliding_window(a);
  if (kind == "compressed") return nsa::VisibilityMask::compressed(a, b);
  throw pybind11::value_error("unknown mask " + kind);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nsa_ext native extension: loading it registers the torch.ops.nsa operators";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = NSA_VERSION;
    info["torch_version"] = NSA_TORCH_VERSION;
    info["emulated_cuda"] = false;
#if defined(NSA_EMULATE_CUDA)
    info["cuda_kernels"] = true;
    info["cuda_version"] = pybind11::none();
    info["cuda_archs"] = "emulated";
    info["emulated_cuda"] = true;  // the CUDA kernels run on the CPU (csrc/emulation/simt.h)
#elif defined(NSA_WITH_CUDA)
    info["cuda_kernels"] = true;
    info["cuda_version"] = NSA_CUDA_VERSION;
    info["cuda_archs"] = NSA_CUDA_ARCHS;
#else
    info["cuda_kernels"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_archs"] = "";
#endif
    // Dk of the head-dim pairs with tensor-core kernels (NSA_CUDA_HEAD_DIMS; 192 pairs with Dv = 128).
    std::vector<int> tiled_head_dims;
#ifdef NSA_TILED_HDIM_64
    tiled_head_dims.push_back(64);
#endif
#ifdef NSA_TILED_HDIM_128
    tiled_head_dims.push_back(128);
#endif
#ifdef NSA_TILED_HDIM_192
    tiled_head_dims.push_back(192);
#endif
#ifdef NSA_TILED_HDIM_256
    tiled_head_dims.push_back(256);
#endif
    info["tiled_head_dims"] = tiled_head_dims;
    return info;
  });
#ifdef NSA_EMULATE_CUDA
  m.def(
      "_emulation_counters",
      [] {
        nsa::emu::Counters& c = nsa::emu::counters();
        pybind11::dict d;
        d["launches"] = c.launches;
        d["blocks"] = c.blocks;
        d["mma"] = c.mma;
        d["ldmatrix"] = c.ldmatrix;
        d["cp_async"] = c.cp_async;
        d["wgmma"] = c.wgmma;
        c = nsa::emu::Counters{};
        return d;
      },
      "what the emulated CUDA kernels ran since the last call (launches, blocks, warp mma / ldmatrix, cp.async, wgmma in m16n8k16 units)");
  m.def("_emulation_selftest_cases", &nsa::emu::selftest_cases, "names of the emulator's rule-breaking test kernels");
  m.def("_emulation_selftest", &nsa::emu::selftest,
        "runs one rule-breaking test kernel; returns the emulator's error message ('' if the launch succeeded)");
#endif
  // Test hooks for the CUDA kernels' index math, which runs identically on the host.
  m.def("_fragment_layout", &fragment_layout, "mma.m16n8k16 / ldmatrix fragment table: [lane][element] -> (row, col)");
  m.def("_core_offset", &nsa::mma::core_offset, "byte offset of (row, col) in a core-matrix tile of `rows` rows");
  m.def(
      "_core_descriptor",
      [](bool n_major, uint32_t tile_address, int rows, int row0, int col0) {
        return n_major ? nsa::mma::n_major_descriptor(tile_address, rows, row0, col0)
                       : nsa::mma::k_major_descriptor(tile_address, rows, row0, col0);
      },
      "wgmma descriptor of a core-matrix tile's operand starting at (row0, col0): K-major or N-major");
  m.def(
      "_key_tiles",
      [](const std::string& kind, int64_t a, int64_t b, int64_t query_offset, int64_t first_row, int64_t last_row,
         int64_t num_keys, int64_t block_n) {
        const nsa::KeyTiles t = nsa::key_tiles_for_rows(mask_of(kind, a, b), query_offset, first_row, last_row,
                                                        num_keys, block_n);
        return std::make_tuple(t.begin, t.end, t.interior_begin, t.interior_end);
      },
      "(begin, end, interior_begin, interior_end) key tiles of query rows [first_row, last_row]; "
      "mask 'window' (a = w) or 'compressed' (a = block, b = stride)");
  m.def(
      "_queries_seeing",
      [](const std::string& kind, int64_t a, int64_t b, int64_t key_begin, int64_t key_end, int64_t query_offset,
         int64_t num_queries, int64_t num_keys) {
        const nsa::QueryRange r =
            nsa::queries_seeing(mask_of(kind, a, b), key_begin, key_end, query_offset, num_queries, num_keys);
        return std::make_pair(r.begin, r.end);
      },
      "query rows [begin, end) whose key range meets keys [key_begin, key_end)");
  m.def("_selection_tile_rows", &nsa::selection_tile_rows,
        "stacked query rows per tile of the CUDA selection kernels (group, n, max_rows, max_pairs, wanted)");
  m.def("_position_bits", &nsa::position_bits, "bits [first, last] of a 64-bit position mask");
  m.def(
      "_counting_slots",
      [](const std::vector<int32_t>& ids, int64_t num_blocks, int64_t select_block, int64_t position) {
        std::vector<bool> counts;
        for (size_t slot = 0; slot < ids.size(); ++slot)
          counts.push_back(nsa::first_counting_slot(ids.data(), slot, num_blocks, select_block, position));
        return counts;
      },
      "per slot of an index row: whether the CUDA kernels count it (valid, visible, first occurrence)");
  m.def(
      "_reverse_entry",
      [](int64_t kv_head, int64_t seq, int64_t block, int64_t query, int64_t num_seqs, int64_t blocks_per_seq) {
        return nsa::reverse_entry(nsa::reverse_slot(kv_head, seq, block, num_seqs, blocks_per_seq), query);
      },
      "sort key of a (kv head, sequence, block, query) entry of the backward's reverse index");
  m.def(
      "_tile_is_interior",
      [](const std::string& kind, int64_t a, int64_t b, int64_t query_offset, int64_t first_row, int64_t last_row,
         int64_t key_begin, int64_t key_end, int64_t num_keys) {
        return nsa::tile_is_interior(mask_of(kind, a, b), query_offset, first_row, last_row, key_begin, key_end,
                                     num_keys);
      },
      "whether every query row of [first_row, last_row] sees all keys [key_begin, key_end)");
  m.def(
      "_decode_splits",
      [](int64_t tasks, int64_t target_blocks, int64_t min_rows, int64_t token_rows, int64_t selected_rows,
         int64_t window_rows) {
        const nsa::DecodeSplits s =
            nsa::plan_decode_splits(tasks, target_blocks, min_rows, token_rows, selected_rows, window_rows);
        return std::make_tuple(s.compressed, s.selected, s.window);
      },
      "(compressed, selected, window) splits per task of the CUDA decoding kernels");
  m.def(
      "_even_split",
      [](int64_t rows, int64_t splits, int64_t index) {
        const nsa::KeyRange r = nsa::even_split(rows, splits, index);
        return std::make_pair(r.begin, r.end);
      },
      "rows [begin, end) of split `index` of `splits` over `rows` rows");
  m.def(
      "_compressed_split",
      [](int64_t tokens, int64_t splits, int64_t index, int64_t compress_block, int64_t compress_stride,
         int64_t select_block) {
        const nsa::BlockSelection sel{compress_block, compress_stride, select_block, 1, 0, 0};
        const nsa::CompressedSplit s = nsa::compressed_split(sel, tokens, splits, index);
        return std::make_tuple(s.block_begin, s.block_end, s.token_begin, s.token_end, s.scored_begin);
      },
      "(block_begin, block_end, token_begin, token_end, scored_begin) of a compressed split in CUDA decoding");
}
