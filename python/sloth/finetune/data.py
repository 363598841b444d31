"""Instruction data: load (bundled file, user .json / .jsonl / .parquet, or a `datasets` hub name), render
with the tokenizer's chat template, tokenize with labels on the responses only, and batch with dynamic padding.
"""

from __future__ import annotations

import os
import random
from importlib import resources
from typing import Iterator, List, Optional

import torch

from .errors import FinetuneError

IGNORE_INDEX = -100
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def bundled_data_path() -> str:
    """Path of the bundled instruction dataset (``sloth/data/instructions.jsonl``)."""
    return str(resources.files("sloth").joinpath("data", "instructions.jsonl"))


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


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


def to_messages(row: dict, instruction_column: str, input_column: str, output_column: str,
                messages_column: str) -> List[dict]:
    """One row as chat turns ``[{"role": ..., "content": ...}, ...]``."""
    if messages_column in row and row[messages_column] is not None:
        return [{"role": m["role"], "content": m["content"]} for m in row[messages_column]]
    prompt = str(row[instruction_column])
    extra = row.get(input_column) if input_column else None
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[output_column])}]


def check_columns(columns, instruction_column: str, input_column: str, output_column: str,
                  messages_column: str) -> None:
    """Raise FinetuneError unless the dataset has a messages column or the instruction and output columns."""
    if messages_column in columns:
        return
    missing = [c for c in (instruction_column, output_column) if c not in columns]
    if missing:
        raise FinetuneError(
            f"dataset has no column {missing[0]!r} (columns: {', '.join(columns)}); name the columns with "
            f"--instruction-column / --input-column / --output-column, or use a {messages_column!r} column of chat turns")


def _ids(tokenizer, messages, add_generation_prompt: bool) -> List[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer Transformers
        out = out["input_ids"]
    return list(out)


def tokenize_conversation(tokenizer, messages: List[dict], max_seq_length: int):
    """(input_ids, labels) of one conversation, truncated to ``max_seq_length``; labels are -100 everywhere
    except on the assistant turns (the response tokens and the template's end-of-turn tokens)."""
    ids = _ids(tokenizer, messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_common_prefix(_ids(tokenizer, messages[:i], True), ids))
        end = len(_common_prefix(_ids(tokenizer, messages[: i + 1], False), ids))
        labels[start:end] = ids[start:end]
    return ids[:max_seq_length], labels[:max_seq_length]


def _common_prefix(a: List[int], b: List[int]) -> List[int]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


class InstructionData:
    """Tokenized examples (lists of ids and labels) of a dataset; :meth:`batches` yields padded batches."""

    def __init__(self, examples):
        self.examples = examples  # list of (input_ids, labels)

    def __len__(self):
        return len(self.examples)

    def batches(self, batch_size: int, seed: int, pad_id: int) -> Iterator[dict]:
        """Endless stream of batches (reshuffled each epoch), padded to the longest example of each batch:
        ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]`` (-100 on prompt and padding)."""
        rng = random.Random(seed)
        order: List[int] = []
        while True:
            if len(order) < batch_size:
                epoch = list(range(len(self.examples)))
                rng.shuffle(epoch)
                order.extend(epoch)
            take, order = order[:batch_size], order[batch_size:]
            yield collate([self.examples[i] for i in take], pad_id)


def collate(examples, pad_id: int) -> dict:
    """Pad (input_ids, labels) pairs on the right to the longest one."""
    t = max(len(ids) for ids, _ in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((b, t), dtype=torch.long)  # [B, T]
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prepare_data(tokenizer, config) -> InstructionData:
    """Load, check and tokenize the dataset of ``config`` (a FinetuneConfig)."""
    ds = load_records(config.dataset, config.dataset_split)
    cols = (config.instruction_column, config.input_column, config.output_column, config.messages_column)
    check_columns(ds.column_names, *cols)
    examples = []
    for row in ds:
        try:
            msgs = to_messages(row, *cols)
        except (KeyError, TypeError) as e:
            raise FinetuneError(f"a row of the dataset has no usable {e} field; check the column options") from None
        ids, labels = tokenize_conversation(tokenizer, msgs, config.max_seq_length)
        if any(x != IGNORE_INDEX for x in labels[1:]):  # something left to learn after truncation
            examples.append((ids, labels))
    if not examples:
        raise FinetuneError(f"no example of the dataset has a response within --max-seq-length "
                            f"{config.max_seq_length}; raise it or check the data")
    return InstructionData(examples)
