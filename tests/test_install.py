"""Installing branchynet: layout, the extension's build plan, fallbacks, just-in-time build.

- ``branchynet.kernels`` (top-level ``kernels/``) and the C++ sources (``csrc/``, shipped
  as ``branchynet/csrc``) are found from a wheel, an editable install and the repository
  root, and no top-level ``kernels`` or ``csrc`` is installed.
- The build plan: a CUDA build only with nvcc of torch's CUDA major version and a
  libcudart to link; a CUDA build that fails still ends with the CPU extension.
- The just-in-time build: two processes on an empty cache build once and both load it.
- Under ``BRANCHYNET_REQUIRE_EXT=1`` (CI) a missing or broken extension fails.

The builds are real (g++ against the installed torch): ~15-60 s each on 2 cores, hence
``slow`` (CI runs the slow tests too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import branchynet
from branchynet import _build

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 600


def _copy_checkout(dest: Path) -> Path:
    """The files an install reads, without built artefacts (so no _C)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "_C_build.json")
    for name in ("branchynet", "csrc", "kernels"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def _run(args, cwd, env=None, timeout=BUILD_TIMEOUT_S):
    full = {**os.environ, **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def _python(code, cwd, env=None, timeout=BUILD_TIMEOUT_S):
    return _run([sys.executable, "-c", code], cwd, env, timeout)


# --- layout: kernels/ and csrc/ as branchynet.kernels and branchynet/csrc -----------------

LAYOUT_PROBE = """
import importlib.util, json, branchynet, branchynet.kernels as k
from branchynet import _build
print(json.dumps({"pkg": branchynet.__file__, "kernels": k.__file__, "csrc": _build.csrc_dir(),
                  "top_kernels": getattr(importlib.util.find_spec("kernels"), "origin", None),
                  "top_csrc": getattr(importlib.util.find_spec("csrc"), "origin", None)}))
"""


def _from(origin, root) -> bool:
    """A top-level module found at ``origin`` (None: none found) comes from ``root``: the
    install under test, not another package of that name in the environment (the Hub's
    ``kernels``, which transformers brings)."""
    return origin is not None and Path(origin).resolve().is_relative_to(Path(root).resolve())


def _probe(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_layout_from_the_repository_root():
    assert Path(branchynet.__file__).parent == ROOT / "branchynet"
    got = _probe(_python(LAYOUT_PROBE, ROOT, {"BRANCHYNET_JIT": "0"}))
    assert Path(got["kernels"]) == ROOT / "kernels" / "__init__.py"
    assert Path(got["csrc"]) == ROOT / "csrc"


def test_layout_from_a_wheel(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "-w", str(tmp_path / "dist"), str(src)], tmp_path, {"BRANCHYNET_SKIP_EXT": "1"})
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("branchynet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("branchynet/kernels/__init__.py", "branchynet/kernels/exit_step.py",
                 "branchynet/csrc/exit_step.cpp", "branchynet/csrc/exit_step_checks.h",
                 "branchynet/csrc/cuda/exit_step.cu", "branchynet/_build.py"):
        assert want in names, want
    tops = {n.split("/")[0] for n in names}
    assert tops == {"branchynet", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _probe(_python(LAYOUT_PROBE, elsewhere, {"PYTHONPATH": str(site), "BRANCHYNET_JIT": "0"}))
    assert Path(got["pkg"]) == site / "branchynet" / "__init__.py"
    assert Path(got["kernels"]) == site / "branchynet" / "kernels" / "__init__.py"
    assert Path(got["csrc"]) == site / "branchynet" / "csrc"
    assert not _from(got["top_kernels"], site) and not _from(got["top_csrc"], site)


def _installed_here():
    """Where this interpreter's own branchynet distribution is, or None (a fresh process:
    importlib.metadata caches nothing across them)."""
    r = subprocess.run([sys.executable, "-c", "import importlib.metadata as m\ntry:\n"
                        "    print(m.distribution('branchynet')._path)\nexcept m.PackageNotFoundError:\n"
                        "    print(None)"], capture_output=True, text=True, cwd="/")
    return r.stdout.strip()


def test_layout_from_an_editable_install(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    prefix = tmp_path / "prefix"
    before = _installed_here()
    # --ignore-installed: with --prefix alone pip uninstalls the branchynet of this
    # interpreter's own site-packages (the install under test) before installing.
    r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
              "--ignore-installed", "-e", str(src), "--prefix", str(prefix)], tmp_path,
             {"BRANCHYNET_SKIP_EXT": "1"})
    assert r.returncode == 0, r.stderr
    assert _installed_here() == before  # the test leaves this interpreter's install alone
    site = sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix)})["purelib"]
    # -S: this interpreter's own site-packages may hold another editable branchynet (the
    # one under test); only the new install's .pth is read, torch is found by path.
    code = (f"import sys, site; site.addsitedir({site!r}); "
            f"sys.path += {sysconfig.get_paths()['purelib']!r}, {sysconfig.get_paths()['platlib']!r}\n"
            + LAYOUT_PROBE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run([sys.executable, "-S", "-c", code], elsewhere, {"BRANCHYNET_JIT": "0"})
    got = _probe(r)
    assert Path(got["pkg"]) == src / "branchynet" / "__init__.py"
    assert Path(got["kernels"]) == src / "kernels" / "__init__.py"
    assert Path(got["csrc"]) == src / "csrc"
    assert not _from(got["top_kernels"], src) and not _from(got["top_csrc"], src)


# --- the build plan -----------------------------------------------------------------------

def _stub_toolkit(root: Path, release="13.0", cudart=True, fail_compile=False) -> Path:
    """A CUDA toolkit folder whose nvcc prints a version (and _HERE_ on --dryrun) and
    fails on anything else when ``fail_compile``; with or without a libcudart."""
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "include").mkdir()
    if cudart:
        (root / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--dryrun*) echo "#\\$ _HERE_={root}/bin"; exit 0;;\n'
        f'  *--version*) echo "Cuda compilation tools, release {release}, V{release}.1"; exit 0;;\n'
        "esac\n"
        + ('echo "nvcc stub: cannot compile $*" >&2; exit 1\n' if fail_compile else "exit 0\n"))
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


def test_toolkit_without_libcudart_is_refused(tmp_path):
    # The newcomer's machine: CUDA_HOME (or torch's guess) is a compile-only toolkit.
    home = _stub_toolkit(tmp_path / "cuda", cudart=False)
    found, why = _build.find_toolkit("13.0", env={"CUDA_HOME": str(home)})
    assert found is None
    assert "no libcudart" in why and str(home) in why


def test_toolkit_of_another_major_version_is_refused(tmp_path):
    home = _stub_toolkit(tmp_path / "cuda", release="12.4")
    found, why = _build.find_toolkit("13.0", env={"CUDA_HOME": str(home)})
    assert found is None and "nvcc is CUDA 12.4 but torch was built with CUDA 13.0" in why


def test_toolkit_found_behind_a_wrapper_nvcc(tmp_path):
    # /usr/local/bin/nvcc as a wrapper script: torch's guess (/usr/local) has no
    # libcudart; the folder nvcc itself reports (its _HERE_) is the real toolkit.
    real = _stub_toolkit(tmp_path / "cuda-13.0")
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    (tmp_path / "local" / "lib").mkdir()
    wrapper = wrapper_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    found, why = _build.find_toolkit("13.0", env={"PATH": str(wrapper_bin)})
    assert found == str(real), why


def test_plan_for_a_cuda_torch_without_a_linkable_cudart(tmp_path, monkeypatch):
    home = _stub_toolkit(tmp_path / "cuda", cudart=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(home))
    attempts, why = _build.plan(jit=False)
    assert [a["kind"] for a in attempts] == ["cpu"]
    assert "no libcudart" in why
    good = _stub_toolkit(tmp_path / "cuda-good")
    monkeypatch.setenv("CUDA_HOME", str(good))
    attempts, why = _build.plan(jit=False)
    assert [a["kind"] for a in attempts] == ["cuda", "cpu"] and attempts[0]["cuda_home"] == str(good)


def test_plan_without_a_compiler(monkeypatch):
    monkeypatch.setattr(_build, "cxx_compiler", lambda: None)
    attempts, why = _build.plan(jit=True)
    assert attempts == [] and "no C++ compiler" in why


def test_cache_folder_depends_on_sources_and_kind(tmp_path, monkeypatch):
    monkeypatch.setenv(_build.ENV_CACHE, str(tmp_path / "cache"))
    src = _copy_checkout(tmp_path / "src") / "csrc"
    cpu = {"kind": "cpu", "cuda_home": None}
    folder, name = _build.build_dir(cpu, str(src))
    assert Path(folder).parent.name == f"torch-{torch.__version__}-{sys.implementation.cache_tag}"
    assert name.startswith("branchynet_C_cpu_") and name.isidentifier()
    assert _build.build_dir(cpu, str(src)) == (folder, name)
    with open(src / "exit_step.cpp", "a") as fh:
        fh.write("\n// changed\n")
    assert _build.build_dir(cpu, str(src))[0] != folder


def test_cached_loads_only_the_folder_of_the_current_plan(tmp_path, monkeypatch):
    # A finished build of the same sources under another digest (another toolkit, GPU
    # architecture or flags): `branchynet build` would write a new folder, and the
    # cache must not keep loading the old one.
    monkeypatch.setenv(_build.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "plan", lambda jit, env=None: ([{"kind": "cpu", "cuda_home": None}], "test"))
    src = str(_copy_checkout(tmp_path / "src") / "csrc")
    folder, name = _build.build_dir({"kind": "cpu", "cuda_home": None}, src)
    other = Path(folder).parent / "cpu-0123456789abcdef"
    other.mkdir(parents=True)
    rec = {"kind": "cpu", "how": "just in time", "source": _build.source_hash(src),
           "module": "branchynet_C_cpu_0123456789abcdef"}
    (other / "built.json").write_text(json.dumps(rec))
    loaded = []
    monkeypatch.setattr(_build, "_import_built", lambda f, n: loaded.append((f, n)) or f"module {n}")
    assert _build.cached(src) == (None, None) and loaded == []
    Path(folder).mkdir()
    (Path(folder) / "built.json").write_text(json.dumps({**rec, "module": name}))
    mod, got = _build.cached(src)
    assert loaded == [(folder, name)] and mod == f"module {name}" and got["module"] == name


def test_a_forced_build_rebuilds_from_scratch(tmp_path, monkeypatch):
    # `branchynet build --force` over a finished build: the old outputs go (ninja would
    # find them up to date) and the compiler runs again, instead of reloading the old module.
    from torch.utils import cpp_extension

    monkeypatch.setenv(_build.ENV_CACHE, str(tmp_path / "cache"))
    src = str(_copy_checkout(tmp_path / "src") / "csrc")
    cpu = {"kind": "cpu", "cuda_home": None}
    folder, name = _build.build_dir(cpu, src)
    Path(folder).mkdir(parents=True)
    (Path(folder) / "built.json").write_text(json.dumps({"kind": "cpu", "module": name}))
    (Path(folder) / f"{name}.so").write_text("the old build")
    seen = []

    def fake_load(n, sources, **kw):
        seen.append(sorted(os.listdir(kw["build_directory"])))
        return f"new {n}"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    mod, rec = _build.jit_build(cpu, src, force=True)
    assert mod == f"new {name}" and seen == [["branchynet.lock"]]
    assert json.loads((Path(folder) / "built.json").read_text())["source"] == _build.source_hash(src)


def test_build_force_with_an_extension_loaded_builds_in_a_new_process(monkeypatch, capsys):
    from branchynet.cli import main
    from branchynet.ops import _backends

    monkeypatch.setattr(_backends, "EXT", object())
    calls = []
    monkeypatch.setattr(_build, "build_in_subprocess", lambda: calls.append(1) or 0)
    assert main(["build"]) == 0 and calls == []
    assert "branchynet._C is there" in capsys.readouterr().out
    assert main(["build", "--force"]) == 0 and calls == [1]
    assert "restart them to use the new build" in capsys.readouterr().out
    monkeypatch.setattr(_build, "build_in_subprocess", lambda: 1)
    with pytest.raises(SystemExit, match="1"):
        main(["build", "--force"])


def _two_threads(call, started) -> dict:
    """``{0: call(), 1: call()}`` from two threads, the second started once the first has
    set ``started`` (it is inside the slow build), so both race for one build."""
    import threading

    seen = {}

    def run(i):
        seen[i] = call()

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=run, args=(1,))
    second.start()
    first.join(10)
    second.join(10)
    return seen


def test_load_extension_builds_once_and_a_second_thread_gets_the_build(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setattr(_build, "_HERE", str(tmp_path))  # the installed _C is not this package's
    monkeypatch.setattr(_build, "cached", lambda root=None: (None, None))
    monkeypatch.setattr(_build, "_install_as_C", lambda mod: None)
    monkeypatch.delenv(_build.ENV_JIT, raising=False)
    for key, value in (("record", None), ("jit_tried", False), ("jit", None)):
        monkeypatch.setitem(_build._STATE, key, value)
    started, calls, built = threading.Event(), [], object()

    def slow_build():
        calls.append(1)
        started.set()
        time.sleep(0.5)
        return built, {"kind": "cpu", "how": "just in time", "why": ""}

    monkeypatch.setattr(_build, "build", slow_build)
    seen = _two_threads(lambda: _build.load_extension(build_if_missing=True), started)
    assert calls == [1] and seen == {0: (built, None), 1: (built, None)}


def test_threads_wait_for_the_just_in_time_build(monkeypatch):
    # Two threads on a process whose extension is still being built: the second waits for
    # the build and sees the cpp backend, instead of settling on torch meanwhile.
    import threading
    import time

    from branchynet import ops
    from branchynet.ops import _backends

    real = ops._EXT
    if real is None:
        pytest.skip("no extension in this checkout")
    started, calls = threading.Event(), []

    def slow_build(build_if_missing):
        calls.append(build_if_missing)
        started.set()
        time.sleep(0.5)
        return real, None

    monkeypatch.setattr(_build, "load_extension", slow_build)
    monkeypatch.setattr(_backends, "EXT", None)  # monkeypatch puts the module state back afterwards
    monkeypatch.setattr(_backends, "EXT_ERROR", "not built yet")
    monkeypatch.setattr(_backends, "_EXT_TRIED", False)
    seen = _two_threads(lambda: ops.available_backends("cpu"), started)
    assert calls == [True]
    assert "cpp" in seen[0] and seen[1] == seen[0], seen


# --- builds (real compiles) ------------------------------------------------------------------

@pytest.mark.slow
def test_setup_falls_back_to_cpu_kernels_when_the_cuda_build_fails(tmp_path):
    """A CUDA torch with a toolkit whose nvcc cannot compile: the same install builds the
    CPU extension, which loads and says why (the newcomer's machine, one step further)."""
    src = _copy_checkout(tmp_path / "src")
    home = _stub_toolkit(tmp_path / "cuda", fail_compile=True)
    # Pretend torch has CUDA 13.0 (the CI torch is a CPU build) for setup.py only.
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text("import torch\ntorch.version.cuda = '13.0'\n")
    env = {"CUDA_HOME": str(home), "PYTHONPATH": str(tmp_path / "hook"), "BRANCHYNET_REQUIRE_EXT": "0"}
    r = _run([sys.executable, "setup.py", "build_ext", "--inplace"], src, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "building branchynet._C with CUDA 13.0 and CPU kernels" in r.stderr
    assert "the cuda build failed" in r.stderr and "built branchynet._C with CPU kernels" in r.stderr
    rec = json.loads((src / "branchynet" / _build.RECORD).read_text())
    assert rec["kind"] == "cpu" and rec["why"].startswith("the CUDA build failed")
    probe = ("import json, branchynet, branchynet.ops as o; from branchynet import _C\n"
             "print(json.dumps({'file': _C.__file__, 'cuda': _C.has_cuda(), "
             "'cpu': o.available_backends('cpu'), 'info': o.backend_status()['extension']}))")
    got = _probe(_python(probe, src, {"BRANCHYNET_JIT": "0"}))
    assert Path(got["file"]).parent == src / "branchynet"
    assert got["cuda"] is False and "cpp" in got["cpu"] and got["info"] == "loaded"


def test_setup_with_broken_sources_fails_only_when_required(tmp_path):
    """BRANCHYNET_REQUIRE_EXT=1: a C++ file that does not compile fails the build (CI);
    without it the install goes on without the extension and says so."""
    src = _copy_checkout(tmp_path / "src")
    cpp = src / "csrc" / "exit_step.cpp"
    cpp.write_text('#include "no_such_header_on_purpose.h"\n' + cpp.read_text())  # fails at once
    env = {"BRANCHYNET_SKIP_EXT": "0", "CUDA_HOME": str(tmp_path / "none")}
    r = _run([sys.executable, "setup.py", "build_ext", "--inplace"], src, {**env, "BRANCHYNET_REQUIRE_EXT": "1"})
    assert r.returncode != 0
    assert "no_such_header_on_purpose.h" in r.stdout + r.stderr
    r = _run([sys.executable, "setup.py", "build_ext", "--inplace"], src, {**env, "BRANCHYNET_REQUIRE_EXT": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the cpu build failed" in r.stderr and "no extension" in r.stderr
    assert not list((src / "branchynet").glob("_C*.so"))


JIT_PROBE = """
import json, sys, torch, branchynet.ops as o
from branchynet import _build
z = torch.randn(3, 10, dtype=torch.float64)
z[0, 0] += 40
outs = {}
for be in ("cpp", "torch"):
    bufs = (torch.zeros(3, 10, dtype=torch.float64), torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    o.exit_step(z, torch.arange(3), 0.5, 0, *bufs, backend=be)
    outs[be] = [t.tolist() for t in bufs]
print(json.dumps({"module": o._EXT.__file__, "record": _build.build_record(),
                  "same": outs["cpp"] == outs["torch"]}))
"""


@pytest.mark.slow
def test_jit_build_two_processes_on_an_empty_cache(tmp_path):
    """No _C installed: the first use builds it; two processes at once build it once
    (the other waits for the lock) and both run the cpp backend; a third loads the cache."""
    src = _copy_checkout(tmp_path / "src")
    assert not list((src / "branchynet").glob("_C*"))
    env = {**os.environ, _build.ENV_CACHE: str(tmp_path / "cache"), "BRANCHYNET_JIT": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", JIT_PROBE], cwd=src, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=BUILD_TIMEOUT_S) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _, _ in results]
    errs = "".join(err for _, err, _ in results)
    assert errs.count("branchynet: building the compiled exit-op kernels") == 1, errs
    assert "waiting for another process" in errs, errs
    assert got[0]["module"] == got[1]["module"]
    assert Path(got[0]["module"]).is_relative_to(tmp_path / "cache")
    for g in got:
        assert g["same"] and g["record"]["kind"] == "cpu" and g["record"]["how"] == "just in time"
    third = _run([sys.executable, "-c", JIT_PROBE], src, {_build.ENV_CACHE: str(tmp_path / "cache")}, 120)
    assert third.returncode == 0 and "building" not in third.stderr, third.stderr
    assert _probe(third)["module"] == got[0]["module"]
    # BRANCHYNET_JIT=0 with an empty cache: no build, the torch backend, and the reason.
    off = _python("import branchynet.ops as o; print(o.available_backends('cpu'), o.backend_status()['extension'])",
                  src, {_build.ENV_CACHE: str(tmp_path / "empty"), "BRANCHYNET_JIT": "0"}, 120)
    assert off.returncode == 0, off.stderr
    assert "'cpp'" not in off.stdout and "turned off by BRANCHYNET_JIT=0" in off.stdout


# --- CI: the extension must be there ------------------------------------------------------

@pytest.mark.skipif(not _build.env_flag(_build.ENV_REQUIRE),
                    reason="BRANCHYNET_REQUIRE_EXT is not set (CI sets it)")
def test_required_extension_is_installed_and_registered():
    """CI installs with BRANCHYNET_REQUIRE_EXT=1: the ahead-of-time _C must load from this
    checkout and serve the cpp backend (the CUDA one too where a GPU and a CUDA build
    are there); a link, registration or ABI failure fails here instead of skipping."""
    from branchynet import ops

    spec = importlib.util.find_spec("branchynet._C")
    assert spec is not None and spec.origin, "branchynet._C is not built"
    assert Path(spec.origin).parent == ROOT / "branchynet", spec.origin
    from branchynet import _C

    assert ops._EXT is _C, ops._EXT_ERROR
    assert "cpp" in ops.available_backends("cpu")
    assert hasattr(torch.ops.branchynet, "exit_step") and hasattr(torch.ops.branchynet, "gather_rows")
    assert _build.build_record()["how"] == "ahead of time"
    if torch.cuda.is_available() and torch.version.cuda:
        assert _C.has_cuda() and "cuda" in ops.available_backends("cuda")


# --- the command line ----------------------------------------------------------------------

def test_info_and_build_commands(capsys):
    from branchynet import ops
    from branchynet.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("extension_build"))
    assert line.split(None, 1)[1] == _build.describe(_build.build_record())
    if ops._EXT is not None:
        assert main(["build"]) == 0
        assert "branchynet._C is there" in capsys.readouterr().out


@pytest.mark.parametrize("change,reason", [
    ({"torch": "0.0.1"}, "built for torch 0.0.1"),
    # Built from other sources, or by a branchynet whose record had no source hash: an
    # older _C defines the op schemas itself, and loading it would abort the process.
    ({"source": "0" * 64}, "built from other sources"),
    ({"source": None}, "the sources of an older branchynet"),
], ids=["other-torch", "other-sources", "no-source-hash"])
def test_an_extension_built_for_another_torch_is_not_imported(tmp_path, change, reason):
    # A copy of the checkout whose _C record names another torch (or other sources): the
    # module is not imported (its ABI may crash the process), the reason is given, and
    # with no cached build and the just-in-time build off, the torch path takes over.
    root = Path(branchynet.__file__).parent.parent
    if not list((root / "branchynet").glob("_C*.so")):
        pytest.skip("no ahead-of-time extension in this checkout")
    copy = tmp_path / "checkout"
    for name in ("branchynet", "kernels", "csrc"):
        shutil.copytree(root / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    rec = copy / "branchynet" / _build.RECORD
    old = json.loads(rec.read_text()) if rec.exists() else {"source": _build.source_hash(str(copy / "csrc"))}
    new = {k: v for k, v in {**old, **change}.items() if v is not None}
    rec.write_text(json.dumps(new))
    code = """
import json, sys
import branchynet.ops as o
print(json.dumps({"status": o.backend_status(), "imported": "branchynet._C" in sys.modules,
                  "file": o.__file__}))
"""
    env = {**os.environ, "BRANCHYNET_CACHE": str(tmp_path / "cache"), "BRANCHYNET_JIT": "0"}
    env.pop("BRANCHYNET_REQUIRE_EXT", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=copy,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(copy)), out["file"]
    assert out["imported"] is False and out["status"]["auto_cpu"] == "torch"
    assert reason in out["status"]["extension"], out["status"]


def test_an_extension_built_from_these_sources_is_imported():
    # The guard above must not refuse the build of the current sources.
    rec = _build._aot_record(str(Path(branchynet.__file__).parent))
    from branchynet import ops

    if rec is None or ops._EXT is None or _build.csrc_dir() is None:
        pytest.skip("no ahead-of-time extension with a record in this checkout")
    assert _build._stale_sources(rec) is None
    assert "other sources than" in (_build._stale_sources({**rec, "source": "0" * 64}) or "")
