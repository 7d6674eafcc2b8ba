"""Build script. The package is pure Python; the CUDA extension ``branchynet._C`` is
built only where a CUDA torch and a CUDA toolkit are present (see csrc/)."""

from setuptools import find_packages, setup

TEST = ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"]
DEMO = ["tqdm>=4.60", "matplotlib>=3.5", "mlxtend>=0.22", "scikit-learn>=1.0"]

setup(
    name="branchynet",
    version="0.1.0",
    description="BranchyNet early-exit inference for PyTorch, batched on the GPU with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["branchynet", "branchynet.*"]),
    install_requires=["torch>=2.1", "numpy>=1.21"],
    extras_require={
        "demo": DEMO,
        "triton": ["triton>=3.0"],
        "test": TEST + DEMO,
    },
    entry_points={"console_scripts": ["branchynet=branchynet.cli:main"]},
)
