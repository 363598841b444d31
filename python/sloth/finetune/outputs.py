"""The output folder of a run: an earlier run in it is refused unless ``--overwrite`` (which removes what the new
run replaces), and every file is written atomically (a temporary file in the folder, then ``os.replace``), so that
an interrupted save never leaves a half-written adapter and no write follows a symbolic link out of the folder
(``os.replace`` replaces a link, never its target)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from typing import Callable, List

from ..export import files
from .errors import FinetuneError

#: files and folders a run writes (an earlier run is recognized by any of them; --overwrite removes them)
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
             "model.safetensors.index.json", "config.json", "generation_config.json", "summary.json", "loss.png",
             "loss.csv", "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")
RUN_DIRS = ("merged", "merged-bf16", "merged-fp16", "merged-fp32", "gguf", "checkpoints")
#: what marks an earlier run (the tokenizer alone does not)
_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
            "summary.json", "loss.png", "loss.csv") + RUN_DIRS


def _lexists(p: str) -> bool:
    return os.path.lexists(p)


def earlier_run(out: str) -> List[str]:
    """The outputs of an earlier run present in ``out`` (names; folders with a trailing slash)."""
    if not os.path.isdir(out):
        return []
    return [n + ("/" if n in RUN_DIRS else "") for n in _MARKERS if _lexists(os.path.join(out, n))]


def _remove(path: str) -> None:
    """Remove a file, a folder, or a symbolic link (the link only, never what it points at)."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def prepare_output_dir(out: str, overwrite: bool, resume: bool) -> None:
    """Create ``out`` after checking it: an earlier run there is refused unless ``overwrite`` or ``resume``, and so is
    a symbolic link where a run writes a folder. Nothing is removed here (see :func:`clear_earlier_run`, called
    once every other check passed)."""
    if _lexists(out) and not os.path.isdir(out):
        raise FinetuneError(f"--output-dir {out!r} exists and is not a folder; pick another path")
    found = earlier_run(out)
    if found and not (overwrite or resume):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FinetuneError(f"--output-dir {out!r} holds an earlier run ({shown}); pass --overwrite to replace it, "
                            f"--resume to continue it, or pick another --output-dir")
    for name in RUN_DIRS + ("bundled",):  # folders others write into (the Trainer, save_pretrained) stay inside
        p = os.path.join(out, name)
        if os.path.islink(p) and (name == "bundled" or not overwrite or resume):
            raise FinetuneError(f"{p!r} is a symbolic link; sloth finetune writes only inside --output-dir (remove "
                                f"the link{'' if name == 'bundled' else ' or pass --overwrite'})")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"cannot create --output-dir {out!r} ({e.strerror}); pick a writable folder") from None


def clear_earlier_run(out: str) -> None:
    """Remove what an earlier run left in ``out`` (``--overwrite``): the adapter, tokenizer, plot, summary,
    ``merged*/``, ``gguf/``, ``checkpoints/``; the cached ``bundled/`` model and files that are not a run's stay.
    A symbolic link is removed, never what it points at."""
    for name in RUN_FILES + RUN_DIRS:
        p = os.path.join(out, name)
        if _lexists(p):
            _remove(p)


def inside(out: str, name: str) -> str:
    """``out/name`` after checking that its folder is ``out`` or below it once symbolic links are resolved (a
    link at ``name`` itself is fine: it is replaced, not followed)."""
    path = os.path.join(out, name)
    root = os.path.realpath(out)
    parent = os.path.realpath(os.path.dirname(path))
    if parent != root and not parent.startswith(root + os.sep):
        raise FinetuneError(f"refusing to write {path!r}: it leads out of the output folder {out!r} through a "
                            f"symbolic link")
    return path


def save_into(out: str, save: Callable[[str], None]) -> List[str]:
    """:func:`sloth.export.files.save_into` with every destination checked by :func:`inside`."""
    return files.save_into(out, save, place=lambda name: inside(out, name))


@contextlib.contextmanager
def sigint_deferred(log: Callable[[str], None]):
    """Hold Ctrl-C back while saving: a SIGINT during the block prints one line and is delivered (as
    KeyboardInterrupt) after it, once the files are complete."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        log("sloth finetune: still saving; the outputs will be complete in a moment (Ctrl-C again after that)")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hits:
        raise KeyboardInterrupt


def default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
