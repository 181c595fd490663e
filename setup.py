"""Installs fastce, and builds its optional CUDA extension ``fastce._C`` (from csrc/) when a CUDA toolchain is present.

The extension is built when nvcc is found (through CUDA_HOME, CUDA_PATH, nvcc on PATH, or /usr/local/cuda); a GPU is
not needed to build it. Without a toolchain the install is pure Python and the "cuda" backend reports why it is
unavailable. Environment switches:

    FASTCE_SKIP_CUDA_BUILD=1    never build the extension
    FASTCE_FORCE_CUDA_BUILD=1   fail, rather than install without the extension, when it cannot be built
    TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0+PTX": A100, H100, PTX for newer)
    MAX_JOBS                    parallel compile jobs (read by torch's ninja build)
    NVCC_THREADS                threads of each nvcc (one per architecture helps; default 4)
    CUDA_HOME                   the toolkit root, the folder with bin/nvcc and lib64/libcudart.so

On a GPU machine with torch and a toolkit already installed: ``pip install --no-build-isolation --no-deps -e .``
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SKIP_CUDA_BUILD = os.environ.get("FASTCE_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA_BUILD = os.environ.get("FASTCE_FORCE_CUDA_BUILD", "0") == "1"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(message: str) -> None:
    print(f"fastce setup: {message}", file=sys.stderr)


def is_cuda_toolkit(root: Path) -> bool:
    has_nvcc = (root / "bin" / "nvcc").is_file()
    has_cudart = any(glob.glob(str(root / pattern)) for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*"))
    return has_nvcc and has_cudart


def find_cuda_home() -> str | None:
    """The toolkit root. nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), whose folder's parent
    is not the toolkit, which is why every candidate must hold both bin/nvcc and libcudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and is_cuda_toolkit(Path(candidate)):
            return str(Path(candidate))
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip CUDA packages (nvidia/cu13/include, ...), which torch's own headers may need."""
    try:
        import nvidia  # namespace package installed with the CUDA builds of torch
    except ImportError:
        return []
    return sorted(
        include for base in nvidia.__path__ for include in glob.glob(os.path.join(base, "cu[0-9]*", "include"))
    )


def nvcc_major_version(cuda_home: str) -> int | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def skip_or_fail(reason: str) -> tuple[list, dict]:
    if FORCE_CUDA_BUILD:
        raise RuntimeError(f"FASTCE_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
    log(f"not building the CUDA extension fastce._C ({reason}); the 'cuda' backend will be unavailable")
    return [], {}


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup()."""
    if SKIP_CUDA_BUILD:
        return skip_or_fail("FASTCE_SKIP_CUDA_BUILD=1")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip_or_fail("no CUDA toolchain found: set CUDA_HOME to the folder holding bin/nvcc")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and guesses wrong from a wrapper nvcc.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip_or_fail(f"torch is not importable at build time ({exc})")
    if torch.version.cuda is None:
        return skip_or_fail(f"torch {torch.__version__} was built without CUDA")
    nvcc_major = nvcc_major_version(cuda_home)
    if nvcc_major != int(torch.version.cuda.split(".")[0]):  # torch's build would stop on this mismatch
        return skip_or_fail(f"nvcc in {cuda_home} is CUDA {nvcc_major}, torch {torch.__version__} is CUDA "
                            f"{torch.version.cuda}: set CUDA_HOME to a matching toolkit")
    if shutil.which("ninja") is None:  # pip's ninja package, when its scripts folder is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    log(f"building fastce._C with CUDA_HOME={cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT)) + sorted(glob.glob("csrc/*.cu", root_dir=ROOT))
    extension = CUDAExtension(
        name="fastce._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *pip_cuda_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "4")],
        },
        # Only the dispatcher is used (no pybind11), so one binary serves every Python >= 3.11.
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
