"""Sizes and SHA-256 digests of files, recorded when they are written and checked when they are read.

A record is ``{relative path: {"size": bytes, "sha256": hex digest}}`` over the files of one
directory. The checkpoint manifest (training/manifest.py) and the sample-index caches
(data/glm_dataset.py) are such records. ``record_problems`` checks a record against the disk: sizes
always (a stat per file), digests when asked (a full read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The record of ``names`` (paths relative to ``root``, ``/``-separated)."""
    root = Path(root)
    return {
        name: {"size": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
        for name in names
    }


def safe_relative_path(name: str) -> bool:
    """``name`` is a plain relative path: no absolute path, no ``..``, no empty or ``.`` part,
    no backslash (so it cannot name anything outside the directory it is relative to)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and all(part not in ("", ".", "..") for part in path.parts)


def regular_file_inside(root: str | Path, name: str) -> bool:
    """``root/name`` is a regular file inside ``root`` (``name`` safe, no link out of it)."""
    path = Path(root) / name
    return (
        safe_relative_path(name)
        and path.is_file()
        and path.resolve().is_relative_to(Path(root).resolve())
    )


def record_problems(
    root: str | Path, record: Mapping[str, Any], *, hashes: bool = True
) -> list[str]:
    """One message per file of ``record`` that is not on disk as recorded, naming the file: an
    unsafe name, a missing file, a path that is not a regular file inside ``root`` (a symbolic
    link out of it), another size, another SHA-256 (when ``hashes``)."""
    root = Path(root)
    problems = []
    for name, entry in record.items():
        path = root / name
        if not safe_relative_path(name):
            problems.append(f"{root}: the record names {name!r}, which is not a path inside it")
            continue
        if not isinstance(entry, Mapping) or not isinstance(entry.get("size"), int):
            problems.append(f"{path}: its record is malformed ({entry!r})")
            continue
        if not path.exists() and not path.is_symlink():
            problems.append(f"{path}: missing")
            continue
        if not regular_file_inside(root, name):
            problems.append(f"{path}: not a regular file inside {root}")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(
                f"{path}: {size} bytes, {entry['size']} when written "
                f"({'truncated' if size < entry['size'] else 'grown'})"
            )
            continue
        if hashes and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{path}: SHA-256 differs from the one recorded when it was written")
    return problems
