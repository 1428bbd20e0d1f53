"""Writing a file so that a reader sees its old content or its new one, never a part of either.

Every file the package publishes (checkpoint files and pointers, sample-index caches, dataset
records, results) is written to a hidden temporary file beside its final path and renamed over
it. Concurrent writers of identical content (ranks, workers) are harmless.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def temp_file_for(path: Path) -> tuple[int, str]:
    """An open descriptor and the name of a new hidden file in ``path``'s directory, with the
    permissions a plain ``open`` would give (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name to write ``path``'s new content to; on leaving the block the
    file replaces ``path``, or is removed when the block raised."""
    fd, tmp = temp_file_for(Path(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in directory ``path`` durable where the file system supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem; rename atomicity is what matters
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (file and directory synced)."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
