// The one TORCH_LIBRARY of nsa_ext: every operator schema lives here. Kernels register per backend
// (csrc/api/*.cpp); fake tensors and autograd are registered in Python (nsa_ext/ops.py).
#include <pybind11/pybind11.h>
#include <torch/library.h>

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
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "nsa_ext native extension: loading it registers the torch.ops.nsa operators";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = NSA_VERSION;
    info["torch_version"] = NSA_TORCH_VERSION;
#ifdef NSA_WITH_CUDA
    info["cuda_kernels"] = true;
    info["cuda_version"] = NSA_CUDA_VERSION;
    info["cuda_archs"] = NSA_CUDA_ARCHS;
#else
    info["cuda_kernels"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_archs"] = "";
#endif
    return info;
  });
}
