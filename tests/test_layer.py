"""The NSA layer: functional API and module vs the reference, layouts, cache/decoding, compile,
export and AOTInductor, gradients to every parameter."""

import subprocess
import sys
import textwrap

import pytest
import torch

import nsa_ext
from nsa_ext import NativeSparseAttention, NSACache, NSAConfig, reference

from utils import assert_close_fp32, cu_seqlens, random_batch

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_count=4, init_blocks=1,
                  local_blocks=1, window=12)
CONFIGS = {
    "small": SMALL,
    "l=d=l'": NSAConfig(compress_block=8, compress_stride=8, select_block=8, select_count=5, init_blocks=1,
                        local_blocks=2, window=5),
    "no forced": NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_count=3, init_blocks=0,
                           local_blocks=0, window=30),
}


def gates(shape, gen):
    return [torch.rand(shape, dtype=torch.float64, generator=gen) for _ in range(3)]


def branch_inputs(q_lens, hq, hk, dk, dv, cfg, packed, gen):
    b = random_batch(q_lens, q_lens, hq, hk, dk, dv, packed, generator=gen)
    k_swa = torch.randn(b.k.shape, dtype=torch.float64, generator=gen)
    v_swa = torch.randn(b.v.shape, dtype=torch.float64, generator=gen)
    if packed:
        tokens = [reference.num_compressed_tokens(n, cfg.compress_block, cfg.compress_stride) for n in q_lens]
        k_cmp = torch.randn(sum(tokens), hk, dk, dtype=torch.float64, generator=gen)
        v_cmp = torch.randn(sum(tokens), hk, dv, dtype=torch.float64, generator=gen)
    else:
        tokens = reference.num_compressed_tokens(q_lens[0], cfg.compress_block, cfg.compress_stride)
        k_cmp = torch.randn(len(q_lens), tokens, hk, dk, dtype=torch.float64, generator=gen)
        v_cmp = torch.randn(len(q_lens), tokens, hk, dv, dtype=torch.float64, generator=gen)
    return b, k_cmp, v_cmp, k_swa, v_swa


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("own_window_kv", [False, True], ids=["shared-kv", "own-window-kv"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_functional_matches_reference(cfg_name, own_window_kv, packed):
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(1)
    q_lens = [70, 0, 1, 45] if packed else [70, 70]
    b, k_cmp, v_cmp, k_swa, v_swa = branch_inputs(q_lens, 8, 2, 16, 12, cfg, packed, gen)
    g = gates(b.q.shape[:-1], gen)
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v, k_cmp, v_cmp, *g, k_swa, v_swa)]
    results = []
    for fn in (nsa_ext.native_sparse_attention, reference.native_sparse_attention):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        kw = dict(k_swa=ins[8], v_swa=ins[9]) if own_window_kv else {}
        out, idx = fn(*ins[:8], config=cfg, return_indices=True, cu_seqlens_q=b.cu_seqlens_q,
                      cu_seqlens_k=b.cu_seqlens_k, **kw)
        cot = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        used = ins if own_window_kv else ins[:8]
        grads = torch.autograd.grad((out * cot).sum(), used, allow_unused=True)
        results.append((out, idx, grads))
    (out, idx, grads), (ref_out, ref_idx, ref_grads) = results
    assert torch.equal(idx, ref_idx)
    assert_close_fp32(out, ref_out, rel=1e-10, name="out")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close_fp32(a, e, rel=1e-10, name=f"grad {i}")


def make_layer(cfg=SMALL, shared_kv=False, compression="mlp", rotary=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = NativeSparseAttention(32, num_heads=8, num_kv_heads=2, head_dim=8, head_dim_v=12, config=cfg,
                                  compression=compression, shared_kv=shared_kv, rotary=rotary, **kw)
    return layer.to(dtype)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
@pytest.mark.parametrize("compression", ["mean", "linear", "mlp"])
def test_module_matches_module_level_reference(compression, shared_kv, monkeypatch):
    layer = make_layer(shared_kv=shared_kv, compression=compression)
    x = torch.randn(2, 53, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = layer(x)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    import nsa_ext.modules as modules
    monkeypatch.setattr(modules, "native_sparse_attention", reference.native_sparse_attention)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert_close_fp32(out, ref, rel=1e-10, name="out")
    for p_grad, r_grad in zip(grads, ref_grads):
        assert_close_fp32(p_grad, r_grad, rel=1e-9, name="param grad")


def test_gradients_reach_every_parameter():
    for shared_kv in (False, True):
        layer = make_layer(shared_kv=shared_kv, dtype=torch.float32)
        x = torch.randn(1, 70, 32)
        layer(x).square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_packed_equals_padded():
    layer = make_layer()
    gen = torch.Generator().manual_seed(4)
    lengths = [40, 1, 0, 23]
    x = torch.randn(sum(lengths), 32, dtype=torch.float64, generator=gen)
    out = layer(x, cu_seqlens=cu_seqlens(lengths), max_seqlen=max(lengths))
    start = 0
    for n in lengths:
        if n:
            alone = layer(x[start:start + n][None])[0]
            assert_close_fp32(out[start:start + n], alone, rel=1e-10)
        start += n


def _decode(layer, x, steps):
    """Feeds x [B, T, hidden] through the cache in chunks of the given sizes."""
    cache = NSACache(x.shape[0])
    outs, start = [], 0
    for n in steps:
        outs.append(layer(x[:, start:start + n], cache=cache))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("shared_kv", [False, True], ids=["separate-kv", "shared-kv"])
def test_token_by_token_decoding_equals_prefill(cfg_name, shared_kv):
    layer = make_layer(CONFIGS[cfg_name], shared_kv=shared_kv)
    x = torch.randn(2, 45, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prefill = layer(x)
        decoded = _decode(layer, x, [1] * 45)
        chunked = _decode(layer, x, [7, 1, 20, 3, 14])
    assert_close_fp32(decoded, prefill, rel=1e-10, name="decode")
    assert_close_fp32(chunked, prefill, rel=1e-10, name="chunked prefill")


def test_ragged_batch_cache():
    layer = make_layer()
    gen = torch.Generator().manual_seed(6)
    prompts = [30, 5, 17]
    steps = 6
    full = [torch.randn(n + steps, 32, dtype=torch.float64, generator=gen) for n in prompts]
    cache = NSACache(len(prompts))
    with torch.no_grad():
        x = torch.cat([f[:n] for f, n in zip(full, prompts)])
        first = layer(x, cu_seqlens=cu_seqlens(prompts), max_seqlen=max(prompts), cache=cache)
        outs = [[first[s:s + n]] for s, n in zip(cu_seqlens(prompts)[:-1].tolist(), prompts)]
        for t in range(steps):
            token = torch.stack([f[n + t] for f, n in zip(full, prompts)])[:, None]  # [B, 1, hidden]
            step = layer(token, cache=cache)
            for b in range(len(prompts)):
                outs[b].append(step[b])
        for b, f in enumerate(full):
            assert_close_fp32(torch.cat(outs[b]), layer(f[None])[0], rel=1e-10, name=f"sequence {b}")


def test_compile_fullgraph_dynamic_forward_backward():
    torch._dynamo.reset()
    layer = make_layer(dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for t in (37, 61):
        x = torch.randn(2, t, 32, requires_grad=True)
        out = compiled(x)
        expected = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        g, = torch.autograd.grad(out.square().sum(), x)
        g_ref, = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_no_graph_breaks():
    torch._dynamo.reset()
    layer = make_layer(dtype=torch.float32)
    explain = torch._dynamo.explain(layer)(torch.randn(1, 50, 32))
    assert explain.graph_break_count == 0, explain.break_reasons


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)
        self.attn = make_layer(dtype=torch.float32)
        self.head = torch.nn.Linear(32, 50)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(h + self.attn(h))


def test_export_and_aot_inductor_package(tmp_path):
    model = TinyModel().eval()
    tokens = torch.randint(0, 50, (1, 48))
    exported = torch.export.export(model, (tokens,))
    assert any("nsa." in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(tokens), model(tokens))
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "tiny.pt2"))
    torch.save({"tokens": tokens, "expected": model(tokens).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, nsa_ext
        io = torch.load({str(tmp_path / 'io.pt')!r})
        runner = torch._inductor.aoti_load_package({package!r})
        out = runner(io["tokens"])
        torch.testing.assert_close(out, io["expected"], rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_config_validation():
    with pytest.raises(ValueError, match="'compress_stride'"):
        NSAConfig(compress_block=32, compress_stride=12)
    with pytest.raises(ValueError, match="'select_count'"):
        NSAConfig(select_count=2, init_blocks=1, local_blocks=2)
    with pytest.raises(ValueError, match="'window'"):
        NSAConfig(window=0)
    with pytest.raises(ValueError, match="'num_kv_heads'"):
        NativeSparseAttention(32, num_heads=8, num_kv_heads=3)
