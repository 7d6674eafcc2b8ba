"""Build script. The package is pure Python; the CUDA extension ``branchynet._C`` is
built only where a CUDA torch and a CUDA toolkit are present (see csrc/)."""

import os
import sys

from setuptools import find_packages, setup

# Triton is in the test extra because its kernels are tested on the CPU too, under
# TRITON_INTERPRET=1; its wheels exist for Linux only.
TRITON = ["triton>=3.0; platform_system == 'Linux'"]
TEST = ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"] + TRITON
DEMO = ["tqdm>=4.60", "matplotlib>=3.5", "mlxtend>=0.22", "scikit-learn>=1.0"]


# --- the compiled extension branchynet._C ------------------------------------------------
#
# CUDA build: torch importable, torch.version.cuda set and a CUDA toolkit found
#   (CUDA_HOME): csrc/exit_step.cpp + csrc/cuda/exit_step.cu, archs from
#   BRANCHYNET_CUDA_ARCH (default "8.0;9.0") unless TORCH_CUDA_ARCH_LIST is set.
# CPU build: torch importable, no CUDA: csrc/exit_step.cpp only. It registers the ops with
#   CPU kernels so schema, fakes and opcheck are tested without a GPU. Optional: a compile
#   failure is a warning, the package works without it.
# No build: BRANCHYNET_SKIP_EXT=1, or no torch at build time (pip's isolated build
#   environment has none: `pip install --no-build-isolation .` builds the extension).


def _note(msg):
    print(f"branchynet setup: {msg}", file=sys.stderr)


def _toolkit_version(cuda_home):
    """'13.0' from `nvcc --version`, or None if it cannot be read."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _extension():
    """(ext_modules, cmdclass) for this machine; never raises for a missing torch or CUDA."""
    if os.environ.get("BRANCHYNET_SKIP_EXT", "0") not in ("", "0"):
        _note("BRANCHYNET_SKIP_EXT is set: building no extension (the PyTorch backend is used)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # ImportError, or a broken torch install
        _note(f"torch is not importable at build time ({type(err).__name__}: {err}): building no "
              "extension. To build branchynet._C against your torch, run "
              "`pip install --no-build-isolation .`")
        return [], {}

    sources = ["csrc/exit_step.cpp"]
    cxx = ["-O3"]
    macros = []
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    toolkit = _toolkit_version(cpp_extension.CUDA_HOME) if with_cuda else None
    if with_cuda and toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch refuses to build across CUDA major versions (a RuntimeError that would
        # fail `pip install`): build the CPU kernels instead and say why.
        _note(f"the CUDA toolkit at {cpp_extension.CUDA_HOME} is {toolkit} but torch was built "
              f"with CUDA {torch.version.cuda}: building the CPU kernels only")
        with_cuda = False
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("BRANCHYNET_CUDA_ARCH", "8.0;9.0"))
        sources.append("csrc/cuda/exit_step.cu")
        macros.append(("BRANCHYNET_WITH_CUDA", None))
        # No --use_fast_math: exp/log must stay accurate near the thresholds, and -ftz
        # would flush the tiny probabilities the entropy sums.
        ext = cpp_extension.CUDAExtension(
            "branchynet._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            optional=True)  # a failed compile is a warning: the package works without it
        _note(f"building branchynet._C with CUDA {torch.version.cuda} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        ext = cpp_extension.CppExtension(
            "branchynet._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx}, optional=True)
        _note(f"{why}: building branchynet._C with CPU kernels only")
    build = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [ext], {"build_ext": build}


EXT_MODULES, CMDCLASS = _extension()

setup(
    name="branchynet",
    version="0.1.0",
    description="BranchyNet early-exit inference for PyTorch, batched on the GPU with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ (the Triton sources) sits at the top level of the repository and installs as
    # branchynet.kernels; no top-level `kernels` package is installed.
    packages=find_packages(include=["branchynet", "branchynet.*"]) + ["branchynet.kernels"],
    package_dir={"branchynet.kernels": "kernels"},
    install_requires=["torch>=2.1", "numpy>=1.21"],
    extras_require={
        "demo": DEMO,
        "triton": TRITON,
        "test": TEST + DEMO,
    },
    entry_points={"console_scripts": ["branchynet=branchynet.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
