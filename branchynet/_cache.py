"""The build cache as a trusted store: where it is, and what of it may be loaded.

Loading a cached build runs its code in this process (``dlopen`` runs a library's
constructors before Python sees it), and mapping a truncated file kills the process with
SIGBUS. So nothing from the cache is mapped before it has passed these checks, made on
the file itself:

- the cache folder, the build's folder, its record and its module file belong to this
  user and are writable by nobody else (a folder others can write is one where they can
  swap the file between the check and the load); no symlink inside the cache;
- the record names this install: kind, torch, Python, the sources' hash and the flags
  (:func:`branchynet._build.build_key`), and the module file's name, size and sha256,
  which must match the file.

The cache folder itself is ``BRANCHYNET_CACHE``, else ``$XDG_CACHE_HOME/branchynet``,
else ``~/.cache/branchynet``; never a relative path (it would follow the working folder).
Without a usable home, or when the chosen folder is not private to this user, a folder of
this user's under the system temp folder, created 0700 (and checked if it exists); if
that is not private either, there is no cache. Each refusal is one warning per process.

This file imports nothing of the package, nor torch (``setup.py`` and the build
subprocess load :mod:`branchynet._build`, which loads it, by path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import tempfile

log = logging.getLogger("branchynet.build")

ENV_CACHE = "BRANCHYNET_CACHE"
DONE = "built.json"  # the record of a finished build, written last
_WARNED: set = set()  # what this process has warned about already (one warning each)


class Untrusted(Exception):
    """A cache folder or build that must not be loaded; the message says why."""


def _uid() -> int:
    """This process's user (a seam for the tests: they cannot always chown)."""
    return os.geteuid()


def warn_once(key, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


# --- ownership and modes -----------------------------------------------------------------

def _owner_and_mode(st: os.stat_result, path: str) -> None:
    if st.st_uid != _uid():
        raise Untrusted(f"{path} belongs to uid {st.st_uid}, not to this user (uid {_uid()})")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise Untrusted(f"{path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):o})")


def check_dir(path: str, follow: bool = False) -> None:
    """Raise :class:`Untrusted` unless ``path`` is a folder of this user that nobody else
    can write. ``follow``: a symlink to such a folder is fine (the cache root may be one;
    a folder inside the cache may not)."""
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"{path} is not a folder" + ("" if follow else " (a symlink?)"))
    _owner_and_mode(st, path)


def check_file(path: str) -> os.stat_result:
    """Raise :class:`Untrusted` unless ``path`` is a regular file (not a symlink) of this
    user that nobody else can write; its stat otherwise."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{path} is not a regular file")
    _owner_and_mode(st, path)
    return st


def make_private_dir(path: str) -> None:
    """Create ``path`` (0700) if missing; raise :class:`Untrusted` or OSError unless it is
    then a private folder of this user."""
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    check_dir(path, follow=True)


# --- where the cache is --------------------------------------------------------------------

def private_temp_root() -> str | None:
    """``<temp>/branchynet-<uid>``, created 0700, or None if it cannot be made private."""
    path = os.path.join(tempfile.gettempdir(), f"branchynet-{_uid()}")
    try:
        # No symlink here: in a shared temp folder anyone could have put one first.
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        check_dir(path, follow=False)
        return path
    except (OSError, Untrusted) as err:
        warn_once(("root", path), "branchynet: no just-in-time build cache (%s)", err)
        return None


def configured_root() -> str | None:
    """The cache folder asked for (``BRANCHYNET_CACHE``, ``XDG_CACHE_HOME``, home), as an
    absolute path, or None when none is usable (no home, only relative paths)."""
    base = os.environ.get(ENV_CACHE)
    if base:
        if os.path.isabs(base):
            return base
        warn_once(("relative", base), "branchynet: %s=%r is a relative path, not used: the cache would "
                  "follow the working folder (give an absolute path)", ENV_CACHE, base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # a relative one is invalid by the XDG rules: ignored
        return os.path.join(xdg, "branchynet")
    home = os.path.expanduser("~")
    if os.path.isabs(home) and os.path.isdir(home):
        return os.path.join(home, ".cache", "branchynet")
    return None


def cache_root(create: bool = False) -> str | None:
    """The cache folder in use, or None (no cache: each build is for its process only).

    The configured folder (:func:`configured_root`) if it is private to this user, or does
    not exist yet (``create``: it is made, 0700); else the per-user temp folder.
    """
    root = configured_root()
    if root is not None:
        try:
            if create:
                make_private_dir(root)
            elif os.path.lexists(root):
                check_dir(root, follow=True)
            return root
        except (OSError, Untrusted) as err:
            warn_once(("root", root), "branchynet: the build cache %s is not used (%s); using a private "
                      "folder under the temp folder instead", root, err)
    return private_temp_root()


# --- what a cached build must be -------------------------------------------------------------

def file_digest(path: str) -> tuple:
    """``(size, sha256 hex)`` of a file, read without following a symlink."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        size = 0
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def module_file(folder: str, name: str) -> str | None:
    """The module file of ``name`` in ``folder`` (the one an import would take), or None."""
    for f in sorted(os.listdir(folder)):
        if f.startswith(name + ".") and f.endswith((".so", ".pyd")):
            return os.path.join(folder, f)
    return None


KEY_FIELDS = ("kind", "torch", "python", "source", "flags")


def check_build(folder: str, name: str, key: dict) -> tuple:
    """``(module file, record)`` of the finished build in ``folder`` if it may be loaded;
    raise :class:`Untrusted` saying why not (nothing is mapped either way).

    Args:
        folder: the build's folder; name: its module's name.
        key: what this install needs (:func:`branchynet._build.build_key`).
    """
    check_dir(folder)
    done = os.path.join(folder, DONE)
    check_file(done)
    with open(done) as fh:
        try:
            rec = json.load(fh)
        except ValueError as err:
            raise Untrusted(f"{done} is not a record ({err})") from None
    if not isinstance(rec, dict):
        raise Untrusted(f"{done} is not a record")
    for field in KEY_FIELDS:
        if rec.get(field) != key[field]:
            raise Untrusted(f"its record is for {field} {rec.get(field)!r}, this install needs {key[field]!r}")
    so = module_file(folder, name)
    if rec.get("module") != name or so is None or rec.get("file") != os.path.basename(so):
        raise Untrusted(f"its record names module {rec.get('module')!r}, file {rec.get('file')!r}; "
                        f"the folder holds {os.path.basename(so) if so else 'no module file'} of {name}")
    if not rec.get("sha256") or not isinstance(rec.get("size"), int):
        raise Untrusted("its record has no sha256 and size of the module file (an older branchynet's build)")
    st = check_file(so)
    if st.st_size != rec["size"]:
        raise Untrusted(f"{so} has {st.st_size} bytes, its record says {rec['size']} (truncated or changed)")
    if file_digest(so)[1] != rec["sha256"]:
        raise Untrusted(f"the sha256 of {so} does not match its record (changed since the build)")
    return so, rec


# --- a shared library's own size -------------------------------------------------------------

def elf_truncated(path: str) -> str | None:
    """Why the ELF file at ``path`` is shorter than its own headers say (or not ELF), or
    None. For a module whose record has no checksum: mapping the missing pages is SIGBUS."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or len(head) < 52 or head[4] not in (1, 2) or head[5] not in (1, 2):
            return f"{path} is not an ELF shared library"
        end = "<" if head[5] == 1 else ">"
        if head[4] == 2:  # 64-bit
            phoff, shoff = struct.unpack(end + "QQ", head[32:48])
            phentsize, phnum, shentsize, shnum = struct.unpack(end + "HHHH", head[54:62])
            ph_fmt, ph_off, ph_filesz = end + "IIQQQQQQ", 2, 5
        else:
            phoff, shoff = struct.unpack(end + "II", head[28:36])
            phentsize, phnum, shentsize, shnum = struct.unpack(end + "HHHH", head[42:50])
            ph_fmt, ph_off, ph_filesz = end + "IIIIIIII", 1, 4
        need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        if phoff + phentsize * phnum <= size and phentsize >= struct.calcsize(ph_fmt):
            fh.seek(phoff)
            for _ in range(phnum):
                ph = struct.unpack(ph_fmt, fh.read(phentsize)[:struct.calcsize(ph_fmt)])
                need = max(need, ph[ph_off] + ph[ph_filesz])
    if need > size:
        return f"{path} is truncated ({size} bytes, its ELF headers need {need})"
    return None


def check_module(path: str, rec: dict | None) -> str | None:
    """Why the module file of an ahead-of-time ``_C`` must not be mapped, or None: its size
    and sha256 against its record, or, for a record without them (an older build), its
    ELF headers against its size."""
    if rec and rec.get("sha256"):
        size, sha = file_digest(path)
        if size != rec.get("size"):
            return f"{path} has {size} bytes, its record says {rec.get('size')} (truncated or changed)"
        return None if sha == rec["sha256"] else f"the sha256 of {path} does not match its record"
    return elf_truncated(path) if path.endswith(".so") else None


# --- finding, making and locking build folders ------------------------------------------------

def candidates(folder: str) -> list:
    """The folders a build of ``folder``'s key may be in: itself, then fresh siblings
    (newest first)."""
    parent, base = os.path.split(folder)
    fresh = []
    try:
        for n in os.listdir(parent):
            path = os.path.join(parent, n)
            if n.startswith(base + "-") and os.path.isdir(path):
                fresh.append((-os.lstat(path).st_mtime, path))
    except OSError:  # no cache yet, or a folder removed meanwhile: what was found
        pass
    return [folder] + [p for _, p in sorted(fresh)]


def find_valid(folder: str, name: str, key: dict):
    """``(module file, record)`` of the first finished build that passes the checks
    (:func:`check_build`), or None. Folders with a record that fail
    them are ignored with one warning each; folders without one are unfinished builds."""
    for cand in candidates(folder):
        if not os.path.lexists(os.path.join(cand, DONE)):
            continue
        try:
            return check_build(cand, name, key)
        except (OSError, Untrusted) as err:
            warn_once(("build", cand), "branchynet: ignoring the cached build in %s (%s); it is not "
                      "loaded, and a new one is built in a fresh folder on first use", cand, err)
    return None


class Lock:
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


def fresh_folder(folder: str, force: bool) -> str:
    """The folder to build ``folder``'s key in, under the build lock: ``folder`` itself if
    it is missing or an unfinished build of ours (ninja goes on from its objects); emptied
    first if it is ours but refused or ``force``d; else (not ours: left alone) a fresh
    sibling, 0700."""
    if force:  # from scratch: ninja would find the old outputs up to date
        for sib in candidates(folder)[1:]:
            try:
                check_dir(sib)
                shutil.rmtree(sib)
            except (OSError, Untrusted):
                pass
    if os.path.lexists(folder):
        try:
            check_dir(folder)
        except (OSError, Untrusted):
            return tempfile.mkdtemp(prefix=os.path.basename(folder) + "-", dir=os.path.dirname(folder))
        if not force and not os.path.lexists(os.path.join(folder, DONE)):
            return folder
        shutil.rmtree(folder)
    os.mkdir(folder, 0o700)
    return folder
