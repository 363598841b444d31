"""The tokenizer of a GGUF file, from a Hugging Face fast tokenizer:

- byte-level BPE (Llama 3, Qwen, GPT-2 style, sloth's bundled one) as llama.cpp's ``gpt2`` tokenizer model: the
  token strings by id, their types, the merges;
- SentencePiece-style BPE with byte fallback and ``▁`` for spaces (Gemma 3, Llama 2, Mistral v0.x; their
  ``tokenizer.json``) as llama.cpp's ``llama`` (SentencePiece) model: the pieces, their scores and types. A
  SentencePiece BPE model scores its pieces by creation order (the first merged piece 0, the next -1, ...), which
  is also their id order, so the score of a normal piece is minus its id; llama.cpp's tokenizer, merging the
  highest-scoring adjacent pair first, then reproduces the merges; whether a ``▁`` is prepended to the text
  (``add_space_prefix``) comes from the tokenizer's normalizer / pre-tokenizer;

and for both the special token ids, whether a BOS is prepended, and the chat template."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import List, Optional

SPACE = "\u2581"  # SentencePiece's visible space
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
    scores: Optional[List[float]] = None  # SentencePiece models
    add_space_prefix: Optional[bool] = None  # SentencePiece models


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
    if not pats and any(d.get("type") == "ByteLevel" and d.get("use_regex", True)
                        for d in _walk(tj.get("pre_tokenizer"))):
        return "gpt-2"  # a ByteLevel pre-tokenizer splits with GPT-2's regex (llama.cpp's "gpt-2")
    return "default"


def _kind(tj: dict) -> str:
    """"byte-bpe", "spm-bpe" or "other" for a tokenizer.json dict."""
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        return "other"
    if any(d.get("type") == "ByteLevel" for d in _walk([tj.get("pre_tokenizer"), tj.get("decoder")])):
        return "byte-bpe"
    spaces = any(d.get("type") == "Metaspace" or
                 (d.get("type") == "Replace" and SPACE in json.dumps(d, ensure_ascii=False))
                 for d in _walk([tj.get("normalizer"), tj.get("pre_tokenizer")]))
    return "spm-bpe" if model.get("byte_fallback") and spaces else "other"


def _space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts a ``▁`` before the text (a Prepend normalizer, or a Metaspace that prepends)."""
    for d in _walk([tj.get("normalizer"), tj.get("pre_tokenizer")]):
        if d.get("type") == "Prepend":
            return True
        if d.get("type") == "Metaspace":
            scheme = d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never")
            return scheme in ("always", "first")
    return False


def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless ``tokenizer`` is a fast tokenizer the exporter writes: byte-level BPE, or
    SentencePiece-style BPE with byte fallback."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("sloth.save_gguf: the tokenizer is not a fast (tokenizers) tokenizer; load it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True)")
    tj = json.loads(backend.to_str())
    if _kind(tj) == "other":
        model = tj.get("model", {})
        raise ValueError(f"sloth.save_gguf: only BPE tokenizers are exported (byte-level: Llama 3, Qwen, GPT-2 style; "
                         f"SentencePiece-style with byte fallback: Gemma, Llama 2, Mistral), this one is "
                         f"{model.get('type')} (byte fallback: {model.get('byte_fallback')}); save the merged model "
                         f"with sloth.save_merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer data of a Hugging Face fast tokenizer, padded with unused ``[PAD{i}]`` tokens up to
    ``vocab_size`` (the rows of the embedding). Raises ValueError for a tokenizer that is not byte-level BPE
    (SentencePiece / Unigram / WordPiece): convert those from :func:`sloth.save_merged`'s output with llama.cpp's
    own converter."""
    import gguf

    check_tokenizer(tokenizer)
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    spm = _kind(tj) == "spm-bpe"
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens: List[Optional[str]] = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    unk = tokenizer.unk_token_id
    types, scores = [], []
    for i in range(n):
        score = 0.0
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
            types.append(int(gguf.TokenType.UNUSED))
        elif spm and i == unk:
            types.append(int(gguf.TokenType.UNKNOWN))
        elif i in added:
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tokens[i]):
            types.append(int(gguf.TokenType.BYTE))
        else:
            types.append(int(gguf.TokenType.NORMAL))
            score = -float(i)
        scores.append(score)
    merges = [] if spm else [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    try:
        probe = tokenizer("a")["input_ids"]
        add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    except Exception:
        add_bos = False
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(model="llama" if spm else "gpt2", pre="default" if spm else _pre_type(tj), tokens=tokens,
                     token_types=types, merges=merges, bos_id=bos, eos_id=eos, pad_id=tokenizer.pad_token_id,
                     unk_id=unk, add_bos=add_bos, chat_template=template if isinstance(template, str) else None,
                     scores=scores if spm else None, add_space_prefix=_space_prefix(tj) if spm else None)


def add_vocab(writer, v: GGUFVocab) -> None:
    """Write ``v`` into a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.add_space_prefix is not None:
        writer.add_add_space_prefix(bool(v.add_space_prefix))
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
