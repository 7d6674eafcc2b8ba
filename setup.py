"""Build script. The package is Python plus the extension ``branchynet._C`` (csrc/): built
here when torch is importable at build time (CUDA + CPU kernels, or CPU kernels only),
otherwise on first use from the sources shipped in the package (branchynet/_build.py)."""

import json
import os
import shutil
import sys

from setuptools import find_packages, setup

# Triton is in the test extra because its kernels are tested on the CPU too, under
# TRITON_INTERPRET=1; its wheels exist for Linux only.
# 3.8 and 3.9 (the Triton of torch 2.14.1 and of 2.13) are the releases whose compiled
# kernels were checked free of spills (docs/backends.md, "Supported versions").
TRITON = ["triton>=3.8; platform_system == 'Linux'"]
DEMO = ["tqdm>=4.60", "matplotlib>=3.5", "mlxtend>=0.22", "scikit-learn>=1.0"]
# `branchynet serve`: HTTP (FastAPI on uvicorn) and Prometheus metrics. Small: in the test
# extra, so CI tests the HTTP server (httpx is the tests' and the load test's client).
# uvicorn[standard]: uvloop and httptools, the fast event loop and HTTP parser.
SERVE = ["fastapi>=0.100", "uvicorn[standard]>=0.23", "prometheus-client>=0.17"]
# `branchynet serve --ray`: Ray Serve replicas (~240 MB installed: not in the test extra).
RAY = ["ray[serve]>=2.10"] + SERVE
# Exits on Hugging Face models (tests/test_hf.py: tiny random configs, no downloads; about a
# minute on 2 cores, most of it in torch.export), so the tests install it too.
HF = ["transformers>=5.0"]
TEST = ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"] + TRITON + HF
# branchynet export --format onnx and its runner (pt2 and AOTInductor need only torch);
# ~40 MB of wheels, so the tests install them too (tests/test_deploy.py).
EXPORT = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"]


# --- the compiled extension branchynet._C ------------------------------------------------
#
# The plan lives in branchynet/_build.py, shared with the just-in-time build:
# CUDA build: a CUDA torch, a C++ compiler and a CUDA toolkit with nvcc of torch's CUDA
#   major version and a libcudart the linker can find: csrc/exit_step.cpp +
#   csrc/cuda/exit_step.cu, archs from BRANCHYNET_CUDA_ARCH (default "8.0;9.0") unless
#   TORCH_CUDA_ARCH_LIST is set. If it still fails to compile or link, the CPU build is
#   made in the same install.
# CPU build: torch and a C++ compiler: csrc/exit_step.cpp only. It registers the ops with
#   CPU kernels (the `cpp` backend), so schema, fakes and opcheck are tested without a GPU.
# No build: BRANCHYNET_SKIP_EXT=1, or no torch at build time (pip's isolated build
#   environment has none): the sources ship in the package (branchynet/csrc) and
#   branchynet builds them on first use against the torch installed then.
# BRANCHYNET_REQUIRE_EXT=1 (CI): a failed build, or a fallback, fails the install.


def _note(msg):
    # Shown by `pip install -v` (pip hides a build's output otherwise); `branchynet info`
    # shows the same choice from the record written beside the module.
    print(f"branchynet setup: {msg}", file=sys.stderr)


def _load_build_module():
    """branchynet/_build.py by path: the package itself imports torch."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "branchynet", "_build.py")
    spec = importlib.util.spec_from_file_location("_branchynet_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension():
    """(ext_modules, cmdclass) for this machine; never raises for a missing torch or CUDA."""
    bb = _load_build_module()
    try:
        skip, require = bb.env_flag(bb.ENV_SKIP), bb.env_flag(bb.ENV_REQUIRE)
    except ValueError as err:  # a switch that is neither on nor off: say which
        raise SystemExit(f"branchynet setup: {err}") from None
    if skip:
        _note(f"{bb.ENV_SKIP} is set: building no extension (branchynet builds it on first use, "
              "or run `branchynet build`)")
        return [], {}
    try:
        import torch  # noqa: F401
    except Exception as err:  # ImportError, or a broken torch install
        _note(f"torch is not importable at build time ({type(err).__name__}: {err}): building no "
              "extension now; branchynet builds it against your torch on first use "
              "(`branchynet build` does it ahead of time; `pip install --no-build-isolation .` "
              "builds it during the install)")
        return [], {}
    attempts, why = bb.plan(jit=False)
    if not attempts:
        if require:
            raise SystemExit(f"branchynet setup: {bb.ENV_REQUIRE} is set but {why}")
        _note(f"{why}: building no extension (the exit op runs as PyTorch ops)")
        return [], {}
    from torch.utils import cpp_extension

    if attempts[0]["kind"] == "cuda":
        bb.use_toolkit(attempts[0]["cuda_home"])  # the toolkit the plan checked, not torch's guess
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("BRANCHYNET_CUDA_ARCH", bb.DEFAULT_CUDA_ARCH))

    exts = []
    for a in attempts:
        if a["kind"] == "cuda":
            ext = cpp_extension.CUDAExtension(
                "branchynet._C", bb.sources("csrc", cuda=True), define_macros=[("BRANCHYNET_WITH_CUDA", None)],
                extra_compile_args={"cxx": list(bb.CXX_FLAGS), "nvcc": list(bb.NVCC_FLAGS)})
        else:
            ext = cpp_extension.CppExtension(
                "branchynet._C", bb.sources("csrc", cuda=False), extra_compile_args={"cxx": list(bb.CXX_FLAGS)})
        ext.branchynet_kind = a["kind"]
        # BuildExt handles every failure itself; optional only spares the --inplace copy
        # a missing file. Under BRANCHYNET_REQUIRE_EXT, setuptools must not swallow one.
        ext.optional = not require
        exts.append(ext)

    class BuildExt(cpp_extension.BuildExtension):
        """Builds the first planned extension that compiles and links: CUDA, else CPU."""

        built = None
        errors = []

        def build_extension(self, ext):
            kind = ext.branchynet_kind
            if self.built is not None:
                return  # the CUDA build made it: no CPU-only fallback
            first = ext is exts[0]
            reason = why if first else f"the CUDA build failed: {self.errors[-1]}"
            build_temp = self.build_temp
            if not first:  # own objects: exit_step.cpp was compiled with CUDA macros above
                self.build_temp = os.path.join(build_temp, kind)
            try:
                if first:
                    what = f"CUDA {torch.version.cuda} and CPU" if kind == "cuda" else "CPU"
                    _note(f"building branchynet._C with {what} kernels ({reason})")
                super().build_extension(ext)
            except Exception as err:
                self.errors.append(f"{type(err).__name__}: {err}")
                if require:
                    raise
                last = ext is exts[-1]
                _note(f"the {kind} build failed ({self.errors[-1]}); "
                      + ("building the CPU kernels" if not last else
                         "no extension: branchynet retries on first use, or run `branchynet build`"))
                return
            finally:
                self.build_temp = build_temp
            self.built = kind
            if not first:
                _note(f"built branchynet._C with CPU kernels ({reason})")
            out = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), bb.RECORD)
            with open(out, "w") as fh:
                # The sources' hash: a _C built from other sources is not loaded (its op
                # registrations may clash with this package's, which would abort the process).
                # Size and sha256 of the module: a truncated or replaced file is refused
                # before it is mapped (a truncated one would be SIGBUS at import).
                size, sha = bb.file_digest(self.get_ext_fullpath(ext.name))
                json.dump(bb.record(kind, "ahead of time", reason, source=bb.source_hash("csrc"),
                                    file=os.path.basename(self.get_ext_fullpath(ext.name)), size=size,
                                    sha256=sha), fh)

        def copy_extensions_to_source(self):
            # --inplace / editable: the record goes beside the module it describes.
            super().copy_extensions_to_source()
            built = os.path.join(self.build_lib, "branchynet", bb.RECORD)
            if os.path.exists(built):
                dest = self.get_finalized_command("build_py").get_package_dir("branchynet")
                shutil.copyfile(built, os.path.join(dest, bb.RECORD))

    return exts, {"build_ext": BuildExt.with_options(use_ninja=cpp_extension.is_ninja_available())}


EXT_MODULES, CMDCLASS = _extension()

setup(
    name="branchynet",
    version="0.1.0",
    description="BranchyNet early-exit inference for PyTorch, batched on the GPU with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ (the Triton sources) sits at the top level of the repository and installs as
    # branchynet.kernels; no top-level `kernels` package is installed. csrc/ ships as
    # branchynet/csrc (data only) for the just-in-time build.
    packages=find_packages(include=["branchynet", "branchynet.*"])
    + ["branchynet.kernels", "branchynet.csrc", "branchynet.csrc.cuda"],
    package_dir={"branchynet.kernels": "kernels", "branchynet.csrc": "csrc"},
    package_data={"branchynet.csrc": ["*.cpp", "*.h"], "branchynet.csrc.cuda": ["*.cu", "*.cuh"]},
    # ninja: torch.utils.cpp_extension.load needs it for the just-in-time build.
    # torch: the oldest release the suite runs on in CI (docs/backends.md, "Supported versions").
    install_requires=["torch>=2.13", "numpy>=1.21", "ninja"],
    extras_require={
        "demo": DEMO,
        "triton": TRITON,
        "serve": SERVE,
        "ray": RAY,
        "hf": HF,
        "export": EXPORT,
        "test": TEST + DEMO + SERVE + EXPORT + ["httpx>=0.24"],
    },
    entry_points={"console_scripts": ["branchynet=branchynet.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
