"""The artifact's manifest: what was exported, and the sha256 of every file.

``manifest.json`` holds the exits (file, threshold, state tensors in and out), the
criterion, the input's shape and dtype, the versions that wrote it and the sha256 of
every other file in the directory. Its own hash is the ``manifest_sha256`` field: the
sha256 of the file's bytes with that field's value written as 64 zeros, so a changed
byte anywhere in the directory, the manifest included, is refused before anything is
loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "ManifestError", "read_manifest", "write_manifest"]

FORMAT = "branchynet-export"
#: Bumped when a reader of the previous version would misread the directory.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ZERO = "0" * 64
_SELF = '"manifest_sha256": "'


class ManifestError(ValueError):
    """An export directory that this version cannot run as it is: a missing or changed
    file, a manifest that is not one or from a newer format."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed(root: Path) -> list:
    """Every file under ``root`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, body: dict) -> Path:
    """Write ``root/manifest.json``: ``body`` plus the format, the hash of every file in
    ``root`` and the manifest's own hash."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **body,
           "files": {name: sha256_file(root / name) for name in _listed(root)},
           "manifest_sha256": _ZERO}
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    text = text.replace(_SELF + _ZERO, _SELF + digest, 1)
    path = root / MANIFEST
    path.write_text(text)
    return path


def read_manifest(root: str | Path) -> dict:
    """The manifest of an export directory, after checking every file against it.

    Raises:
        ManifestError: no manifest; not JSON or not ours; a newer format version; the
            manifest or any file changed, missing or not listed (the message names it).
    """
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory (expected a directory written by branchynet export)")
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST} (expected a directory written by branchynet export)")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: {MANIFEST} is not valid JSON ({err}); the file was changed") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a branchynet export manifest (format {doc.get('format')!r} "
                            f"if a dict; expected {FORMAT!r})" if isinstance(doc, dict) else
                            f"{path}: not a branchynet export manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{path}: format_version must be an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{path}: format version {version} is newer than this branchynet reads "
                            f"(up to {FORMAT_VERSION}); upgrade branchynet, or export again with this one")
    claimed = doc.get("manifest_sha256")
    text = raw.decode()
    if not isinstance(claimed, str) or (_SELF + claimed) not in text:
        raise ManifestError(f"{path}: {MANIFEST} has no manifest_sha256; the file was changed")
    if hashlib.sha256(text.replace(_SELF + claimed, _SELF + _ZERO, 1).encode()).hexdigest() != claimed:
        raise ManifestError(f"{path}: {MANIFEST} does not match its sha256; the file was changed")
    _check_files(root, doc.get("files"))
    return doc


def _check_files(root: Path, files) -> None:
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{root / MANIFEST}: lists no files")
    present = set(_listed(root))
    for name, digest in files.items():
        if name not in present:
            raise ManifestError(f"{root / name}: listed in {MANIFEST} but missing")
        if sha256_file(root / name) != digest:
            raise ManifestError(f"{root / name}: sha256 differs from {MANIFEST}; the file was changed")
    extra = sorted(present - set(files))
    if extra:
        raise ManifestError(f"{root / extra[0]}: not listed in {MANIFEST} (a file added after export)")
