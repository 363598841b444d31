"""Writing outputs so that an interrupted write never leaves a part of a file and no write follows a symbolic link:
a temporary file or folder beside the destination, then ``os.replace`` (which replaces a link, never its target).
Used by the exporters and by ``sloth finetune``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, List, Optional


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace`` (a reader sees the
    old or the new file, never a part; a symbolic link at ``path`` is replaced, not followed)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_into(out: str, save: Callable[[str], None], place: Optional[Callable[[str], str]] = None) -> List[str]:
    """Run ``save(tmp_dir)`` (e.g. ``model.save_pretrained``) into a fresh temporary folder inside ``out``, then
    move each file it wrote to ``place(name)`` (default ``out/name``; a caller's check that the path stays inside
    ``out``) with ``os.replace``; returns the names moved. Nothing in ``out`` changes until the save finished;
    links in ``out`` are replaced, not followed."""
    place = place or (lambda name: os.path.join(out, name))
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-save-")
    try:
        save(tmp)
        names = []
        for root, _, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            for fn in sorted(files):
                name = fn if rel == "." else os.path.join(rel, fn)
                dst = place(name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(root, fn), dst)
                names.append(name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_write", "save_into"]
