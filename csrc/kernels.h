#pragma once
// Kernel entry points per backend. The host API (csrc/api) checks inputs, allocates outputs and fills
// the params; these run the computation.
#include <ATen/ATen.h>

#include "common/attention_params.h"
#include "common/selection.h"

namespace nsa {

void dense_attention_fwd_cpu(const AttentionParams& params, at::ScalarType dtype);
void dense_attention_bwd_cpu(const AttentionBwdParams& params, at::ScalarType dtype);
void select_blocks_cpu(const SelectParams& params, at::ScalarType dtype);
void selection_attention_fwd_cpu(const AttentionParams& params, const SelectedBlocks& selection, at::ScalarType dtype);
void selection_attention_bwd_cpu(const AttentionBwdParams& params, const SelectedBlocks& selection,
                                 at::ScalarType dtype);
struct DecodeParams;  // common/decode_params.h, kept out of the CUDA files' includes
void decode_attention_cpu(const DecodeParams& params, at::ScalarType dtype);

#ifdef NSA_WITH_CUDA
// Whether t's op runs the CUDA kernels: on CUDA devices, and for CPU tensors in the emulation build
// (csrc/emulation/simt.h).
inline bool uses_cuda_kernels(const at::Tensor& t) {
#ifdef NSA_EMULATE_CUDA
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

void decode_attention_cuda(const DecodeParams& params, at::ScalarType dtype);
void dense_attention_fwd_cuda(const AttentionParams& params, at::ScalarType dtype);
void dense_attention_bwd_cuda(const AttentionBwdParams& params, at::ScalarType dtype);
void select_blocks_cuda(const SelectParams& params, at::ScalarType dtype);
void selection_attention_fwd_cuda(const AttentionParams& params, const SelectedBlocks& selection, at::ScalarType dtype,
                                  const at::Tensor& q);
// q and lse give the shapes and options of the scratch tensors (reverse index, delta).
void selection_attention_bwd_cuda(const AttentionBwdParams& params, const SelectedBlocks& selection,
                                  at::ScalarType dtype, const at::Tensor& q, const at::Tensor& lse);
#endif

}  // namespace nsa
