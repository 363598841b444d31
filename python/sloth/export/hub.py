"""The saving methods notebooks call on the model (``model.save_pretrained_merged``, ``save_pretrained_gguf``,
``push_to_hub_merged``, ``push_to_hub_gguf``), on :func:`sloth.save_merged` / :func:`sloth.save_gguf`; the hub
uploads go through ``huggingface_hub`` (``create_repo`` + ``upload_folder``). :func:`attach` puts them on a model."""

from __future__ import annotations

import os
import tempfile
import types
from typing import List, Optional, Sequence, Union

#: save_method -> merged dtype (None: the adapter only)
SAVE_METHODS = {"merged_16bit": "16bit", "merged_32bit": "fp32", "lora": None}
#: quantization_method names of the notebooks -> sloth.save_gguf's quant
GGUF_METHODS = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "f16": "f16", "bf16": "bf16",
                "f32": "f32", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k_m", "q5_k_m": "q5_k_m", "q6_k": "q6_k"}


def _dtype_16(model) -> str:
    """bf16 when the model computes in bf16 (or on a GPU that has it), else fp16."""
    import torch

    from .merge import unwrap

    lm, _ = unwrap(model)
    w = lm.get_input_embeddings().weight
    if w.dtype in (torch.bfloat16, torch.float16):
        return "bf16" if w.dtype == torch.bfloat16 else "fp16"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           overwrite: bool = True, **kwargs) -> str:
    """``save_method="merged_16bit"``: the adapters merged into 16-bit safetensors (bf16 where the model computes
    in bf16, else fp16) with ``tokenizer``; ``"merged_32bit"``: fp32; ``"lora"``: the adapter and tokenizer only.
    Re-saving into the same folder replaces the earlier save (``overwrite``); the folder the base model was loaded
    from is always refused. ``merged_4bit`` is not supported (a 4-bit merge loses the LoRA update's precision).
    Returns the folder."""
    from .merge import check_output_folder, save_merged

    if save_method not in SAVE_METHODS:
        raise ValueError(f"sloth: save_method must be one of {', '.join(SAVE_METHODS)}, got {save_method!r}"
                         + ("; merging into 4-bit weights is not supported (save merged_16bit and quantize it, e.g. "
                            "to GGUF)" if "4bit" in str(save_method) else ""))
    ignored = sorted(k for k in kwargs if k not in ("push_to_hub", "token", "maximum_memory_usage",
                                                    "temporary_location", "safe_serialization"))
    if ignored:
        raise TypeError(f"sloth: save_pretrained_merged got unexpected arguments {', '.join(ignored)}")
    method = SAVE_METHODS[save_method]
    if method is None:
        check_output_folder(model, save_directory, overwrite, "sloth: save_pretrained_merged")
        os.makedirs(save_directory, exist_ok=True)
        model.save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        return save_directory
    dtype = _dtype_16(model) if method == "16bit" else method
    return save_merged(model, save_directory, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)


def _quants(quantization_method: Union[str, Sequence[str]]) -> List[str]:
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    out = []
    for m in methods:
        key = str(m).lower()
        if key not in GGUF_METHODS:
            raise ValueError(f"sloth: quantization_method {m!r} is not supported; use one of "
                             f"{', '.join(GGUF_METHODS)}")
        if GGUF_METHODS[key] not in out:
            out.append(GGUF_METHODS[key])
    return out


def save_pretrained_gguf(model, save_directory: str, tokenizer=None,
                         quantization_method: Union[str, Sequence[str]] = "fast_quantized", **kwargs) -> List[str]:
    """GGUF files of the merged model in ``save_directory`` (``model.<QUANT>.gguf`` per quantization, e.g.
    ``q4_k_m``, ``q8_0``, ``f16``, or a list of them; ``quantized`` = q4_k_m, ``fast_quantized`` = q8_0,
    ``not_quantized`` = f16) and an Ollama ``Modelfile`` for the first. No llama.cpp build is needed. Returns the
    paths."""
    from .gguf import save_gguf

    if tokenizer is None:
        raise ValueError("sloth: save_pretrained_gguf needs the tokenizer (model.save_pretrained_gguf(dir, tokenizer, "
                         "quantization_method=...))")
    os.makedirs(save_directory, exist_ok=True)
    paths = []
    for i, q in enumerate(_quants(quantization_method)):
        path = os.path.join(save_directory, f"model.{q.upper()}.gguf")
        save_gguf(model, path, quant=q, tokenizer=tokenizer, modelfile=(i == 0) and
                  os.path.join(save_directory, "Modelfile"))
        paths.append(path)
    return paths


def _upload(folder: str, repo_id: str, token: Optional[str], private: Optional[bool], commit_message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token or None)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return repo_id


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: Optional[str] = None, private: Optional[bool] = None,
                       commit_message: str = "Upload model trained with sloth", **kwargs) -> str:
    """:func:`save_pretrained_merged` into a temporary folder, uploaded to the hub repository ``repo_id``
    (created when missing) with ``huggingface_hub``. Returns ``repo_id``."""
    with tempfile.TemporaryDirectory(prefix="sloth-push-") as tmp:
        save_pretrained_merged(model, tmp, tokenizer, save_method=save_method, overwrite=True, **kwargs)
        return _upload(tmp, repo_id, token, private, commit_message)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method: Union[str, Sequence[str]] = "fast_quantized",
                     token: Optional[str] = None, private: Optional[bool] = None,
                     commit_message: str = "Upload GGUF model made with sloth", **kwargs) -> str:
    """:func:`save_pretrained_gguf` into a temporary folder, uploaded to the hub repository ``repo_id`` (created
    when missing) with ``huggingface_hub``. Returns ``repo_id``."""
    with tempfile.TemporaryDirectory(prefix="sloth-push-") as tmp:
        save_pretrained_gguf(model, tmp, tokenizer, quantization_method=quantization_method)
        return _upload(tmp, repo_id, token, private, commit_message)


METHODS = {"save_pretrained_merged": save_pretrained_merged, "save_pretrained_gguf": save_pretrained_gguf,
           "push_to_hub_merged": push_to_hub_merged, "push_to_hub_gguf": push_to_hub_gguf}


def attach(model):
    """Bind the four methods to ``model`` (and to the Transformers model inside a PeftModel); returns it."""
    targets = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        targets.append(get_base())
    for t in targets:
        for name, fn in METHODS.items():
            t.__dict__[name] = types.MethodType(fn, model)
    return model


__all__ = ["GGUF_METHODS", "SAVE_METHODS", "attach", "push_to_hub_gguf", "push_to_hub_merged", "save_pretrained_gguf",
           "save_pretrained_merged"]
