"""Finding a CUDA toolkit that can build the extension against the installed torch.

torch refuses to build across CUDA major versions, and links ``-lcudart`` from the
toolkit's ``lib64`` (or ``lib``). Without ``CUDA_HOME`` set, torch takes the folder above
the first ``nvcc`` on ``PATH``; a wrapper script there (``/usr/local/bin/nvcc``) gives
``/usr/local``, which has no ``libcudart``, and the link fails. So the toolkit is looked
for in torch's guess, in the folder ``nvcc`` itself says it runs from, and in
``/usr/local/cuda``, and each candidate is checked for an ``nvcc`` of torch's major
version and a ``libcudart`` to link against.

This file imports nothing of the package, nor torch (:mod:`branchynet._build` loads it
by path when ``setup.py`` loads that by path).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def nvcc_release(nvcc: str) -> str | None:
    """'13.0' from ``nvcc --version``, or None if it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def nvcc_root(nvcc: str) -> str | None:
    """The toolkit folder ``nvcc`` runs from (it may be a wrapper script elsewhere)."""
    try:
        # A dry run prints nvcc's variables without running anything: _HERE_ is its bin/.
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "c++", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return os.path.dirname(m.group(1)) if m else None


def cudart_dir(cuda_home: str) -> str | None:
    """The folder torch links ``-lcudart`` from for this toolkit, if it holds a libcudart.

    torch uses ``lib64``, or ``lib`` where there is no ``lib64`` (cpp_extension.library_paths).
    """
    lib = os.path.join(cuda_home, "lib64")
    if not os.path.isdir(lib) and os.path.isdir(os.path.join(cuda_home, "lib")):
        lib = os.path.join(cuda_home, "lib")
    for name in ("libcudart.so", "libcudart.dylib", "cudart.lib", "libcudart_static.a"):
        if os.path.exists(os.path.join(lib, name)):
            return lib
    return None


def find_toolkit(torch_cuda: str, env=None, which=shutil.which):
    """``(cuda_home, None)`` for a toolkit that can build against torch's CUDA, else
    ``(None, why)``.

    Args:
        torch_cuda: torch's CUDA version, e.g. ``"13.0"``.
        env: the environment to read CUDA_HOME / CUDA_PATH / PATH from (default os.environ).
        which: ``shutil.which``-like lookup (tests pass their own PATH through env).
    """
    env = os.environ if env is None else env
    explicit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if explicit:
        candidates = [explicit]  # the user's choice: no guessing past it
    else:
        candidates = []
        nvcc = which("nvcc", path=env.get("PATH"))
        if nvcc:
            candidates.append(os.path.dirname(os.path.dirname(nvcc)))  # torch's own guess
            real = nvcc_root(nvcc)
            if real:
                candidates.append(real)
        candidates.append("/usr/local/cuda")
    whys = []
    seen = set()
    for home in candidates:
        key = os.path.realpath(home)
        if key in seen:
            continue
        seen.add(key)
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.exists(nvcc):
            whys.append(f"{home}: no bin/nvcc")
            continue
        release = nvcc_release(nvcc)
        if release is None:
            whys.append(f"{home}: `nvcc --version` failed")
            continue
        if release.split(".")[0] != torch_cuda.split(".")[0]:
            whys.append(f"{home}: nvcc is CUDA {release} but torch was built with CUDA {torch_cuda}")
            continue
        if cudart_dir(home) is None:
            whys.append(f"{home}: CUDA {release} but no libcudart to link against in lib64/ or lib/")
            continue
        return home, None
    return None, "no usable CUDA toolkit (" + "; ".join(whys) + ")" if whys else "no CUDA toolkit found"
