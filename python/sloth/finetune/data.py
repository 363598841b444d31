"""Instruction data for `sloth finetune`: load it with ``datasets`` (the bundled file, a user's .json / .jsonl /
.parquet, or a hub name) and turn each row into TRL's conversational prompt-completion form, so that TRL's
``SFTTrainer`` renders it with the chat template and takes the loss on the response only. Rows without a
response (missing, null, empty or blank) are skipped and counted."""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional, Tuple

from .errors import FinetuneError

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def bundled_data_path() -> str:
    """Path of the bundled instruction dataset (``sloth/data/instructions.jsonl``)."""
    return str(resources.files("sloth").joinpath("data", "instructions.jsonl"))


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


def load_records(dataset: Optional[str], split: str = "train"):
    """The rows of ``dataset`` (a ``datasets.Dataset``): a .json / .jsonl / .parquet file, a hub name, or the
    bundled data when None."""
    import datasets

    datasets.disable_progress_bars()
    path = dataset or bundled_data_path()
    ext = os.path.splitext(path)[1].lower()
    if ext in _FORMATS or os.path.exists(path):
        if not os.path.isfile(path):
            raise FinetuneError(f"dataset file {path!r} not found; pass an existing .json, .jsonl or .parquet "
                                f"file to --dataset (or leave it out for the bundled data)")
        if ext not in _FORMATS:
            raise FinetuneError(f"dataset file {path!r} has an unsupported extension; use .json, .jsonl or .parquet")
        try:
            return datasets.load_dataset(_FORMATS[ext], data_files=path, split="train")
        except Exception as e:  # malformed file
            raise FinetuneError(f"could not read dataset {path!r} ({type(e).__name__}: {_first_line(e)}); "
                                f"check that it is valid {ext[1:]}") from None
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:
        raise FinetuneError(f"could not load dataset {path!r} from the Hugging Face hub ({type(e).__name__}: "
                            f"{_first_line(e)}); pass a local .json/.jsonl/.parquet file instead") from None


def check_columns(columns, instruction_column: str, output_column: str, messages_column: str) -> None:
    """Raise FinetuneError unless the dataset has a messages column or the instruction and output columns."""
    if messages_column in columns:
        return
    missing = [c for c in (instruction_column, output_column) if c not in columns]
    if missing:
        raise FinetuneError(
            f"dataset has no column {missing[0]!r} (columns: {', '.join(columns)}); name the columns with "
            f"--instruction-column / --input-column / --output-column, or use a {messages_column!r} column of chat turns")


def _text(v) -> Optional[str]:
    """``v`` as non-blank text, or None (missing, null, empty, blank, or not a string / number)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        return None
    return v


def to_prompt_completion(row: dict, instruction_column: str, input_column: str, output_column: str,
                         messages_column: str) -> Optional[dict]:
    """One row as ``{"prompt": [turns], "completion": [assistant turn]}``, or None when it has no response to
    learn (or no prompt). A messages row learns its last assistant turn, with the turns before it as the prompt."""
    msgs = row.get(messages_column)
    if msgs is not None:
        if not isinstance(msgs, list):
            return None
        turns = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                return None
            turns.append({"role": m["role"], "content": m.get("content") if isinstance(m.get("content"), str) else ""})
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
        if last is None or last == 0 or _text(turns[last]["content"]) is None:
            return None
        return {"prompt": turns[:last], "completion": [turns[last]]}
    prompt, answer = _text(row.get(instruction_column)), _text(row.get(output_column))
    if prompt is None or answer is None:
        return None
    extra = _text(row.get(input_column)) if input_column else None
    if extra is not None:
        prompt = f"{prompt}\n\n{extra}"
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def prepare_dataset(config) -> Tuple[object, int]:
    """(the ``datasets.Dataset`` of prompt-completion rows of ``config``'s dataset, number of rows skipped for
    having no response). No usable row left is an error."""
    import datasets

    ds = load_records(config.dataset, config.dataset_split)
    cols = (config.instruction_column, config.input_column, config.output_column, config.messages_column)
    check_columns(ds.column_names, config.instruction_column, config.output_column, config.messages_column)
    rows, skipped = [], 0
    for row in ds:
        pc = to_prompt_completion(row, *cols)
        if pc is None:
            skipped += 1
        else:
            rows.append(pc)
    if not rows:
        raise FinetuneError(f"no row of the dataset has a response to learn ({skipped} rows with a missing, null or "
                            f"empty {config.output_column!r} / assistant turn); check the data and --output-column")
    return datasets.Dataset.from_list(rows), skipped
