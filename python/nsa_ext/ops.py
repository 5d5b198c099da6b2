"""Fake (meta) implementations and autograd of the C++ ``torch.ops.nsa`` operators.

The schemas and kernels are C++ (csrc/registration.cpp, csrc/api); what lives here is what
torch.compile, torch.export and autograd need. Backward passes call registered backward ops.
"""

import torch


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attention_outputs(q: torch.Tensor, v: torch.Tensor):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    return out, lse


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


# --- sliding-window attention ----------------------------------------------------------------

@torch.library.register_fake("nsa::sliding_window_attention_fwd")
def _sliding_window_fwd_fake(q, k, v, window, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return _attention_outputs(q, v)


@torch.library.register_fake("nsa::sliding_window_attention_bwd")
def _sliding_window_bwd_fake(dout, dlse, q, k, v, out, lse, window, scale, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


def _sliding_window_setup_context(ctx, inputs, output):
    q, k, v, window, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (window, scale)
    ctx.seqlens = (max_seqlen_q, max_seqlen_k)


def _sliding_window_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.nsa.sliding_window_attention_bwd(
        dout, dlse, q, k, v, out, lse, *ctx.args, cu_seqlens_q, cu_seqlens_k, *ctx.seqlens)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("nsa::sliding_window_attention_fwd", _sliding_window_backward,
                                setup_context=_sliding_window_setup_context)


# --- block selection (not differentiable: its int32 output carries no gradient) -----------------

@torch.library.register_fake("nsa::select_blocks")
def _select_blocks_fake(q, k_cmp, lse, compress_block, compress_stride, select_block, select_count, init_blocks,
                        local_blocks, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return q.new_empty((*q.shape[:-2], k_cmp.shape[-2], select_count), dtype=torch.int32)
