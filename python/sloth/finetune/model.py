"""The bundled model: a tiny random-weight ``LlamaForCausalLM`` built from a config with a fixed seed, saved with
its tokenizer in one folder (``<output_dir>/bundled``) that loads on its own, so that the saved LoRA adapter
points at a base model that exists on disk."""

from __future__ import annotations

import os

import torch

#: the shape of the bundled model (about 1.2 M parameters with the bundled tokenizer's vocabulary). The wider
#: initialization (0.1 instead of 0.02) lets logits of the frozen random head span a useful range, so that a
#: LoRA adapter alone can bring the loss well down.
TINY_LLAMA = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=344, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1,
                  tie_word_embeddings=False)


def tiny_llama_config(tokenizer):
    """A ``LlamaConfig`` of :data:`TINY_LLAMA` with the vocabulary and special tokens of ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)


def build_tiny_llama(tokenizer, seed: int = 0):
    """A random-weight tiny ``LlamaForCausalLM`` (fp32), the same for the same tokenizer and seed."""
    from transformers import LlamaForCausalLM

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    return model


def bundled_model_path(cache_dir: str, data_path: str, seed: int = 0) -> str:
    """The folder of the bundled model and its tokenizer (trained on ``data_path``), built on first use."""
    from .tokenizer import bundled_tokenizer

    if not (os.path.isfile(os.path.join(cache_dir, "config.json")) and
            os.path.isfile(os.path.join(cache_dir, "model.safetensors"))):
        tokenizer = bundled_tokenizer(cache_dir, data_path)
        model = build_tiny_llama(tokenizer, seed)
        os.makedirs(cache_dir, exist_ok=True)
        model.save_pretrained(cache_dir)
    return cache_dir
