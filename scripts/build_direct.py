"""Builds nsa_ext's extension with nvcc / g++ straight from torch's headers, for machines that have
torch and the CUDA toolkit but not the packaging tools (scikit-build-core, cmake, ninja, pybind11
wheels) and no network: scripts/gpu_check.sh falls back to it.

    python scripts/build_direct.py OUTDIR [--archs 9.0a] [--jobs 16] [--head-dims 64,128,192,256]

Writes OUTDIR/nsa_ext (the Python package with _C and _build_config); put OUTDIR on PYTHONPATH.
Same sources, defines and nvcc flags as CMakeLists.txt.
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp

ROOT = Path(__file__).resolve().parents[1]
TILED_FILES = {"64": "hdim64.cu", "128": "hdim128.cu", "192": "hdim192_128.cu", "256": "hdim256.cu"}


def version():
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=")[1].strip().strip('"')
    return "0"


def find_cuda_home():
    """The toolkit root: the first candidate with the runtime library (a wrapper script named nvcc
    on PATH can make torch's guess point elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp.CUDA_HOME, "/usr/local/cuda"]
    candidates += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for c in candidates:
        if c and any((Path(c) / d / "libcudart.so").exists() for d in ("lib64", "targets/x86_64-linux/lib")):
            return Path(c)
    raise SystemExit("build_direct: no CUDA toolkit with libcudart.so found; set CUDA_HOME")


def newest_source_mtime():
    return max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--archs", default="9.0a")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--head-dims", default="64,128,192,256")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    objdir = out / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    cuda_home = find_cuda_home()
    nvcc = cuda_home / "bin" / "nvcc"
    head_dims = [d for d in args.head_dims.split(",") if d]
    archs = args.archs.replace(",", ";").split(";")
    cuda_version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.split("release ")[-1].split(",")[0]

    defines = [f'-DNSA_VERSION="{version()}"', f'-DNSA_TORCH_VERSION="{torch.__version__}"',
               f'-DNSA_CUDA_VERSION="{cuda_version}"', f'-DNSA_CUDA_ARCHS="{" ".join(archs)}"', "-DNSA_WITH_CUDA",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    defines += [f"-DNSA_TILED_HDIM_{d}" for d in head_dims]
    includes = [f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    includes += [arg for p in cpp.include_paths(device_type="cuda") for arg in ("-isystem", p)]
    gencode = []
    for arch in archs:
        num = arch.replace("+PTX", "").replace(".", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]

    cpp_sources = sorted((ROOT / "csrc").rglob("*.cpp"))
    cu_sources = [p for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    cu_sources += [ROOT / "csrc" / "cuda" / family / TILED_FILES[d] for d in head_dims
                   for family in ("dense", "selection", "decode")]

    def command(src):
        obj = objdir / (str(src.relative_to(ROOT)).replace("/", "_") + ".o")
        if src.suffix == ".cu":
            cmd = [str(nvcc), *gencode, "-O3", "-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                   "-lineinfo", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden", *defines, *includes, "-c",
                   str(src), "-o", str(obj)]
        else:
            cmd = ["g++", "-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-fno-trapping-math", *defines,
                   *includes, "-c", str(src), "-o", str(obj)]
        return cmd, obj

    jobs = [command(s) for s in cu_sources + cpp_sources]
    # Longest first: the tiled .cu files dominate the build.
    jobs.sort(key=lambda j: 0 if j[1].name.startswith(("csrc_cuda_dense", "csrc_cuda_selection_hdim")) else 1)

    sources_mtime = newest_source_mtime()

    def run(job):
        cmd, obj = job
        if obj.exists() and obj.stat().st_mtime > sources_mtime:  # rerun: nothing changed
            return obj, subprocess.CompletedProcess(cmd, 0, "", "")
        result = subprocess.run(cmd, capture_output=True, text=True)
        return obj, result

    objects = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for obj, result in pool.map(run, jobs):
            print(f"build_direct: {obj.name}: {'ok' if result.returncode == 0 else 'FAILED'}", flush=True)
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
                return 1
            objects.append(str(obj))

    package = out / "nsa_ext"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(ROOT / "python" / "nsa_ext", package)
    library = package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    torch_lib = Path(cpp.library_paths()[0])
    link = ["g++", "-shared", "-o", str(library), *objects, f"-L{torch_lib}", f"-L{cuda_home / 'lib64'}", f"-L{cuda_home / 'targets/x86_64-linux/lib'}",
            "-lc10", "-ltorch", "-ltorch_cpu", "-lc10_cuda", "-ltorch_cuda", "-lcudart", f"-Wl,-rpath,{torch_lib}"]
    subprocess.run(link, check=True)
    (package / "_build_config.py").write_text(
        f'TORCH_VERSION = "{torch.__version__}"\nCUDA_KERNELS = True\n')
    print(f"build_direct: wrote {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
