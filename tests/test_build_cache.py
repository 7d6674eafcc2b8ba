"""The build cache as a trusted store, and the environment switches of the build.

A just-in-time build is loaded from the cache only if its folder and files belong to this
user and nobody else can write them, its record names this install (kind, torch,
Python, source hash, flags) and the size and sha256 of its module file match the record,
all checked before the file is mapped: a truncated or foreign file is never loaded, and
a rejected entry is rebuilt in a fresh folder after one warning. The ahead-of-time
``branchynet._C`` is checked the same way before its import.

No test here compiles the extension: the cache entries are fabricated (a copy of this
checkout's ``_C``, truncated; a tiny shared library whose constructor leaves a marker
file), and the build is replaced by a stub where a build would start. Owners are set
with ``os.chown`` to a second uid when the tests run as root, else through the
``_cache._uid`` seam.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from branchynet import _build, _cache
from test_install import ROOT, _copy_checkout

CPU = {"kind": "cpu", "cuda_home": None}
OTHER_UID = 65534  # nobody
AOT = sorted((ROOT / "branchynet").glob("_C*.so"))
SUFFIX = ".cpython-311-x86_64-linux-gnu.so" if not AOT else AOT[0].name[len("_C"):]


def _foreign(path: Path, monkeypatch) -> None:
    """Make ``path`` belong to another user: a real chown as root, else the owner seam."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    else:
        monkeypatch.setattr(_cache, "_uid", lambda: os.geteuid() + 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache for this test, a plan with the CPU build only, no warning memory."""
    monkeypatch.setenv(_build.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "plan", lambda jit, env=None: ([dict(CPU)], "test"))
    monkeypatch.setattr(_cache, "_WARNED", set())
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A copy of this checkout's sources: their hash names the cache folder."""
    return str(_copy_checkout(tmp_path_factory.mktemp("src")) / "csrc")


def _plant(src: str, body: bytes, **record) -> tuple:
    """A finished build in the folder of the current plan: ``body`` as its module file and
    a record sealed for it (``record`` overrides fields of the seal). Returns
    ``(folder, module file)``."""
    folder, name = _build.build_dir(CPU, src)
    os.makedirs(folder, mode=0o700)
    so = Path(folder) / (name + SUFFIX)
    so.write_bytes(body)
    rec = {**_build.seal(CPU, src, str(so), why="test"), **record}
    (Path(folder) / "built.json").write_text(json.dumps({k: v for k, v in rec.items() if v is not None}))
    return Path(folder), so


def _rejected(src: str) -> str:
    folder, name = _build.build_dir(CPU, src)
    with pytest.raises(_cache.Untrusted) as err:
        _cache.check_build(folder, name, _build.build_key(CPU, src))
    return str(err.value)


# --- boolean environment variables -----------------------------------------------------------

@pytest.mark.parametrize("value,want", [
    ("1", True), ("true", True), ("TRUE", True), ("on", True), (" Yes ", True),
    ("0", False), ("false", False), ("Off", False), ("no", False), ("NO", False),
])
def test_env_flag_reads_the_usual_words(monkeypatch, value, want):
    monkeypatch.setenv("BRANCHYNET_JIT", value)
    assert _build.env_flag("BRANCHYNET_JIT", default=not want) is want


def test_env_flag_default_and_an_unknown_value(monkeypatch):
    monkeypatch.delenv("BRANCHYNET_JIT", raising=False)
    assert _build.env_flag("BRANCHYNET_JIT", default=True) is True
    monkeypatch.setenv("BRANCHYNET_JIT", "")
    assert _build.env_flag("BRANCHYNET_JIT") is False
    monkeypatch.setenv("BRANCHYNET_JIT", "maybe")
    with pytest.raises(ValueError, match=r"BRANCHYNET_JIT must be one of .*got 'maybe'"):
        _build.env_flag("BRANCHYNET_JIT", default=True)


@pytest.mark.parametrize("value", ["false", "off", "no", "0"])
def test_jit_build_turned_off_by_any_false_word(tmp_path, monkeypatch, value):
    monkeypatch.setattr(_build, "_HERE", str(tmp_path))  # the installed _C is not this package's
    monkeypatch.setattr(_build, "cached", lambda root=None: (None, None))
    monkeypatch.setattr(_build, "build", lambda **kw: pytest.fail("built although turned off"))
    for key, v in (("record", None), ("jit_tried", False), ("jit", None)):
        monkeypatch.setitem(_build._STATE, key, v)
    monkeypatch.setenv(_build.ENV_JIT, value)
    mod, why = _build.load_extension(build_if_missing=True)
    assert mod is None and f"turned off by {_build.ENV_JIT}" in why


def test_first_use_check_turned_off_by_off(monkeypatch):
    from branchynet.ops import _verify

    monkeypatch.setattr(_verify, "quick_check", lambda b, d: pytest.fail("checked although turned off"))
    monkeypatch.setattr(_verify, "_RESULTS", {})
    monkeypatch.setenv(_verify.ENV, "off")
    assert _verify.passes("cpp", torch.device("cpu"))
    monkeypatch.setenv(_verify.ENV, "sometimes")
    with pytest.raises(ValueError, match="BRANCHYNET_VERIFY"):
        _verify.passes("cpp", torch.device("cpu"))


# --- where the cache is ----------------------------------------------------------------------

def test_no_home_gives_a_private_folder_under_the_temp_dir(tmp_path, monkeypatch):
    # A uid without a passwd entry and no HOME: expanduser("~") stays "~", which made the
    # cache the relative ./~/.cache/branchynet of whatever folder the process ran in.
    import pwd

    for var in (_build.ENV_CACHE, "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = _build.cache_root()
    assert root is not None and os.path.isabs(root) and Path(root).parent == tmp_path
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and os.stat(root).st_uid == os.geteuid()


def test_a_private_temp_folder_that_is_not_private_means_no_cache(tmp_path, monkeypatch, caplog):
    import pwd

    for var in (_build.ENV_CACHE, "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(_cache, "_WARNED", set())
    root = Path(_build.cache_root())
    root.chmod(0o777)  # another user could have made it, or could write it
    with caplog.at_level(logging.WARNING, "branchynet.build"):
        assert _build.cache_root() is None
    assert str(root) in caplog.text and "writable" in caplog.text
    root.chmod(0o700)
    _foreign(root, monkeypatch)
    assert _build.cache_root() is None


def test_relative_cache_paths_are_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(_cache, "_WARNED", set())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG rule: ignored
    monkeypatch.setenv(_build.ENV_CACHE, "relative/cache")
    with caplog.at_level(logging.WARNING, "branchynet.build"):
        root = _build.cache_root()
    assert root == str(tmp_path / "home" / ".cache" / "branchynet")
    assert _build.ENV_CACHE in caplog.text and "relative" in caplog.text


# --- what a cached build must be ------------------------------------------------------------

def test_a_sealed_build_passes_and_any_change_is_refused(cache, src):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(5000))
    path, rec = _cache.check_build(str(folder), _build.build_dir(CPU, src)[1], _build.build_key(CPU, src))
    assert path == str(so) and rec["sha256"] and rec["size"] == 5004
    body = so.read_bytes()
    so.write_bytes(body[:4096])
    assert "4096 bytes" in _rejected(src)
    so.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert "sha256" in _rejected(src)


@pytest.mark.parametrize("field,value,why", [
    ("sha256", None, "no sha256"),
    ("torch", "0.0.1", "torch"),
    ("python", "cpython-27", "python"),
    ("source", "0" * 64, "source"),
    ("flags", {"cxx": ["-O0"]}, "flags"),
    ("file", "../elsewhere.so", "file"),
], ids=["no-checksum", "torch", "python", "source", "flags", "file"])
def test_a_record_that_does_not_name_this_install_is_refused(cache, src, field, value, why):
    _plant(src, b"\x7fELF" + os.urandom(100), **{field: value})
    assert why in _rejected(src)


def test_a_build_owned_by_another_user_is_refused(cache, src, monkeypatch):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(100))
    _foreign(folder, monkeypatch)
    assert "belongs to uid" in _rejected(src)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_module_file_owned_by_another_user_is_refused(cache, src):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(100))
    os.chown(so, OTHER_UID, OTHER_UID)
    assert "belongs to uid" in _rejected(src)


@pytest.mark.parametrize("what", ["folder", "record", "module"])
def test_a_build_others_can_write_is_refused(cache, src, what):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(100))
    {"folder": folder, "record": folder / "built.json", "module": so}[what].chmod(0o777)
    assert "writable by its group or others" in _rejected(src)


def test_a_symlinked_module_file_is_refused(cache, src, tmp_path):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(100))
    real = tmp_path / "real.so"
    so.rename(real)
    so.symlink_to(real)
    assert "not a regular file" in _rejected(src)


# --- what cached() and jit_build() do with a refused entry ------------------------------------

def test_cached_never_imports_a_refused_build(cache, src, monkeypatch, caplog):
    folder, so = _plant(src, b"\x7fELF" + os.urandom(100), sha256="0" * 64)
    monkeypatch.setattr(_build, "_import_built", lambda f, n: pytest.fail(f"imported {f}"))
    with caplog.at_level(logging.WARNING, "branchynet.build"):
        assert _build.cached(src) == (None, None)
        assert _build.cached(src) == (None, None)
    assert caplog.text.count("ignoring the cached build") == 1, caplog.text  # one warning


def test_a_refused_build_is_rebuilt_in_a_fresh_folder_after_one_warning(cache, src, monkeypatch, caplog):
    # A garbage module file in our own cache: ignored with one warning (at import), and
    # the first use rebuilds instead of failing on it for good.
    from torch.utils import cpp_extension

    folder, so = _plant(src, b"garbage, not a shared library")
    so.write_bytes(b"garbage of another length")
    imported, built = [], []
    monkeypatch.setattr(_build, "_import_built", lambda f, n: imported.append(f))

    def fake_load(n, sources, **kw):
        out = Path(kw["build_directory"])
        built.append(sorted(os.listdir(out)))
        (out / (n + SUFFIX)).write_bytes(b"\x7fELF the new build")
        return f"new {n}"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, "branchynet.build"):
        assert _build.cached(src) == (None, None)
        mod, rec = _build.jit_build(CPU, src, why="test")
    assert imported == [] and built == [[]] and mod.startswith("new ")
    assert caplog.text.count("ignoring the cached build") == 1, caplog.text
    path, again = _cache.check_build(rec["path"], rec["module"], _build.build_key(CPU, src))
    assert Path(path).read_bytes() == b"\x7fELF the new build" and again["sha256"] == rec["sha256"]
    mode = stat.S_IMODE(os.stat(rec["path"]).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_a_foreign_build_folder_is_left_alone_and_the_build_goes_to_a_fresh_one(cache, src, monkeypatch):
    from torch.utils import cpp_extension

    folder, so = _plant(src, b"\x7fELF" + os.urandom(100))
    _foreign(folder, monkeypatch)
    if os.geteuid() != 0:
        pytest.skip("the owner seam makes every folder foreign; a real second uid is needed")

    def fake_load(n, sources, **kw):
        (Path(kw["build_directory"]) / (n + SUFFIX)).write_bytes(b"\x7fELF ours")
        return f"new {n}"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    mod, rec = _build.jit_build(CPU, src, why="test")
    assert rec["path"] != str(folder) and Path(rec["path"]).name.startswith(folder.name + "-")
    assert so.exists() and os.stat(folder).st_uid == OTHER_UID  # not touched
    monkeypatch.setattr(_build, "_import_built", lambda f, n: f)
    assert _build.cached(src)[0] == rec["path"]  # the fresh folder is found next time


def test_without_a_cache_the_build_is_for_this_process_only(cache, src, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(_cache, "cache_root", lambda create=False: None)
    places = []

    def fake_load(n, sources, **kw):
        places.append(kw["build_directory"])
        (Path(kw["build_directory"]) / (n + SUFFIX)).write_bytes(b"\x7fELF scratch")
        return f"new {n}"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _build.build_dir(CPU, src)[0] is None
    mod, rec = _build.jit_build(CPU, src, why="test")
    assert mod.startswith("new ") and rec["sha256"] and not os.path.exists(places[0])
    assert not cache.exists() and _build.cached(src) == (None, None)


# --- end to end: no SIGBUS, no foreign code run ------------------------------------------------

def _no_ext_checkout(tmp_path: Path) -> Path:
    return _copy_checkout(tmp_path / "checkout")


def _import_ops(cwd: Path, env: dict, code: str = "import branchynet.ops as o; print(o.backend_status()['auto_cpu'])"):
    env = {**os.environ, "BRANCHYNET_JIT": "0", **env}
    env.pop("BRANCHYNET_REQUIRE_EXT", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _plant_in(checkout: Path, cache_dir: Path, body: bytes, record: dict, monkeypatch) -> Path:
    """A build as the cache used to accept it (a record without checksum) for the sources
    of ``checkout``, where a process run in it will look."""
    monkeypatch.setenv(_build.ENV_CACHE, str(cache_dir))
    folder, name = _build.build_dir(CPU, str(checkout / "csrc"))
    os.makedirs(folder, mode=0o700)
    so = Path(folder) / (name + SUFFIX)
    so.write_bytes(body)
    (Path(folder) / "built.json").write_text(json.dumps({"kind": "cpu", "how": "just in time", "module": name,
                                                          "torch": torch.__version__, **record}))
    return so


@pytest.mark.skipif(not AOT, reason="needs a built branchynet._C to truncate")
def test_a_truncated_cached_build_does_not_kill_the_import(tmp_path, monkeypatch):
    checkout = _no_ext_checkout(tmp_path)
    so = _plant_in(checkout, tmp_path / "cache", AOT[0].read_bytes()[:4096],
                   {"source": _build.source_hash(str(checkout / "csrc"))}, monkeypatch)
    env = {_build.ENV_CACHE: str(tmp_path / "cache")}
    r = _import_ops(checkout, env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7 was SIGBUS
    assert r.stdout.split()[-1] == "torch" and "ignoring the cached build" in r.stderr
    assert str(so.parent) in r.stderr
    # `branchynet build --force` gets as far as the build (no compiler here: it says so).
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _import_ops(checkout, {**env, "PATH": str(empty), "CXX": "no-such-compiler"},
                    "import sys; from branchynet.cli import main; sys.exit(main(['build', '--force']))")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "no C++ compiler" in r.stdout


FOREIGN_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("PLANTED_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("foreign code ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def foreign_so(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to make the foreign library")
    d = tmp_path_factory.mktemp("foreign")
    (d / "planted.c").write_text(FOREIGN_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")], check=True)
    return (d / "planted.so").read_bytes()


def test_a_planted_library_is_never_run_at_import(tmp_path, foreign_so, monkeypatch):
    # Another user's library in a shared cache, beside a record of the kind the cache
    # used to accept (no checksum): importing branchynet.ops must not run it.
    checkout = _no_ext_checkout(tmp_path)
    _plant_in(checkout, tmp_path / "cache", foreign_so, {"source": _build.source_hash(str(checkout / "csrc"))},
              monkeypatch)
    marker = tmp_path / "marker"
    r = _import_ops(checkout, {_build.ENV_CACHE: str(tmp_path / "cache"), "PLANTED_MARKER": str(marker)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists(), "the planted library ran"
    assert "ignoring the cached build" in r.stderr


def test_a_planted_library_with_a_matching_checksum_is_not_run_when_foreign(cache, src, monkeypatch,
                                                                            tmp_path, foreign_so):
    # Everything in the record right, sha256 included: the owner alone refuses it.
    folder, so = _plant(src, foreign_so)
    _foreign(folder, monkeypatch)
    marker = tmp_path / "marker"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    assert _build.cached(src) == (None, None)
    assert not marker.exists(), "the planted library ran"


# --- the ahead-of-time _C, checked the same way before its import ------------------------------

def _checkout_with_ext(tmp_path: Path) -> Path:
    copy = tmp_path / "checkout"
    for name in ("branchynet", "kernels", "csrc"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.skipif(not AOT, reason="needs a built branchynet._C")
@pytest.mark.parametrize("damage", ["truncated", "checksum"])
def test_a_damaged_installed_extension_is_not_imported(tmp_path, damage):
    copy = _checkout_with_ext(tmp_path)
    so = copy / "branchynet" / AOT[0].name
    rec_path = copy / "branchynet" / _build.RECORD
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {
        "kind": "cpu", "torch": torch.__version__, "source": _build.source_hash(str(copy / "csrc"))}
    if damage == "truncated":  # a record without size or checksum (an older build): the ELF headers tell
        rec.pop("size", None), rec.pop("sha256", None)
        os.truncate(so, 4096)
    else:
        rec.update(size=so.stat().st_size, sha256="0" * 64)
    rec_path.write_text(json.dumps(rec))
    r = _import_ops(copy, {_build.ENV_CACHE: str(tmp_path / "cache")})
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split()[-1] == "torch" and "the installed extension does not load" in r.stderr


def test_elf_check_on_fabricated_files(tmp_path):
    if not AOT:
        pytest.skip("needs a built shared library")
    good = tmp_path / "good.so"
    shutil.copy(AOT[0], good)
    assert _cache.elf_truncated(str(good)) is None
    good.write_bytes(AOT[0].read_bytes()[:4096])
    assert "truncated" in _cache.elf_truncated(str(good))
    good.write_bytes(b"not ELF at all")
    assert _cache.elf_truncated(str(good)) is not None
