"""Atomic file writes: a temporary file beside the target, renamed over it, so no reader sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; renamed over ``path`` when the block succeeds, removed when it fails.

    Parent folders are made; the file is readable by all (``mkstemp`` makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are not possible), replacing any ``dst`` there.

    The new name appears whole or not at all, so doing it again after an interruption is safe.
    """
    if Path(dst).exists() and os.path.samefile(src, dst):
        return  # rename() between two links to one file does nothing and would leave the temporary
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def remove_temporaries(folder: str | Path) -> None:
    """Remove what interrupted :func:`atomic_path` writes left under ``folder`` (a killed process cleans nothing)."""
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename; parent folders are made."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON atomically (values JSON does not know are written as strings)."""
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
