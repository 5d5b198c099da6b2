"""Fake (meta) implementations and autograd of the C++ ``torch.ops.nsa`` operators.

The schemas and kernels are C++ (csrc/registration.cpp, csrc/api); what lives here is what
torch.compile, torch.export and autograd need. Backward passes call registered backward ops.
"""

import torch


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_devices(op, args) -> None:
    """The kernels reject a tensor on another device than q (csrc/common/checks.h); so do the fake
    implementations, which run instead of them as soon as one input is a meta tensor (a meta k with a
    CPU q lands here) and under torch.compile."""
    names = [a.name for a in op._schema.arguments]
    device = args[names.index("q")].device
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(f"nsa: argument '{name}' must be on {device} like q, got {value.device}")


def _attention_outputs(q: torch.Tensor, v: torch.Tensor):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    return out, lse


def _register_attention(name: str, config_before_out: int = 0) -> None:
    """Fake tensors and autograd for an attention op pair ``{name}_fwd`` / ``{name}_bwd`` with the
    schemas ``fwd(q, k, v, *config) -> (out, lse)`` and
    ``bwd(dout, dlse, q, k, v, *config[:c], out, lse, *config[c:]) -> (dq, dk, dv)``, c being
    ``config_before_out``, laid out as in csrc/registration.cpp: config holds the op's sizes, scale,
    cu_seqlens and max_seqlens (and any other non-differentiable tensors, such as selection_attention's
    indices, which its backward takes before out), passed through unchanged."""
    fwd_op, bwd_op = getattr(torch.ops.nsa, f"{name}_fwd"), getattr(torch.ops.nsa, f"{name}_bwd")

    @torch.library.register_fake(f"nsa::{name}_fwd")
    def _fwd_fake(q, k, v, *config):
        _check_devices(fwd_op.default, (q, k, v, *config))
        return _attention_outputs(q, v)

    @torch.library.register_fake(f"nsa::{name}_bwd")
    def _bwd_fake(dout, dlse, q, k, v, *rest):
        _check_devices(bwd_op.default, (dout, dlse, q, k, v, *rest))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, *config = inputs
        tensor_slots = [i for i, c in enumerate(config) if isinstance(c, torch.Tensor)]
        ctx.save_for_backward(q, k, v, *output, *(config[i] for i in tensor_slots))
        ctx.tensor_slots = tensor_slots
        ctx.config = [None if i in tensor_slots else c for i, c in enumerate(config)]

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *config_tensors = ctx.saved_tensors
        config = list(ctx.config)
        for i, t in zip(ctx.tensor_slots, config_tensors):
            config[i] = t
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd_op(dout, dlse, q, k, v, *config[:config_before_out], out, lse,
                            *config[config_before_out:])
        return (dq, dk, dv) + (None,) * len(config)

    torch.library.register_autograd(f"nsa::{name}_fwd", backward, setup_context=setup_context)

    # The backward op has no derivative. Registered so that a gradient of a gradient (create_graph=True,
    # e.g. a gradient penalty) raises here; without it torch's fallback warns and gives wrong values.
    def double_backward(ctx, *grads):
        raise RuntimeError(f"nsa: the gradient of {name}'s backward is not implemented (double backward, "
                           "e.g. a gradient penalty through attention, is not supported)")

    torch.library.register_autograd(f"nsa::{name}_bwd", double_backward, setup_context=lambda ctx, inputs, output: None)


_register_attention("sliding_window_attention")
_register_attention("compressed_attention")
_register_attention("selection_attention", config_before_out=1)


# --- block selection (not differentiable: its int32 output carries no gradient) -----------------

@torch.library.register_fake("nsa::select_blocks")
def _select_blocks_fake(q, k_cmp, lse, compress_block, compress_stride, select_block, select_count, init_blocks,
                        local_blocks, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    _check_devices(torch.ops.nsa.select_blocks.default, (q, k_cmp, lse, compress_block, compress_stride, select_block,
                                                         select_count, init_blocks, local_blocks, scale, cu_seqlens_q,
                                                         cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return q.new_empty((*q.shape[:-2], k_cmp.shape[-2], select_count), dtype=torch.int32)


# --- fused decoding (forward only: decoding is inference) ----------------------------------------

@torch.library.register_fake("nsa::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, k_swa_cache, v_swa_cache, gates,
                           cache_seqlens, compress_block, compress_stride,
                           select_block, select_count, init_blocks, local_blocks, window, scale):
    _check_devices(torch.ops.nsa.decode_attention.default,
                   (q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, k_swa_cache, v_swa_cache, gates, cache_seqlens))
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    indices = q.new_empty((*q.shape[:2], k_cache.shape[2], select_count), dtype=torch.int32)
    return out, indices
