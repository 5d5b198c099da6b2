"""The build itself: what build_info reports, which ops are registered, what the binary contains."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa_ext


def test_build_info():
    info = nsa_ext.build_info()
    assert info["version"] == nsa_ext.__version__
    assert info["torch_version"] == torch.__version__
    wants_cuda = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                  and os.environ.get("NSA_ENABLE_CUDA", "AUTO").upper() not in ("OFF", "0", "FALSE"))
    assert info["cuda_kernels"] == wants_cuda
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_archs"]
        assert set(info["tiled_head_dims"]) <= {64, 128, 192, 256}
    else:
        assert info["cuda_version"] is None and info["tiled_head_dims"] == []


@pytest.mark.parametrize("op", ["sliding_window_attention_fwd", "sliding_window_attention_bwd",
                                "compressed_attention_fwd", "compressed_attention_bwd", "select_blocks",
                                "selection_attention_fwd", "selection_attention_bwd"])
def test_ops_are_registered(op):
    assert getattr(torch.ops.nsa, op).default._schema.name == f"nsa::{op}"


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or shutil.which("nm") is None,
                    reason="torch without the OpenMP backend, or no nm")
def test_parallel_for_is_compiled_with_openmp():
    # at::parallel_for is inline: without -fopenmp its pragma vanishes and the kernels run serially
    # while each ATen op inside them opens its own thread team.
    symbols = subprocess.run(["nm", "-D", "--undefined-only", nsa_ext._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "GOMP_parallel" in symbols


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


@pytest.mark.skipif(not nsa_ext.build_info()["cuda_kernels"], reason="CPU-only build")
def test_binary_holds_cubins_for_every_requested_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (it ships in the triton wheel of CUDA torch)")
    library = nsa_ext._C.__file__
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    archs = nsa_ext.build_info()["cuda_archs"].split()
    for arch in archs:
        number = arch.replace("+PTX", "").replace(".", "")
        assert re.search(rf"\.sm_{number}\.cubin", elf), f"no sm_{number} cubin in {library}:\n{elf}"
        if arch.endswith("+PTX"):
            assert re.search(rf"\.sm_{number}\.ptx", ptx), f"no sm_{number} PTX in {library}:\n{ptx}"


def test_import_with_another_torch_asks_for_a_rebuild():
    code = "import torch; torch.__version__ = '0.0.1'; import nsa_ext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "rebuild" in result.stderr
