"""Building the compiled extension ``branchynet._C``: ahead of time and just in time.

One plan for both, in one file: ``setup.py`` loads this file by path (it imports nothing
of the package but its sibling files, and torch only inside functions) to build the extension while installing when
torch is there at build time; :func:`load_extension` builds it on first use with
``torch.utils.cpp_extension.load`` (ninja) when it is not, from the sources shipped in
the package (``branchynet/csrc`` in a wheel, ``csrc/`` in a source checkout).

What each build needs, decided up front:

- CUDA kernels (and the CPU ones): a torch built with CUDA, a C++ compiler, and a CUDA
  toolkit whose ``nvcc`` has torch's CUDA major version and whose ``libcudart`` the
  linker can find (:mod:`branchynet._toolkit` finds it). Just in time, the CUDA kernels
  are built only where a GPU is visible: they cannot run otherwise, and nvcc costs minutes.
- CPU kernels only: torch and a C++ compiler. This is also the fallback when a CUDA build
  fails to compile or link.

Environment variables (the switches take 0/1, false/true, off/on, no/yes: :func:`env_flag`):

- ``BRANCHYNET_SKIP_EXT=1``: setup.py builds no extension.
- ``BRANCHYNET_REQUIRE_EXT=1``: a build that fails, or falls back, is an error (CI sets
  it, so a broken extension fails the install instead of landing as a fallback).
- ``BRANCHYNET_JIT=0``: no build on first use (the ``torch`` backend is used).
- ``BRANCHYNET_CACHE``: where just-in-time builds are kept (default
  ``~/.cache/branchynet``), one folder per torch version, Python, kind and source hash;
  what of it is loaded, and where it is without a home: :mod:`branchynet._cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time



def _sibling(name: str):
    """``branchynet.<name>``, also when this file is loaded by path (setup.py, the build
    subprocess: no package around it), then from the file beside it."""
    import importlib
    import importlib.util

    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    spec = importlib.util.spec_from_file_location(
        f"_branchynet{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_cache = _sibling("_cache")
_toolkit = _sibling("_toolkit")
cudart_dir, find_toolkit, _nvcc_release = _toolkit.cudart_dir, _toolkit.find_toolkit, _toolkit.nvcc_release

log = logging.getLogger("branchynet.build")

ENV_SKIP = "BRANCHYNET_SKIP_EXT"
ENV_REQUIRE = "BRANCHYNET_REQUIRE_EXT"
ENV_JIT = "BRANCHYNET_JIT"
ENV_CACHE = _cache.ENV_CACHE
file_digest = _cache.file_digest  # (size, sha256) of a module file: setup.py records it

MODULE = "branchynet._C"
RECORD = "_C_build.json"  # beside an ahead-of-time _C: which build was made and why
CXX_FLAGS = ["-O3"]
# No --use_fast_math: exp/log must stay accurate near the thresholds, and -ftz would
# flush the tiny probabilities the entropy sums.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_CUDA_ARCH = "8.0;9.0"

_HERE = os.path.dirname(os.path.abspath(__file__))


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable: 1/true/on/yes or 0/false/off/no (any case);
    ``default`` when unset or empty. Anything else is an error naming the variable (a
    typo must not silently mean the opposite)."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"environment variable {name} must be one of 0/1, false/true, off/on, no/yes, "
                     f"got {value!r}")


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

def cache_root() -> str | None:
    """Where just-in-time builds are kept, or None (no usable cache): see :mod:`branchynet._cache`."""
    return _cache.cache_root()


def _cuda_arch_list() -> str:
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps) or os.environ.get("BRANCHYNET_CUDA_ARCH", DEFAULT_CUDA_ARCH)


def build_key(attempt: dict, root: str) -> dict:
    """What a build of ``attempt`` from the sources in ``root`` is for, as its record must
    name it: kind, torch, Python, the sources' hash, the flags (for CUDA also the toolkit
    and architectures), and ``digest``, a hash of all of it that names its folder."""
    import torch

    src = source_hash(root)
    flags = {"cxx": CXX_FLAGS}
    key = [attempt["kind"], torch.__version__, sys.implementation.cache_tag, CXX_FLAGS]
    if attempt["kind"] == "cuda":
        nvcc = os.path.join(attempt["cuda_home"], "bin", "nvcc")
        cuda = [NVCC_FLAGS, attempt["cuda_home"], _nvcc_release(nvcc), _cuda_arch_list()]
        key += cuda
        flags = {**flags, "nvcc": cuda}
    h = hashlib.sha256(src.encode())
    h.update(json.dumps(key).encode())
    # Through JSON and back, as a record read from disk will have it (lists, not tuples).
    return json.loads(json.dumps({"kind": attempt["kind"], "torch": torch.__version__,
                                  "python": sys.implementation.cache_tag, "source": src, "flags": flags,
                                  "digest": h.hexdigest()[:16]}))


def _locate(attempt: dict, root: str, create: bool = False) -> tuple:
    """``(folder or None, module name, key)``; the folder is None when there is no cache."""
    key = build_key(attempt, root)
    base = cache_root() if not create else _cache.cache_root(create=True)
    name = f"branchynet_C_{attempt['kind']}_{key['digest']}"
    if base is None:
        return None, name, key
    folder = os.path.join(base, f"torch-{key['torch']}-{key['python']}", f"{attempt['kind']}-{key['digest']}")
    return folder, name, key


def build_dir(attempt: dict, root: str) -> tuple:
    """``(folder, module name)`` of one just-in-time build: one per torch version, Python,
    kind and hash of sources + flags + toolkit, so two versions never share a module.
    The folder is None when there is no usable cache. A build refused there is made in a
    fresh sibling folder, ``<folder>-<random>`` (:func:`jit_build`)."""
    folder, name, _ = _locate(attempt, root)
    return folder, name


def seal(attempt: dict, root: str, module_path: str, *, why: str = "", how: str = "just in time",
         **extra) -> dict:
    """The record of a finished build of ``module_path``: :func:`record` with the build's
    key (:func:`build_key`) and the module file's name, size and sha256, which a later
    load checks before mapping the file."""
    key = build_key(attempt, root)
    size, sha = _cache.file_digest(module_path)
    return {**record(attempt["kind"], how, why, **extra), **key, "path": os.path.dirname(module_path),
            "module": f"branchynet_C_{attempt['kind']}_{key['digest']}",
            "file": os.path.basename(module_path), "size": size, "sha256": sha}


def _import_built(folder: str, name: str):
    import importlib.util

    import torch  # noqa: F401  (the module links against libtorch, loaded by torch)

    path = _cache.module_file(folder, name)
    if path is None:
        raise ImportError(f"no built module {name} in {folder}")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    lock, the others wait for it and load its module. A cached build that fails the
    checks of :func:`branchynet._cache.check_build` is never loaded: it is rebuilt in a
    fresh folder. Without a usable cache the build goes to a private temporary folder.
    """
    folder, name, key = _locate(attempt, root, create=True)
    if folder is not None:
        try:
            _cache.make_private_dir(os.path.dirname(folder))
        except (OSError, _cache.Untrusted) as err:
            _cache.warn_once(("root", os.path.dirname(folder)), "branchynet: not caching the build (%s)", err)
            folder = None
    if folder is None:  # for this process only: nothing of it is kept (the module stays mapped)
        scratch = tempfile.mkdtemp(prefix=f"branchynet-{attempt['kind']}-")
        try:
            return _compile(attempt, root, scratch, name, why)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    lock = _cache.Lock(folder + ".lock")
    lock.acquire(on_wait=lambda: log.warning(
        "branchynet: waiting for another process building the extension in %s", folder))
    try:
        if not force:
            found = _cache.find_valid(folder, name, key)
            mod = _load_valid(os.path.dirname(found[0]), name) if found is not None else None
            if mod is not None:
                return mod, found[1]
            failed = os.path.join(folder, "failed.log")
            try:
                _cache.check_dir(folder)
                if os.path.exists(failed) and not os.path.lexists(os.path.join(folder, _cache.DONE)):
                    raise RuntimeError(f"an earlier build failed (see {failed}; `branchynet build` retries)")
            except (OSError, _cache.Untrusted):
                pass  # missing, or not ours: a fresh folder
        return _compile(attempt, root, _cache.fresh_folder(folder, force), name, why)
    finally:
        lock.release()


def _compile(attempt: dict, root: str, folder: str, name: str, why: str) -> tuple:
    """Compile and load ``attempt`` in ``folder`` (ours, private); seal it with its record."""
    import torch
    from torch.utils import cpp_extension

    failed = os.path.join(folder, "failed.log")
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
    so = _cache.module_file(folder, name)
    if so is None:
        raise RuntimeError(f"the build of {name} left no module file in {folder}")
    for dirpath, dirnames, files in os.walk(folder):  # whatever the umask: nobody else writes here
        for p in [dirpath] + [os.path.join(dirpath, f) for f in files]:
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) & ~0o022)
    rec = seal(attempt, root, so, why=why, seconds=round(time.perf_counter() - t0, 1))
    done = os.path.join(folder, _cache.DONE)
    tmp = done + f".{os.getpid()}"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w") as fh:
        json.dump(rec, fh)
    os.replace(tmp, done)  # last: a record names a finished build
    if os.path.exists(failed):
        os.remove(failed)
    log.warning("branchynet: built in %.0f s", rec["seconds"])
    return mod, rec


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
        folder, name, key = _locate(attempt, root)
        found = _cache.find_valid(folder, name, key) if folder is not None else None
        if found is not None:
            mod = _load_valid(os.path.dirname(found[0]), name)
            if mod is not None:
                return mod, found[1]
    return None, None


def _load_valid(folder: str, name: str):
    """Import a build that passed the checks, or None: one that still does not load (a
    link error) loses its record, so that the first use rebuilds it."""
    try:
        return _import_built(folder, name)
    except Exception as err:
        _cache.warn_once(("build", folder), "branchynet: the cached build in %s does not load (%s); it is "
                         "rebuilt on first use", folder, _first_line(err))
        try:
            os.remove(os.path.join(folder, _cache.DONE))
        except OSError:
            pass
        return None


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
        damaged = _cache.check_module(spec.origin, rec)
        if damaged:  # mapping a truncated file is SIGBUS, not an ImportError
            raise ImportError(f"branchynet._C is damaged: {damaged}")
        mod = importlib.import_module(MODULE)
        _STATE["record"] = rec or record("cuda" if mod.has_cuda() else "cpu", "ahead of time", "")
        return mod, None
    except ModuleNotFoundError as err:
        if err.name != MODULE:
            aot_error = f"{type(err).__name__}: {err}"
    except Exception as err:  # built for another torch (ABI), or a broken build
        aot_error = f"{type(err).__name__}: {err}"
    if aot_error:  # once: the import and the first use both come here
        _cache.warn_once(("aot", aot_error), "branchynet: the installed extension does not load (%s); a "
                         "just-in-time build replaces it", aot_error)
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
        if not env_flag(ENV_JIT, default=True):
            off = f"turned off by {ENV_JIT}={os.environ[ENV_JIT].strip()}"
            _STATE["record"] = record(None, "just in time", off)
            return None, f"{missing}; just-in-time build {off}"
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
