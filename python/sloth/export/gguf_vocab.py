"""The tokenizer of a GGUF file: a Hugging Face byte-level BPE tokenizer (Llama 3, Qwen, GPT-2 style, sloth's
bundled one) as llama.cpp's ``gpt2`` tokenizer model: the token strings by id, their types, the merges, the
special token ids, whether a BOS is prepended, and the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional

#: the pre-tokenizer regex of Llama 3's tokenizer (llama.cpp's "llama-bpe"); recognized by these fragments
_LLAMA3_REGEX_PARTS = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "\\p{N}{1,3}")


@dataclass
class GGUFVocab:
    """What :func:`vocab_from_tokenizer` reads off a tokenizer, in GGUF's terms."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: List[str]
    token_types: List[int]  # gguf.TokenType values
    merges: List[str]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    unk_id: Optional[int] = None
    add_bos: bool = False
    chat_template: Optional[str] = None
    eot_ids: List[int] = field(default_factory=list)


def _walk(node):
    """Every dict in a tokenizer.json sub-tree (pre-tokenizers can nest in Sequence)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _pre_type(tj: dict) -> str:
    pats = []
    for d in _walk(tj.get("pre_tokenizer")):
        if d.get("type") == "Split":
            p = d.get("pattern", {})
            pats.append(p.get("Regex") or p.get("String") or "")
    if any(all(part in p for part in _LLAMA3_REGEX_PARTS) for p in pats):
        return "llama-bpe"
    if any(_LLAMA3_REGEX_PARTS[0] in p and "\\p{N}|" in p and "\\p{N}{1,3}" not in p for p in pats):
        return "qwen2"  # Llama 3's regex with single digits (Qwen2 / Qwen3)
    return "default"


def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless ``tokenizer`` is a fast byte-level BPE tokenizer (what the exporter writes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("sloth.save_gguf: the tokenizer is not a fast (tokenizers) tokenizer; load it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True)")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    byte_level = any(d.get("type") == "ByteLevel" for d in _walk([tj.get("pre_tokenizer"), tj.get("decoder")]))
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError(f"sloth.save_gguf: only byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) are exported, "
                         f"this one is {model.get('type')} (byte-level: {byte_level}); save the merged model with "
                         f"sloth.save_merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer data of a Hugging Face fast tokenizer, padded with unused ``[PAD{i}]`` tokens up to
    ``vocab_size`` (the rows of the embedding). Raises ValueError for a tokenizer that is not byte-level BPE
    (SentencePiece / Unigram / WordPiece): convert those from :func:`sloth.save_merged`'s output with llama.cpp's
    own converter."""
    import gguf

    check_tokenizer(tokenizer)
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens: List[Optional[str]] = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    types = []
    for i in range(n):
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    try:
        probe = tokenizer("a")["input_ids"]
        add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    except Exception:
        add_bos = False
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(model="gpt2", pre=_pre_type(tj), tokens=tokens, token_types=types, merges=merges,
                     bos_id=bos, eos_id=eos, pad_id=tokenizer.pad_token_id, unk_id=tokenizer.unk_token_id,
                     add_bos=add_bos, chat_template=template if isinstance(template, str) else None)


def add_vocab(writer, v: GGUFVocab) -> None:
    """Write ``v`` into a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.merges:
        writer.add_token_merges(v.merges)
    for add, tid in ((writer.add_bos_token_id, v.bos_id), (writer.add_eos_token_id, v.eos_id),
                     (writer.add_pad_token_id, v.pad_id), (writer.add_unk_token_id, v.unk_id)):
        if tid is not None:
            add(int(tid))
    writer.add_add_bos_token(bool(v.add_bos))
    if v.chat_template:
        writer.add_chat_template(v.chat_template)


__all__ = ["GGUFVocab", "add_vocab", "check_tokenizer", "vocab_from_tokenizer"]
