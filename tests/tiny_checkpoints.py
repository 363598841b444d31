"""Tiny random-weight checkpoints of the supported families, saved with a tokenizer, for the tests of
sloth.from_pretrained / sloth.get_peft_model / FastLanguageModel (shapes of the real configurations, scaled down)."""

import functools
import itertools
import json

import torch
import transformers

from sloth.finetune.data import bundled_data_path
from sloth.finetune.tokenizer import train_tokenizer

FAMILIES = ["llama", "qwen3", "mistral", "gemma3"]
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@functools.lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE of about 300 tokens trained on the first 64 bundled examples (well under a second)."""
    with open(bundled_data_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in itertools.islice(f, 64)]
    texts = [v for r in rows for v in r.values() if isinstance(v, str) and v]
    return train_tokenizer(texts, vocab_size=300)


def config(family, tok):
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if family == "llama":
        return transformers.LlamaConfig(**COMMON, **ids, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON, **ids, head_dim=16)
    if family == "mistral":
        return transformers.MistralConfig(**COMMON, **ids, sliding_window=None)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**COMMON, **ids, head_dim=16, sliding_window=4,
                                             final_logit_softcapping=30.0,
                                             layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


def save_checkpoint(family, path, seed=0):
    """Save a random-weight ``family`` model (fp32, norms randomized a little) and the tokenizer to ``path``."""
    tok = tokenizer()
    cfg = config(family, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float()
        with torch.no_grad():  # norms start at 0 (Gemma) / 1 (Llama): make them matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def batch(tok, seed=1):
    """Right-padded token ids, attention mask and labels (-100 on padding) of a few bundled-data sentences."""
    texts = ["Name three primary colors.", "Give me a short poem about the sea and the wind.",
             "What is 2 + 2?", "Translate hello to French, please, and explain why."]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels
