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
