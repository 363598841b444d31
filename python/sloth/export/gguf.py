"""GGUF export for llama.cpp / Ollama: :func:`save_gguf` writes a fine-tuned (merged) Llama-architecture model
with the ``gguf`` package, in f16, bf16 or q8_0, with its tokenizer and chat template, and an Ollama Modelfile.

What llama.cpp's ``llama`` architecture expects (names from ``gguf.TENSOR_NAMES`` / ``gguf.Keys``):

- tensors ``token_embd``, ``output_norm``, ``output`` (left out when tied to the embedding), and per block
  ``attn_norm``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_norm``, ``ffn_gate``, ``ffn_up``,
  ``ffn_down``; ``rope_freqs`` for Llama 3.1-style rope scaling;
- ``attn_q`` / ``attn_k`` rows reordered per head from Transformers' rotate-half RoPE layout (dimension i pairs
  with i + d/2) to GGML's adjacent pairs (2i, 2i + 1);
- 1-D tensors (norms, rope factors) in f32; 2-D weights in the chosen type (q8_0 needs rows of a multiple of 32
  values; others fall back to f16);
- ``llama.*`` hyper-parameters (context length, embedding length, blocks, feed-forward length, heads, KV heads,
  RMS epsilon, rope base and dimension count, vocabulary size) and ``general.file_type``.

Supported: ``LlamaForCausalLM`` and ``MistralForCausalLM`` without sliding window (the ``llama`` architecture of
llama.cpp), with byte-level BPE tokenizers. Other families raise a ValueError that says what to do.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from .merge import checkpoint_files, iter_merged_tensors, unwrap

QUANTS = ("f16", "bf16", "q8_0", "f32")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("sloth.save_gguf needs the gguf package: pip install gguf (or pip install 'sloth[train]')") \
            from None
    return gguf


def check_exportable(config) -> None:
    """Raise ValueError unless ``config`` is a model llama.cpp runs as the ``llama`` architecture."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"GGUF export supports the llama architecture (Llama, Mistral), not {mt!r}; save the merged "
                         f"model (sloth.save_merged / --export merged) and convert it with llama.cpp's "
                         f"convert_hf_to_gguf.py")
    if mt == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError("GGUF export: a Mistral model with a sliding window is not the llama architecture; save the "
                         "merged model and convert it with llama.cpp's convert_hf_to_gguf.py")
    _rope(config)


def _rope(config) -> Tuple[float, Optional[dict]]:
    """(rope theta, rope scaling parameters or None) of a Transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or params
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("llama3", "linear"):
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not supported; save the merged model and convert "
                         f"it with llama.cpp's convert_hf_to_gguf.py")
    return float(theta), dict(scaling, rope_type=kind)


def head_dim(config) -> int:
    """Per-head dimension of the attention (``head_dim`` when the config sets it, else hidden / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (GGUF ``rope_freqs``): 1 for high frequencies,
    ``factor`` for low ones, a smooth blend in between. fp32 ``[head_dim / 2]``."""
    theta, sc = _rope(config)
    d = head_dim(config)
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc.get("original_max_position_embeddings", 8192)
    lo_wave, hi_wave = old / lo, old / hi
    out = []
    for f in freqs:
        wave = 2 * math.pi / f
        if wave < hi_wave:
            out.append(1.0)
        elif wave > lo_wave:
            out.append(factor)
        else:
            smooth = (old / wave - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def rope_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q / k projection ``[n_heads * d, in]`` per head from the rotate-half layout (i pairs
    with i + d/2) to adjacent pairs (2i, 2i + 1): row 2i of a head is row i, row 2i + 1 is row i + d/2."""
    out_f = w.shape[0]
    d = out_f // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleaved_to_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`rope_to_interleaved`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_names(config) -> Dict[str, str]:
    """Transformers parameter name -> GGUF tensor name for a llama-architecture model."""
    gguf = _require_gguf()
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    names = {"model.embed_tokens.weight": N[T.TOKEN_EMBD] + ".weight",
             "model.norm.weight": N[T.OUTPUT_NORM] + ".weight", "lm_head.weight": N[T.OUTPUT] + ".weight"}
    # in the modules' order (a model's merged tensors stream in it; a checkpoint's are read in it)
    per_block = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
                 "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
                 "mlp.down_proj": T.FFN_DOWN, "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}
    out = {"model.embed_tokens.weight": names["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        for hf, t in per_block.items():
            out[f"model.layers.{i}.{hf}.weight"] = N[t].format(bid=i) + ".weight"
    out["model.norm.weight"] = names["model.norm.weight"]
    out["lm_head.weight"] = names["lm_head.weight"]
    return out


def _encode(t: torch.Tensor, quant: str, gguf):
    """(numpy data, raw GGML type or None) of one tensor for ``quant``."""
    Q = gguf.GGMLQuantizationType
    t = t.detach().to("cpu", torch.float32)
    if t.dim() == 1 or quant == "f32":
        return t.numpy(), None
    if quant == "q8_0" and t.shape[-1] % 32 == 0:
        from .q8_0 import quantize_q8_0

        return quantize_q8_0(t), Q.Q8_0
    if quant == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), Q.BF16
    return t.to(torch.float16).numpy(), None


def _source(model_or_dir, tokenizer):
    """(config, tokenizer, vocab rows, iterator of (Transformers name, tensor)) of a model (merged one tensor at a
    time) or of a saved checkpoint directory (read one tensor at a time)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        from safetensors import safe_open
        from transformers import AutoConfig

        path = os.fspath(model_or_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"sloth.save_gguf: {path!r} is not a directory; pass a model or a directory "
                                    f"written by sloth.save_merged / save_pretrained")
        config = AutoConfig.from_pretrained(path)
        check_exportable(config)
        where = {}
        for full in checkpoint_files(path):
            with safe_open(full, framework="pt") as f:
                for k in f.keys():
                    where[k] = full
        emb = "model.embed_tokens.weight"
        if emb not in where:
            raise ValueError(f"sloth.save_gguf: {path} has no {emb}; is it a Llama checkpoint?")
        with safe_open(where[emb], framework="pt") as f:
            rows = f.get_slice(emb).get_shape()[0]
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        order = list(gguf_tensor_names(config))  # one order whatever the source (safetensors sorts by name)
        keys = [k for k in order if k in where] + [k for k in where if k not in order]

        def tensors():
            for k in keys:
                with safe_open(where[k], framework="pt") as f:
                    yield k, f.get_tensor(k)

        return config, tokenizer, rows, tensors()
    lm, _ = unwrap(model_or_dir)
    check_exportable(lm.config)
    rows = lm.get_input_embeddings().weight.shape[0]
    return lm.config, tokenizer, rows, iter_merged_tensors(model_or_dir, torch.float32)


def save_gguf(model_or_dir, out_path: str, quant: str = "f16", tokenizer=None, *, name: Optional[str] = None,
              modelfile: Union[bool, str] = True) -> str:
    """Write a GGUF file of a Llama-architecture model for llama.cpp / Ollama.

    ``model_or_dir``: a PeftModel (its LoRA adapters are merged in fp32, NF4 base weights dequantized), a
    Transformers model, or a directory written by :func:`sloth.save_merged` / ``save_pretrained``. ``quant``:
    ``"f16"``, ``"bf16"``, ``"q8_0"`` (blocks of 32 with an fp16 scale, quantized as llama.cpp does) or ``"f32"``;
    norms stay f32. ``tokenizer``: its vocabulary, merges, special tokens and chat template go into the file
    (loaded from the directory when not given; required for a model). With ``modelfile`` an Ollama
    ``Modelfile`` is written beside it (``ollama create NAME -f Modelfile``; a string names its path). Returns
    ``out_path``.
    """
    gguf = _require_gguf()
    if quant not in QUANTS:
        raise ValueError(f"sloth.save_gguf: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config, tokenizer, rows, tensors = _source(model_or_dir, tokenizer)
    if tokenizer is None:
        raise ValueError("sloth.save_gguf: pass tokenizer= (its vocabulary and chat template go into the GGUF file)")
    from .gguf_vocab import add_vocab, vocab_from_tokenizer
    from .modelfile import write_modelfile

    names = gguf_tensor_names(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    vocab = vocab_from_tokenizer(tokenizer, rows)
    if len(vocab.tokens) != rows:
        raise ValueError(f"sloth.save_gguf: the tokenizer has {len(vocab.tokens)} tokens but the embedding has "
                         f"{rows} rows")
    theta, scaling = _rope(config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    w = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or os.path.splitext(os.path.basename(out_path))[0])
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    d = head_dim(config)
    if d != config.hidden_size // n_head:
        w.add_key_length(d)
        w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(theta)
    if scaling is not None and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(rows))
    w.add_file_type(int(file_type))
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, vocab)

    if scaling is not None and scaling["rope_type"] == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    for hf, t in tensors:  # one tensor at a time: the file holds the encoded model, never an fp32 copy
        if "rotary_emb" in hf:
            continue
        if hf not in names:
            raise ValueError(f"sloth.save_gguf: tensor {hf!r} has no GGUF name in the llama architecture")
        t = t.float()
        if hf.endswith("self_attn.q_proj.weight"):
            t = rope_to_interleaved(t, n_head)
        elif hf.endswith("self_attn.k_proj.weight"):
            t = rope_to_interleaved(t, n_kv)
        data, raw = _encode(t, quant, gguf)
        w.add_tensor(names[hf], data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if modelfile:
        write_modelfile(out_path, tokenizer, add_bos=vocab.add_bos,
                        path=modelfile if isinstance(modelfile, str) else None)
    return out_path


__all__ = ["QUANTS", "check_exportable", "gguf_tensor_names", "interleaved_to_rope", "llama3_rope_factors",
           "rope_to_interleaved", "save_gguf"]
