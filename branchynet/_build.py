"""Building the compiled extension ``branchynet._C``: ahead of time and just in time.

One plan for both, in one file (over 500 lines for that reason): ``setup.py`` loads this
file by path (it imports nothing of the package, and torch only inside functions) to build the extension while installing when
torch is there at build time; :func:`load_extension` builds it on first use with
``torch.utils.cpp_extension.load`` (ninja) when it is not, from the sources shipped in
the package (``branchynet/csrc`` in a wheel, ``csrc/`` in a source checkout).

What each build needs, decided up front:

- CUDA kernels (and the CPU ones): a torch built with CUDA, a C++ compiler, and a CUDA
  toolkit whose ``nvcc`` has torch's CUDA major version (torch refuses to build across
  major versions) and whose ``libcudart`` the linker can find. Without ``CUDA_HOME`` set,
  torch takes the folder above the first ``nvcc`` on ``PATH``; a wrapper script there
  (``/usr/local/bin/nvcc``) gives ``/usr/local``, which has no ``libcudart``, and the link
  fails. So the toolkit is looked for in torch's guess, in the folder ``nvcc`` itself says
  it runs from, and in ``/usr/local/cuda``. Just in time, the CUDA kernels are built only
  where a GPU is visible: they cannot run otherwise, and nvcc costs minutes.
- CPU kernels only: torch and a C++ compiler. This is also the fallback when a CUDA build
  fails to compile or link.

Environment variables:

- ``BRANCHYNET_SKIP_EXT=1``: setup.py builds no extension.
- ``BRANCHYNET_REQUIRE_EXT=1``: a build that fails, or falls back, is an error (CI sets
  it, so a broken extension fails the install instead of landing as a fallback).
- ``BRANCHYNET_JIT=0``: no build on first use (the ``torch`` backend is used).
- ``BRANCHYNET_CACHE``: where just-in-time builds are kept (default
  ``~/.cache/branchynet``), one folder per torch version, Python, kind and source hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time

log = logging.getLogger("branchynet.build")

ENV_SKIP = "BRANCHYNET_SKIP_EXT"
ENV_REQUIRE = "BRANCHYNET_REQUIRE_EXT"
ENV_JIT = "BRANCHYNET_JIT"
ENV_CACHE = "BRANCHYNET_CACHE"

MODULE = "branchynet._C"
RECORD = "_C_build.json"  # beside an ahead-of-time _C: which build was made and why
CXX_FLAGS = ["-O3"]
# No --use_fast_math: exp/log must stay accurate near the thresholds, and -ftz would
# flush the tiny probabilities the entropy sums.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_CUDA_ARCH = "8.0;9.0"

_HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    """True when the variable is set to anything but empty or ``0``."""
    return os.environ.get(name, "0") not in ("", "0")


# --- sources ----------------------------------------------------------------------------

def csrc_dir(package_dir: str = _HERE) -> str | None:
    """The C++/CUDA sources: ``<package>/csrc`` (wheel) or ``<package>/../csrc`` (checkout)."""
    for d in (os.path.join(package_dir, "csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(d, "exit_step.cpp")):
            return d
    return None


def sources(root: str, cuda: bool) -> list:
    """Translation units of one build: ``*.cpp`` in ``root``, plus ``cuda/*.cu`` for CUDA."""
    out = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".cpp"))
    cu = os.path.join(root, "cuda")
    if cuda and os.path.isdir(cu):
        out += sorted(os.path.join(cu, f) for f in os.listdir(cu) if f.endswith(".cu"))
    return out


def source_hash(root: str) -> str:
    """sha256 over every source and header under ``root`` (names and bytes)."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith((".cpp", ".h", ".cu", ".cuh", ".hpp")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, root).replace(os.sep, "/").encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read() + b"\0")
    return h.hexdigest()


# --- the plan ---------------------------------------------------------------------------

def _nvcc_release(nvcc: str) -> str | None:
    """'13.0' from ``nvcc --version``, or None if it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_root(nvcc: str) -> str | None:
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
            real = _nvcc_root(nvcc)
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
        release = _nvcc_release(nvcc)
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


def cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def plan(jit: bool, env=None) -> tuple:
    """``(attempts, why)``: the builds to try, best first, and why the best is what it is.

    Each attempt is ``{"kind": "cuda" | "cpu", "cuda_home": str | None}``. A CUDA attempt
    is followed by a CPU one (the fallback when nvcc or the link fails). ``attempts`` is
    empty when nothing can be built (no C++ compiler).
    """
    import torch

    if cxx_compiler() is None:
        return [], "no C++ compiler found (set CXX, or install g++)"
    cpu = {"kind": "cpu", "cuda_home": None}
    if torch.version.cuda is None:
        return [cpu], f"torch {torch.__version__} has no CUDA"
    if jit and not torch.cuda.is_available():
        return [cpu], "no GPU visible: CUDA kernels would not run here"
    home, why = find_toolkit(torch.version.cuda, env)
    if home is None:
        return [cpu], why
    return [{"kind": "cuda", "cuda_home": home}, cpu], f"CUDA toolkit at {home}"


def use_toolkit(cuda_home: str) -> None:
    """Make torch.utils.cpp_extension build with this toolkit (it reads CUDA_HOME once,
    at import)."""
    os.environ["CUDA_HOME"] = cuda_home
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None:
        mod.CUDA_HOME = cuda_home


def record(kind: str | None, how: str, why: str, **extra) -> dict:
    """What was built, how and why, as stored beside the module and shown by ``info``."""
    import torch

    return {"kind": kind, "how": how, "why": why, "torch": torch.__version__, **extra}


def describe(rec: dict | None) -> str:
    """One line for ``branchynet info``."""
    if not rec:
        return "unknown (built without a record)"
    kinds = {"cuda": "CUDA + CPU kernels", "cpu": "CPU kernels", None: "none"}
    text = f"{kinds.get(rec.get('kind'), rec.get('kind'))}, {rec.get('how')}"
    if rec.get("why"):
        text += f" ({rec['why']})"
    if rec.get("path"):
        text += f"; {rec['path']}"
    return text


# --- just in time -----------------------------------------------------------------------

def cache_root() -> str:
    base = os.environ.get(ENV_CACHE)
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                            "branchynet")
    return base


def _cuda_arch_list() -> str:
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps) or os.environ.get("BRANCHYNET_CUDA_ARCH", DEFAULT_CUDA_ARCH)


def build_dir(attempt: dict, root: str) -> tuple:
    """``(folder, module name)`` of one just-in-time build: one per torch version, Python,
    kind and hash of sources + flags + toolkit, so two versions never share a module."""
    import torch

    h = hashlib.sha256(source_hash(root).encode())
    key = [attempt["kind"], torch.__version__, sys.implementation.cache_tag, CXX_FLAGS]
    if attempt["kind"] == "cuda":
        nvcc = os.path.join(attempt["cuda_home"], "bin", "nvcc")
        key += [NVCC_FLAGS, attempt["cuda_home"], _nvcc_release(nvcc), _cuda_arch_list()]
    h.update(json.dumps(key).encode())
    digest = h.hexdigest()[:16]
    folder = os.path.join(cache_root(), f"torch-{torch.__version__}-{sys.implementation.cache_tag}",
                          f"{attempt['kind']}-{digest}")
    return folder, f"branchynet_C_{attempt['kind']}_{digest}"


def _import_built(folder: str, name: str):
    import importlib.util

    import torch  # noqa: F401  (the module links against libtorch, loaded by torch)

    for f in os.listdir(folder):
        if f.startswith(name + ".") and f.endswith((".so", ".pyd")):
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise ImportError(f"no built module {name} in {folder}")


class _Lock:
    """An exclusive lock on ``path``, released by the OS if the holder dies (fcntl), so a
    build killed halfway never leaves the next process waiting forever."""

    def __init__(self, path: str):
        self.path = path
        self.fh = None

    def acquire(self, on_wait=None) -> None:
        self.fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # Windows: torch's own file baton in the build folder serialises
            return
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait:
                on_wait()
            fcntl.flock(self.fh, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing drops the flock
            self.fh = None


def _ninja_on_path() -> None:
    """torch's load() runs `ninja` from PATH; a venv used without activation has it only
    beside its python or in the ninja package."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in dirs:
        if os.path.exists(os.path.join(d, "ninja")) or os.path.exists(os.path.join(d, "ninja.exe")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def jit_build(attempt: dict, root: str, *, force: bool = False, why: str = ""):
    """Build (or load from the cache) one attempt. Returns ``(module, record)``; raises
    on a failed build, after writing the compiler's output to ``<folder>/failed.log``.

    Safe when several processes start at once on an empty cache: one builds under the
    lock, the others wait for it and load its module.
    """
    folder, name = build_dir(attempt, root)
    os.makedirs(folder, exist_ok=True)
    done = os.path.join(folder, "built.json")
    failed = os.path.join(folder, "failed.log")
    lock = _Lock(os.path.join(folder, "branchynet.lock"))
    lock.acquire(on_wait=lambda: log.warning(
        "branchynet: waiting for another process building the extension in %s", folder))
    try:
        if force:  # a rebuild from scratch: ninja would find its old outputs up to date
            for f in os.listdir(folder):
                path = os.path.join(folder, f)
                if f != "branchynet.lock":
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if os.path.exists(done):
            with open(done) as fh:
                rec = json.load(fh)
            return _import_built(folder, name), rec
        if os.path.exists(failed) and not force:
            raise RuntimeError(f"an earlier build failed (see {failed}; `branchynet build` retries)")
        import torch
        from torch.utils import cpp_extension

        kind = "CUDA + CPU" if attempt["kind"] == "cuda" else "CPU"
        log.warning("branchynet: building the compiled exit-op kernels (%s) for torch %s on first "
                    "use, once (about a minute on 2 cores; %s); cached in %s. `branchynet build` "
                    "does this ahead of time, %s=0 turns it off.",
                    kind, torch.__version__, why, folder, ENV_JIT)
        stale = os.path.join(folder, "lock")  # torch's baton, left by a killed build
        if os.path.exists(stale):
            os.remove(stale)
        _ninja_on_path()
        cuda = attempt["kind"] == "cuda"
        if cuda:
            use_toolkit(attempt["cuda_home"])
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list())
        t0 = time.perf_counter()
        try:
            mod = cpp_extension.load(
                name, sources(root, cuda),
                extra_cflags=CXX_FLAGS + (["-DBRANCHYNET_WITH_CUDA"] if cuda else []),
                extra_cuda_cflags=NVCC_FLAGS if cuda else None, build_directory=folder,
                with_cuda=cuda, verbose=False)
        except BaseException as err:
            with open(failed, "w") as fh:
                fh.write(f"{type(err).__name__}: {err}\n")
            raise
        rec = record(attempt["kind"], "just in time", why, path=folder, module=name,
                     source=source_hash(root), seconds=round(time.perf_counter() - t0, 1))
        tmp = done + f".{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(rec, fh)
        os.replace(tmp, done)
        if os.path.exists(failed):
            os.remove(failed)
        log.warning("branchynet: built in %.0f s", rec["seconds"])
        return mod, rec
    finally:
        lock.release()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def build(*, force: bool = False, root: str | None = None):
    """Build the best extension this machine allows, just in time, falling back from CUDA
    to CPU kernels. Returns ``(module or None, record)``."""
    root = root or csrc_dir()
    if root is None:
        return None, record(None, "just in time", "the C++ sources are not shipped with this install")
    attempts, why = plan(jit=True)
    if not attempts:
        return None, record(None, "just in time", why)
    errors = []
    for i, attempt in enumerate(attempts):
        reason = why if i == 0 else f"the CUDA build failed: {errors[-1]}"
        try:
            mod, rec = jit_build(attempt, root, force=force, why=reason)
            return mod, rec
        except Exception as err:
            errors.append(_first_line(err))
            log.warning("branchynet: the %s build failed (%s)%s", attempt["kind"], errors[-1],
                        "; trying the CPU kernels" if i + 1 < len(attempts) else
                        "; the exit op runs as PyTorch ops")
    return None, record(None, "just in time", "; ".join(errors))


_CHILD_BUILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("branchynet_build", sys.argv[1])
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
mod, rec = b.build(force=True)
print(("built: " if mod is not None else "no extension: ") + b.describe(rec))
sys.exit(0 if mod is not None else 1)
"""


def build_in_subprocess() -> int:
    """``build(force=True)`` in a fresh interpreter; its exit status. For a process that
    has an extension loaded already: importing a second one in it would register the
    same ops twice. This file imports nothing of the package (as in setup.py)."""
    return subprocess.run([sys.executable, "-c", _CHILD_BUILD, os.path.abspath(__file__)]).returncode


def cached(root: str | None = None):
    """``(module, record)`` of a finished just-in-time build of these sources for this
    torch and Python, or ``(None, None)``; never builds (import time). CUDA kernels are
    preferred where a GPU is visible.

    Only the folder of the current plan (:func:`build_dir`: sources, flags, and for CUDA
    the toolkit and architectures) counts: a build for another toolkit or GPU is not it.
    """
    root = root or csrc_dir()
    if root is None:
        return None, None
    attempts, _ = plan(jit=True)
    for attempt in attempts or [{"kind": "cpu", "cuda_home": None}]:
        folder, name = build_dir(attempt, root)
        try:
            with open(os.path.join(folder, "built.json")) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            continue
        try:
            return _import_built(folder, name), rec
        except Exception as err:  # a cache entry that does not load: rebuilt on first use
            log.debug("branchynet: cached build in %s not loaded (%s)", folder, err)
    return None, None


# --- what the package uses --------------------------------------------------------------

_STATE = {"record": None, "jit_tried": False, "jit": None}
_JIT_LOCK = threading.Lock()


def _install_as_C(mod) -> None:
    # `from branchynet import _C` then finds the built module wherever it came from.
    sys.modules[MODULE] = mod
    pkg = sys.modules.get("branchynet")
    if pkg is not None:
        setattr(pkg, "_C", mod)


def _stale_sources(rec: dict | None) -> str | None:
    """Why an ahead-of-time ``_C`` with this record was built from other sources than the
    ones shipped here, or None (the same sources, or none shipped to compare with)."""
    root = csrc_dir()
    if rec is None or root is None:
        return None
    if "source" not in rec:
        return "the sources of an older branchynet (its record has no source hash)"
    if rec["source"] != source_hash(root):
        return f"other sources than {root} (changed since the build)"
    return None


def _aot_record(folder: str):
    """The record written beside an ahead-of-time ``_C`` (which build, for which torch), or None."""
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def load_extension(build_if_missing: bool):
    """The extension module for this process, or None: the ahead-of-time ``_C``, else a
    cached just-in-time build, else (``build_if_missing``, once per process, unless
    ``BRANCHYNET_JIT=0``) a new just-in-time build.

    Returns ``(module or None, why it is missing or None)``.
    """
    import importlib
    import importlib.util

    aot_error = None
    try:
        spec = importlib.util.find_spec(MODULE)
        # Only this package's own module: another install's _C (an editable checkout
        # elsewhere on the path) may be built from other sources.
        if spec is None or not spec.origin or os.path.dirname(os.path.abspath(spec.origin)) != _HERE:
            raise ModuleNotFoundError(f"No module named {MODULE!r}", name=MODULE)
        rec = _aot_record(os.path.dirname(os.path.abspath(spec.origin)))
        import torch

        if rec and rec.get("torch") not in (None, torch.__version__):
            # The C++ ABI changes between torch releases: importing a _C built for another
            # torch can crash the process rather than raise, so it is not even tried.
            raise ImportError(f"branchynet._C was built for torch {rec['torch']}, this is torch "
                              f"{torch.__version__}")
        stale = _stale_sources(rec)
        if stale:
            # Nor one built from other sources (a checkout updated without a rebuild): an
            # older _C defines the op schemas itself, and two definitions abort the process.
            raise ImportError(f"branchynet._C was built from {stale}")
        mod = importlib.import_module(MODULE)
        _STATE["record"] = rec or record("cuda" if mod.has_cuda() else "cpu", "ahead of time", "")
        return mod, None
    except ModuleNotFoundError as err:
        if err.name != MODULE:
            aot_error = f"{type(err).__name__}: {err}"
    except Exception as err:  # built for another torch (ABI), or a broken build
        aot_error = f"{type(err).__name__}: {err}"
    if aot_error:
        log.warning("branchynet: the installed extension does not load (%s); a just-in-time "
                    "build replaces it", aot_error)
    mod, rec = cached()
    if mod is not None:
        _install_as_C(mod)
        _STATE["record"] = rec
        return mod, None
    missing = aot_error or "branchynet._C is not installed"
    if not build_if_missing:
        return None, missing
    with _JIT_LOCK:  # one build per process: a second thread waits for the first one's result
        if _STATE["jit_tried"]:
            return _STATE["jit"] or (None, missing)
        if os.environ.get(ENV_JIT, "1").strip() == "0":
            _STATE["record"] = record(None, "just in time", f"turned off by {ENV_JIT}=0")
            return None, f"{missing}; just-in-time build turned off by {ENV_JIT}=0"
        mod, rec = build()
        _STATE["record"] = rec
        if mod is None:
            _STATE["jit"] = (None, f"{missing}; just-in-time build: {rec['why']}")
        else:
            _install_as_C(mod)
            _STATE["jit"] = (mod, None)
        _STATE["jit_tried"] = True
        return _STATE["jit"]


def build_record() -> dict | None:
    """The record of the extension this process loaded or tried to build."""
    return _STATE["record"]
