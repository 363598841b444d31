"""The one error type of `sloth finetune`: a user mistake, reported as one line (no traceback)."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix (bad argument, missing file, unsupported model); the message says how."""
