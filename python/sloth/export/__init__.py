"""Saving a fine-tuned model: merged 16-bit safetensors (:func:`save_merged`) and GGUF for llama.cpp / Ollama
(:func:`save_gguf`). Transformers, PEFT and ``gguf`` are imported on use."""

from .gguf import save_gguf
from .merge import save_merged

__all__ = ["save_gguf", "save_merged"]
