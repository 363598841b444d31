"""The bundled tokenizer: a byte-level BPE trained in seconds on the bundled data, with a chat template.

Trained once and cached in the bundled model's folder (``<output_dir>/bundled``); a rerun loads it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
VOCAB_SIZE = 2000

#: the chat template of the bundled tokenizer (also used for a user's tokenizer that has none):
#: <|bos|><|user|>\n{prompt}\n<|assistant|>\n{answer}<|eos|>\n
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _texts(path: str) -> Iterator[str]:
    """Every string field of every record of a .jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                for v in json.loads(line).values():
                    if isinstance(v, str) and v:
                        yield v


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """A ``transformers.PreTrainedTokenizerFast`` (byte-level BPE, ``vocab_size`` tokens at most) trained on
    ``texts``, with bos / eos / pad, the role tokens and :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def bundled_tokenizer(cache_dir: str, data_path: str):
    """The bundled tokenizer, trained on ``data_path`` and cached in ``cache_dir`` (loaded from there if present)."""
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
        tok = PreTrainedTokenizerFast.from_pretrained(cache_dir)
        if tok.chat_template:
            return tok
    tok = train_tokenizer(_texts(data_path))
    os.makedirs(cache_dir, exist_ok=True)
    tok.save_pretrained(cache_dir)
    return tok
