"""One small forward + backward per CUDA kernel family, for compute-sanitizer (scripts/gpu_check.sh):
the tiled bf16 kernels with a window and with compressed tokens (packed, with an empty and a
length-1 sequence, G = 3) and the baseline fp32 kernel; selected-block attention likewise (tiled bf16
with select_block 32 and G = 3, its forward by query tiles and by blocks, baseline fp32), with -1,
duplicate, out-of-range and future ids;
select_blocks on the compressed case; and the split decoding kernels (ragged cache lengths, one shorter
than a compressed token, one long enough for two compressed splits, TQ = 2), with the tensor-core
(bf16, Dk = Dv = 64) and the SIMT (fp32, Dv = 32) attend kernel; window and selected blocks on
malformed device offsets. On an sm_90 GPU, last, the bf16 window case again with the forward and dq
on wgmma (NSA_WGMMA=1)."""

import os

import torch

import nsa_ext


def packed(lengths, heads_q, heads_k, dim_qk, dim_v, dtype, k_lengths=None):
    k_lengths = k_lengths or lengths
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lengths), heads_q, dim_qk, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(sum(k_lengths), heads_k, dim_qk, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(sum(k_lengths), heads_k, dim_v, device="cuda", dtype=dtype, requires_grad=True)
    return q, k, v, cu(lengths), cu(k_lengths)


def selection(lengths):
    ids = torch.randint(-1, 4, (sum(lengths), 2, 5), dtype=torch.int32, device="cuda")
    ids[::7, :, 1] = 2**31 - 1  # out of range
    ids[::5, :, 2] = ids[::5, :, 3]  # duplicates
    # The tiled bf16 kernels by query tiles, then by blocks (chunks of 20 index rows), and the baseline.
    for dtype, schedule in ((torch.bfloat16, "tiles"), (torch.bfloat16, "blocks"), (torch.float32, "tiles")):
        os.environ["NSA_SELECTION_SCHEDULE"] = schedule
        os.environ["NSA_SELECTION_PARTIAL_BYTES"] = str(20 * 6 * 5 * 65 * 4)
        q, k, v, cq, ck = packed(lengths, 6, 2, 64, 64, dtype)
        out, lse = nsa_ext.selection_attention(q, k, v, ids, select_block=32, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                               max_seqlen_q=70, max_seqlen_k=70)
        (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
    del os.environ["NSA_SELECTION_SCHEDULE"], os.environ["NSA_SELECTION_PARTIAL_BYTES"]


def malformed_offsets():
    """Offsets on the device that the host never reads, overlapping and past the rows: the kernels must
    stay inside the tensors (seq_span; tests/test_cuda_device_seqlens.py). Tiled window and selected
    blocks by blocks, forward and backward."""
    os.environ["NSA_SELECTION_SCHEDULE"] = "blocks"
    q, k, v, _, _ = packed([40], 6, 2, 64, 64, torch.bfloat16)
    ids = torch.randint(-1, 6, (40, 2, 3), dtype=torch.int32, device="cuda")
    for offsets in ([0, 30, 10, 60], [-9, 2**31 - 1, 40, 40]):
        cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        layout = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=24, max_seqlen_k=24)
        for out, lse in (nsa_ext.sliding_window_attention(q, k, v, window=10, **layout),
                         nsa_ext.selection_attention(q, k, v, ids, select_block=8, **layout)):
            (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
    del os.environ["NSA_SELECTION_SCHEDULE"]


def main():
    torch.manual_seed(0)
    lengths = [70, 0, 1, 33]
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, cq, ck = packed(lengths, 6, 2, 64, 64, dtype)
        out, lse = nsa_ext.sliding_window_attention(q, k, v, window=20, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                                    max_seqlen_q=70, max_seqlen_k=70)
        (out.float().sum() + lse.sum()).backward()
    tokens = [(n - 32) // 16 + 1 if n >= 32 else 0 for n in (200, 0, 1, 90)]
    q = torch.randn(sum(lengths), 6, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(tokens), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(tokens), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cq = torch.tensor([0, 70, 70, 71, 104], dtype=torch.int32, device="cuda")
    ck = torch.tensor([0, 200, 200, 201, 291], dtype=torch.int32, device="cuda")
    out, lse = nsa_ext.compressed_attention(q, k, v, compress_block=32, compress_stride=16, cu_seqlens_q=cq,
                                            cu_seqlens_k=ck, max_seqlen_q=70, max_seqlen_k=200)
    (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
    nsa_ext.select_blocks(q.detach(), k.detach(), lse.detach(), compress_block=32, compress_stride=16,
                          select_block=64, select_count=3, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=70,
                          max_seqlen_k=200)
    selection(lengths)
    config = nsa_ext.NSAConfig(compress_block=16, compress_stride=8, select_block=32, select_count=4, window=40)
    lengths = torch.tensor([1100, 2, 77], dtype=torch.int32, device="cuda")  # 1100: two compressed splits
    for dtype, dim_v in ((torch.bfloat16, 64), (torch.float32, 32)):  # tensor-core and SIMT attend kernels
        cache = lambda rows, dim: torch.randn(3, rows, 2, dim, device="cuda", dtype=dtype)  # noqa: E731
        q = torch.randn(3, 2, 6, 64, device="cuda", dtype=dtype)
        gates = torch.rand(3, 2, 6, 3, device="cuda", dtype=dtype)
        nsa_ext.native_sparse_attention_with_kvcache(q, cache(1110, 64), cache(1110, dim_v), cache(140, 64),
                                                     cache(140, dim_v), gates, lengths, config=config)
    malformed_offsets()
    if torch.cuda.get_device_capability()[0] == 9:  # last: the newest kernels must not hide the others
        os.environ["NSA_WGMMA"] = "1"
        q, k, v, cq, ck = packed([70, 0, 1, 33], 6, 2, 64, 64, torch.bfloat16)
        out, lse = nsa_ext.sliding_window_attention(q, k, v, window=20, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                                    max_seqlen_q=70, max_seqlen_k=70)
        (out.float().sum() + lse.sum()).backward()
        del os.environ["NSA_WGMMA"]
    torch.cuda.synchronize()
    print("sanitizer_case: done")


if __name__ == "__main__":
    main()
