"""select_blocks on CUDA (csrc/cuda/select_blocks.cu: the tensor-core kernel for bf16 / fp16, the
baseline for the rest) against the fp64 reference with the CPU tests' rule (forced blocks exactly, free
picks by score; tests/test_select_blocks.py runs its shapes on CUDA too): head dims 64 / 128 / 192
/ 256 and G in 1, 2, 4, 8, 16 on tensor cores, determinism, opcheck and the NSA layer end to end on
CUDA. Skipped without a GPU."""

import pytest
import torch

import nsa_ext

from test_select_blocks import PAPER, Config, check_selection, make_inputs, opcheck_samples, run
from utils import GPU, check_tensor_core_kernels, poisoned_outputs, requires_device, requires_gpu

pytestmark = requires_gpu


@pytest.mark.parametrize("dim", [64, 128, 192, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_tiled_matches_reference(dim, group, packed):
    dtype = torch.bfloat16 if (dim // 64 + group) % 2 else torch.float16
    # The tensor-core kernel: scores from the rounded inputs in fp64 vs its fp32 accumulation.
    cfg = Config(32, 16, 64, 6, 1, 2) if group % 2 else Config(16, 8, 32, 5, 1, 1)
    q_lens, k_lens = ([70, 0, 1, 130], [300, 0, 40, 500]) if packed else ([130, 130], [500, 500])
    x = make_inputs(q_lens, k_lens, 2 * group, 2, dim, cfg, packed, seed=dim + group).to(dtype)
    with poisoned_outputs():
        actual = run(x.to_device(GPU), cfg)
    check_selection(actual.cpu(), x, cfg, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_cpu_kernel(dtype):
    x = make_inputs([300], [900], 16, 2, 128, PAPER, False, seed=3).to(dtype)
    cpu, cuda = run(x, PAPER), run(x.to_device(GPU), PAPER).cpu()
    check_selection(cuda, x, PAPER, rel=2e-2)
    assert (cpu == cuda).float().mean() > 0.95  # a few near-ties may go either way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    x = make_inputs([500], [1500], 8, 2, 64, PAPER, False, seed=4).to(dtype).to_device(GPU)
    first = run(x, PAPER)
    for _ in range(2):
        assert torch.equal(run(x, PAPER), first)


def test_tensor_core_kernel_is_the_one_that_runs():
    x = make_inputs([64], [256], 4, 2, 64, PAPER, False, seed=5).to(torch.bfloat16).to_device(GPU)
    check_tensor_core_kernels([lambda: run(x, PAPER)], ["select_tiled_kernel"])


def test_opcheck():
    for args in opcheck_samples():
        args = tuple(a.to(GPU) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.nsa.select_blocks.default, args)


@requires_device
def test_layer_runs_on_cuda_and_matches_cpu():
    # fp32 end to end: every op of the layer has a CUDA kernel (the baseline ones for fp32).
    torch.manual_seed(0)
    layer = nsa_ext.NativeSparseAttention(256, num_heads=8, num_kv_heads=2)
    x = torch.randn(1, 300, 256)
    expected = layer(x)
    actual = layer.to(GPU)(x.to(GPU))
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-3, atol=1e-3)
