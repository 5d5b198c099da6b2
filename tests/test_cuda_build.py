"""What the built CUDA kernels are, read from the binary without a GPU: the tiled attention kernels of
every family (dense: sliding window and compressed; selected blocks; the decoding attend kernel) use
tensor cores (HMMA in the SASS) on every requested architecture, and ptxas gave them no local memory or
stack (no register spills)."""

import re
import subprocess
from functools import lru_cache

import pytest

import nsa_ext

from test_build import _cuobjdump

pytestmark = pytest.mark.skipif(not nsa_ext.build_info()["cuda_kernels"], reason="CPU-only build")

# Mangled names of the tiled kernels contain nsa::tiled::<name><traits>.
TILED_KERNELS = {"fwd": "5tiled10fwd_kernel", "dq": "5tiled9dq_kernel", "dkv": "5tiled10dkv_kernel"}
# The fused block selection's tensor-core kernel (S = Q K^T only: no ldmatrix.trans).
SELECT_KERNEL = "5tiled19select_tiled_kernel"
# The decoding attend kernel (cuda/decode/attend.h), instantiated per arithmetic: MmaMath<Element, Dk,
# Dv> (tensor cores) for bf16 / fp16 and each compiled head-dim pair, SimtMath for the four dtypes.
DECODE_ATTEND = "20decode_attend_kernel"
# The forward and dq kernels that multiply with wgmma (TileMma = WarpgroupMma, cuda/tile/attention.h): Hopper
# code on sm_90a, a stub elsewhere (the host launches them only on sm_90 devices).
WARPGROUP_MMA = "12WarpgroupMma"
# The policy types that tell the families apart in the kernel names (cuda/tile/attention.h).
FAMILIES = {"dense": ("DenseSchedule", "DenseKeyBlock"),
            "selection": ("SelectionSchedule", "SelectionBlockSchedule", "SelectionKeyBlock")}
# Per family and kernel kind, the policies that must each have a kernel of that kind (selection's
# forward and dq by query tiles and by blocks).
KIND_POLICIES = {"dense": {"fwd": FAMILIES["dense"][:1], "dq": FAMILIES["dense"][:1], "dkv": FAMILIES["dense"][1:]},
                 "selection": {"fwd": FAMILIES["selection"][:2], "dq": FAMILIES["selection"][:2],
                               "dkv": FAMILIES["selection"][2:]}}
# Head-dim pairs the build compiled (NSA_CUDA_HEAD_DIMS), as they appear in the Traits arguments.
HEAD_DIM_PAIRS = {64: "Li64ELi64E", 128: "Li128ELi128E", 192: "Li192ELi128E", 256: "Li256ELi256E"}


def _archs():
    """sm numbers of the cubins the build asked for, e.g. ['80', '90a']."""
    return [a.replace("+PTX", "").replace(".", "") for a in nsa_ext.build_info()["cuda_archs"].split()]


@lru_cache(maxsize=None)
def _run(*args):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (it ships in the triton wheel of CUDA torch)")
    return subprocess.run([tool, *args, nsa_ext._C.__file__], capture_output=True, text=True, check=True).stdout


def _sass_by_function(arch):
    """{mangled function name: SASS text} of the sm_<arch> cubin."""
    text = _run("--dump-sass", "--gpu-architecture", f"sm_{arch}")
    functions, name, lines = {}, None, []
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            if name:
                functions[name] = "\n".join(lines)
            name, lines = match.group(1), []
        elif name:
            lines.append(line)
    if name:
        functions[name] = "\n".join(lines)
    return functions


def _tiled(functions):
    return {n: body for n, body in functions.items() if any(tag in n for tag in TILED_KERNELS.values())}


def _assert_tensor_core_code(name, body, arch, trans=True):
    """m16n8k16 with f32 accumulators (fp16: HMMA.16816.F32, bf16: HMMA.16816.F32.BF16), ldmatrix.x4
    (and .trans for P V), cp.async."""
    assert re.search(r"\bHMMA\.16816\.F32\b", body), f"{name}: no HMMA.16816.F32 on sm_{arch}"
    assert "LDSM.16.M88.4" in body, f"{name}: no ldmatrix.x4 (LDSM) on sm_{arch}"
    assert not trans or "LDSM.16.MT88.4" in body, f"{name}: no ldmatrix.x4.trans on sm_{arch}"
    assert "LDGSTS" in body, f"{name}: no cp.async (LDGSTS) on sm_{arch}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", _archs())
def test_tiled_kernels_use_tensor_cores(arch, family):
    functions = {n: body for n, body in _tiled(_sass_by_function(arch)).items()
                 if any(policy in n for policy in FAMILIES[family])}
    assert functions, f"no tiled {family} attention kernels in the sm_{arch} cubin"
    for kind, tag in TILED_KERNELS.items():
        kernels = {n: body for n, body in functions.items() if tag in n}
        for policy in KIND_POLICIES[family][kind]:
            assert any(policy in n for n in kernels), f"no {kind} kernel with {policy} in the sm_{arch} cubin"
        for name, body in kernels.items():
            if WARPGROUP_MMA not in name:
                _assert_tensor_core_code(name, body, arch)
        compiled = [d for d, pair in HEAD_DIM_PAIRS.items() if any(pair in n for n in kernels)]
        assert compiled, f"no head-dim pair in the {family} {kind} kernel names"


@pytest.mark.parametrize("kind", ["fwd", "dq"])
@pytest.mark.parametrize("arch", [a for a in _archs() if a == "90a"])
def test_dense_kernels_have_warpgroup_mma_versions_on_sm90a(arch, kind):
    """Per compiled head-dim pair and dtype, a dense forward and dq kernel on wgmma (HGMMA 64 x N x 16
    with f32 accumulators, operands from shared memory loaded by cp.async), no mma.sync or ldmatrix left."""
    kernels = {n: body for n, body in _tiled(_sass_by_function(arch)).items()
               if TILED_KERNELS[kind] in n and WARPGROUP_MMA in n and FAMILIES["dense"][0] in n}
    pairs = [d for d, tag in HEAD_DIM_PAIRS.items() if any(tag in n for n in kernels)]
    assert len(kernels) == 2 * len(pairs) > 0, sorted(kernels)
    for name, body in kernels.items():
        assert re.search(r"\bHGMMA\.64x(32|64)x16\.F32\b", body), f"{name}: no HGMMA.64xNx16.F32"
        assert "LDGSTS" in body, f"{name}: no cp.async (LDGSTS)"
        assert "HMMA" not in body and "LDSM" not in body, f"{name}: mma.sync / ldmatrix left"
        # ptxas serialises wgmma it cannot prove safe (a wait after every instruction; only
        # -Xptxas -v reports it, "C7520 Potential Performance Loss"): each wait must cover a batch.
        products, waits = body.count("HGMMA."), body.count("WARPGROUP.DEPBAR")
        assert products >= 2 * waits, f"{name}: {products} wgmma, {waits} waits: serialised by ptxas"


@pytest.mark.parametrize("arch", [a for a in _archs() if a == "90a"])
def test_wgmma_forward_runs_the_softmax_under_p_v(arch):
    """At 128/128 the wgmma forward leaves O += P V of the previous key tile running while it computes
    the softmax (attention.h, kFwdStages = 3): in the SASS, after the wait for S alone (wait_group 1)
    come the tile's 32 exponentials, and only then the wait for P V (wait_group 0). ptxas hoists such
    a wait above arithmetic that does not feed it; a build where it does is serialised again."""
    if 128 not in nsa_ext.build_info()["tiled_head_dims"]:
        pytest.skip("head dim 128 not compiled")
    kernels = {n: body for n, body in _tiled(_sass_by_function(arch)).items()
               if TILED_KERNELS["fwd"] in n and WARPGROUP_MMA in n and HEAD_DIM_PAIRS[128] in n
               and FAMILIES["dense"][0] in n}
    assert len(kernels) == 2, sorted(kernels)  # bf16 and fp16
    for name, body in kernels.items():
        # From each wait for S alone to the next product issued: the exponentials before its last
        # wait for everything (the step-0 branch puts another such wait right after the first).
        overlapped = [stretch.rpartition("DEPBAR.LE gsb0, 0x0")[0].count("MUFU.EX2")
                      for stretch in re.findall(r"DEPBAR\.LE gsb0, 0x1\b(.*?)HGMMA", body, re.S)]
        assert overlapped and max(overlapped) >= 32, f"{name}: exponentials between the waits: {overlapped}"


@pytest.mark.parametrize("arch", _archs())
def test_select_kernel_uses_tensor_cores(arch):
    kernels = {n: body for n, body in _sass_by_function(arch).items() if SELECT_KERNEL in n}
    assert kernels, f"no select_tiled_kernel in the sm_{arch} cubin"
    for name, body in kernels.items():
        _assert_tensor_core_code(name, body, arch, trans=False)


@pytest.mark.parametrize("arch", _archs())
def test_decode_attend_kernel_uses_tensor_cores(arch):
    kernels = {n: body for n, body in _sass_by_function(arch).items() if DECODE_ATTEND in n and "7MmaMath" in n}
    assert kernels, f"no tensor-core decode_attend_kernel in the sm_{arch} cubin"
    for name, body in kernels.items():
        _assert_tensor_core_code(name, body, arch)
    pairs = [d for d, tag in HEAD_DIM_PAIRS.items() if any(tag in n for n in kernels)]
    assert len(kernels) == 2 * len(pairs) > 0, sorted(kernels)  # bf16 and fp16 per compiled pair


def _resource_usage(arch):
    """{function: {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage for sm_<arch>."""
    text = _run("--dump-resource-usage", "--gpu-architecture", f"sm_{arch}")
    usage = {}
    for match in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text):
        name, reg, stack, shared, local = match.groups()
        usage[name] = dict(REG=int(reg), STACK=int(stack), SHARED=int(shared), LOCAL=int(local))
    return usage


@pytest.mark.parametrize("arch", _archs())
def test_tiled_kernels_do_not_spill(arch):
    tags = [*TILED_KERNELS.values(), SELECT_KERNEL]
    usage = {n: u for n, u in _resource_usage(arch).items() if any(t in n for t in tags)}
    assert usage, f"no resource usage for the tiled kernels of sm_{arch}"
    compiled = [d for d, tag in HEAD_DIM_PAIRS.items() if any(tag in n for n in usage)]
    assert compiled, "no head-dim pair found in the kernel names"
    for name, u in usage.items():
        assert u["LOCAL"] == 0 and u["STACK"] == 0, f"{name} on sm_{arch} spills: {u}"
        assert u["REG"] <= 255, f"{name}: {u}"


@pytest.mark.parametrize("arch", _archs())
def test_decode_kernels_do_not_spill(arch):
    """The split decoding kernels (select: one instantiation per accumulation type; combine and the
    SIMT attend kernel: per dtype; the tensor-core attend kernel: bf16 and fp16 per compiled head-dim
    pair) keep everything in registers and shared memory."""
    usage = _resource_usage(arch)
    mma_pairs = [d for d, tag in HEAD_DIM_PAIRS.items()
                 if any(DECODE_ATTEND in n and "7MmaMath" in n and tag in n for n in usage)]
    stages = {"20decode_select_kernel": 2, "21decode_combine_kernel": 4, DECODE_ATTEND: 4 + 2 * len(mma_pairs)}
    for stage, count in stages.items():
        found = {n: u for n, u in usage.items() if stage in n}
        assert len(found) == count, f"expected {count} instantiations of {stage} on sm_{arch}, got {sorted(found)}"
        for name, u in found.items():
            assert u["LOCAL"] == 0 and u["STACK"] == 0, f"{name} on sm_{arch} spills: {u}"
