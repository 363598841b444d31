"""GGUF export for llama.cpp / Ollama: :func:`save_gguf` writes a fine-tuned (merged) model with the ``gguf``
package (its tensor-name map, writer and quantizers; the k-quants it lacks come from :mod:`sloth.export.kquants`),
with its tokenizer and chat template, and an Ollama Modelfile.

Quantizations: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0`` and the k-quant mixes ``q4_k_m``, ``q5_k_m``,
``q6_k``, with llama.cpp's per-tensor choices (``llama-quantize``): norms and other 1-D tensors f32; the output
head (or a tied embedding) Q6_K; in ``q4_k_m`` / ``q5_k_m`` the ``attn_v`` and ``ffn_down`` weights of the first
and last eighth of the layers and of every third layer between them Q6_K; rows whose length is not a multiple of
256 fall back to Q5_0 / Q5_1 / Q8_0 (and to f16 when not a multiple of 32).

What each family's llama.cpp architecture expects (``EXPORT_FAMILIES``, the one place holding it):

- Llama, Mistral (no sliding window) -> ``llama``: q / k rows reordered per head from Transformers' rotate-half
  RoPE layout to GGML's adjacent pairs; ``rope_freqs`` for Llama 3.1-style rope scaling; linear scaling.
- Qwen3 -> ``qwen3``: NeoX RoPE (no reordering), ``attn_q_norm`` / ``attn_k_norm``, head dimension written.
- Gemma 3 (text) -> ``gemma3``: every ``*norm.weight`` stored as ``1 + w`` (GGML multiplies by the weight), four
  norms per block (``attn_norm``, ``post_attention_norm``, ``ffn_norm``, ``post_ffw_norm``), the global layers'
  rope base, the sliding window; llama.cpp fixes the rest (every sixth layer global, local rope base 10000,
  attention scale 1 / sqrt(head_dim)), so checkpoints that differ are refused.

Tokenizers: byte-level BPE (Llama 3, Qwen; llama.cpp's ``gpt2`` model) and SentencePiece-style BPE with byte
fallback (Gemma 3, Llama 2, Mistral v0.x; llama.cpp's ``llama`` model), see :mod:`sloth.export.gguf_vocab`.

Not exported (refused before anything is written, by :func:`check_exportable`): attention / MLP biases, other rope
scalings, Qwen3 sliding windows, logit softcapping, other tokenizers (Unigram, WordPiece); for those,
:func:`sloth.save_merged` and llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from .. import models
from .merge import checkpoint_files, iter_merged_tensors, unwrap

QUANTS = ("f16", "bf16", "q8_0", "f32", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
@dataclasses.dataclass(frozen=True)
class ExportFamily:
    """What the GGUF exporter needs to know about a model family."""

    arch: str  # llama.cpp architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False  # q / k rows to GGML's adjacent-pair RoPE layout (the llama architecture)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's 1 + w)
    name: str = ""


#: llama.cpp architectures whose RoPE rotates adjacent pairs (q / k rows are permuted from Transformers' halves)
_ADJACENT_PAIR_ROPE = ("llama",)


def _export_of(spec) -> ExportFamily:
    return ExportFamily(spec.gguf_arch, permute_qk=spec.gguf_arch in _ADJACENT_PAIR_ROPE, norm_shift=spec.norm.offset,
                        name=spec.name)


#: Transformers model_type -> its GGUF export, from the model registry (``FamilySpec.gguf_arch``, norm offset)
EXPORT_FAMILIES: Dict[str, ExportFamily] = {mt: _export_of(s) for mt, s in models.FAMILIES.items() if s.gguf_arch}
#: llama.cpp's Gemma 3: every sixth layer global, local layers' rope base 10000
GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("sloth.save_gguf needs the gguf package: pip install gguf (or pip install 'sloth[train]')") \
            from None
    return gguf


def export_family(config) -> Optional[ExportFamily]:
    """The GGUF export of ``config``'s family, or None when it has none."""
    spec = models.for_config(config)
    return _export_of(spec) if spec is not None and spec.gguf_arch else None


def _rope_params(config) -> Tuple[dict, Optional[dict]]:
    """(global layers' rope parameters, sliding layers' or None) of a Transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        return dict(params["full_attention"] or {}), params.get("sliding_attention")
    scaling = getattr(config, "rope_scaling", None) or {}
    out = dict(scaling) if isinstance(scaling, dict) else {}
    out.update(params if isinstance(params, dict) else {})
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    local = None
    if getattr(config, "rope_local_base_freq", None) is not None:
        local = {"rope_theta": config.rope_local_base_freq}
    return out, local


def _rope(config) -> Tuple[float, Optional[dict]]:
    """(rope theta of the global layers, rope scaling parameters or None); an unsupported scaling raises."""
    p, _ = _rope_params(config)
    theta = float(p.get("rope_theta", 10000.0))
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    fam = export_family(config)
    allowed = ("llama3", "linear") if fam is not None and fam.arch == "llama" else ("linear",)
    if kind not in allowed:
        raise ValueError(f"sloth.save_gguf: rope scaling {kind!r} is not exported for this family (only "
                         f"{' / '.join(allowed)})")
    return theta, dict(p, rope_type=kind)


def head_dim(config) -> int:
    """Per-head dimension of the attention (``head_dim`` when the config sets it, else hidden / heads)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_exportable(config, tokenizer=None) -> None:
    """Raise ValueError (one line, what to do instead) unless ``config`` (and ``tokenizer`` when given) is
    something :func:`save_gguf` writes correctly: every limit of the exporter is checked here, before any work."""
    fam = export_family(config)
    mt = getattr(config, "model_type", None)
    if fam is None:
        names = ", ".join(f.name for f in EXPORT_FAMILIES.values())
        raise ValueError(f"sloth.save_gguf: GGUF export supports {names}, not {mt!r}; save the merged model "
                         f"(sloth.save_merged / --export merged) and convert it with llama.cpp's convert_hf_to_gguf.py")
    why = []
    if getattr(config, "attention_bias", False):
        why.append("attention biases (attention_bias=True)")
    if getattr(config, "mlp_bias", False):
        why.append("MLP biases (mlp_bias=True)")
    if mt == "mistral" and getattr(config, "sliding_window", None):
        why.append("a Mistral sliding window")
    if mt == "qwen3" and getattr(config, "use_sliding_window", False):
        why.append("a Qwen3 sliding window")
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            why.append(f"{attr}={getattr(config, attr)}")
    if mt == "gemma3_text":
        n = int(config.num_hidden_layers)
        want = ["full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(n)]
        types = list(getattr(config, "layer_types", None) or want)
        if types != want:
            why.append(f"layer types other than llama.cpp's (every {GEMMA3_GLOBAL_EVERY}th layer global)")
        _, local = _rope_params(config)
        if local is not None and float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)) != GEMMA3_LOCAL_ROPE_BASE:
            why.append(f"a local rope base other than {GEMMA3_LOCAL_ROPE_BASE:g}")
        if local is not None and (local.get("rope_type") or "default") != "default":
            why.append("rope scaling on the sliding layers")
        qpas = getattr(config, "query_pre_attn_scalar", None)
        if qpas is not None and int(qpas) != head_dim(config) and n != 62:
            why.append(f"query_pre_attn_scalar={qpas} (llama.cpp scales by head_dim={head_dim(config)})")
    try:
        _rope(config)
    except ValueError as e:
        why.append(str(e).removeprefix("sloth.save_gguf: "))
    if why:
        raise ValueError(f"sloth.save_gguf: {fam.name} with {'; '.join(why)} is not exported to GGUF; save the merged "
                         f"model (sloth.save_merged / --export merged) and convert it with llama.cpp's "
                         f"convert_hf_to_gguf.py")
    if tokenizer is not None:
        from .gguf_vocab import check_tokenizer

        check_tokenizer(tokenizer)


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


def gguf_name(hf_name: str, config) -> Optional[str]:
    """The GGUF tensor name of a Transformers parameter name (``gguf``'s tensor-name map of the family's
    architecture), or None when the architecture has no such tensor."""
    gguf = _require_gguf()
    fam = export_family(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.arch)
    return gguf.get_tensor_name_map(arch, int(config.num_hidden_layers)).get_name(
        hf_name, try_suffixes=(".weight", ".bias"))


def gguf_tensor_names(config) -> Dict[str, str]:
    """Transformers parameter name -> GGUF tensor name of every weight of a model of ``config``'s family, in the
    order the modules hold them."""
    prefix = "model.layers.{i}."
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                 "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                 "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    out = {}
    for hf in ["model.embed_tokens.weight"] + [prefix.format(i=i) + p + ".weight"
                                               for i in range(config.num_hidden_layers) for p in per_block] + \
            ["model.norm.weight", "lm_head.weight"]:
        name = gguf_name(hf, config)
        if name is not None:
            out[hf] = name
    return out


# ------------------------------------------------------------------------------------------- tensor types

_BASE = {"q4_0": "Q4_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0"}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: Tuple[int, ...], quant: str, n_layers: int, tied: bool = False) -> str:
    """The GGML type (a ``gguf.GGMLQuantizationType`` name) ``quant`` gives the tensor ``name`` of ``shape``."""
    gguf = _require_gguf()
    if len(shape) < 2 or quant == "f32":
        return "F32"
    if quant in ("f16", "bf16"):
        return quant.upper()
    cols = shape[-1]
    base = _BASE[quant]

    def block(t):
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]

    t = base
    layer = re.match(r"blk\.(\d+)\.", name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = "Q8_0" if cols % block(base) else ("Q6_K" if base != "Q8_0" else "Q8_0")
    elif quant in ("q4_k_m", "q5_k_m") and layer and (".attn_v." in name or ".ffn_down." in name):
        if use_more_bits(int(layer.group(1)), n_layers):
            t = "Q6_K"
    if cols % block(t):
        t = _FALLBACK.get(t, "F16")
        if cols % block(t):
            t = "F16"
    return t


def encode(t: torch.Tensor, ggml_type: str):
    """(numpy data, raw GGML type or None) of ``t`` in ``ggml_type``; the k-quants run where ``t`` is (a GPU
    tensor is quantized on the GPU), the others through ``gguf.quants``."""
    gguf = _require_gguf()
    Q = gguf.GGMLQuantizationType
    if ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
        from .kquants import QUANTIZERS

        return QUANTIZERS[ggml_type.lower()](t.float()), Q[ggml_type]
    a = t.detach().to("cpu", torch.float32).numpy()
    if ggml_type == "F32":
        return a, None
    if ggml_type == "F16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, Q[ggml_type]), Q[ggml_type]


# ---------------------------------------------------------------------------------------------- sources

def _source(model_or_dir, tokenizer):
    """(config, tokenizer, vocab rows, tied, iterator of (Transformers name, tensor)) of a model (merged one
    tensor at a time) or of a saved checkpoint folder (read one tensor at a time)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        from safetensors import safe_open
        from transformers import AutoConfig

        path = os.fspath(model_or_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"sloth.save_gguf: {path!r} is not a folder; pass a model or a folder written by "
                                    f"sloth.save_merged / save_pretrained")
        config = AutoConfig.from_pretrained(path)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        check_exportable(config, tokenizer)
        where = {}
        for full in checkpoint_files(path):
            with safe_open(full, framework="pt") as f:
                for k in f.keys():
                    where[k] = full
        emb = "model.embed_tokens.weight"
        if emb not in where:
            raise ValueError(f"sloth.save_gguf: {path} has no {emb}")
        with safe_open(where[emb], framework="pt") as f:
            rows = f.get_slice(emb).get_shape()[0]
        order = list(gguf_tensor_names(config))  # one order whatever the source (safetensors sorts by name)
        keys = [k for k in order if k in where] + [k for k in where if k not in order]
        tied = "lm_head.weight" not in where

        def tensors():
            for k in keys:
                with safe_open(where[k], framework="pt") as f:
                    yield k, f.get_tensor(k)

        return config, tokenizer, rows, tied, tensors()
    lm, _ = unwrap(model_or_dir)
    config = lm.config
    check_exportable(config, tokenizer)
    rows = lm.get_input_embeddings().weight.shape[0]
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    return config, tokenizer, rows, tied, iter_merged_tensors(model_or_dir, torch.float32, device=True)


def _write_metadata(w, gguf, config, fam: ExportFamily, rows: int, quant: str, name: str) -> None:
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    d = head_dim(config)
    theta, scaling = _rope(config)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if d != config.hidden_size // n_head or fam.arch != "llama":
        w.add_key_length(d)
        w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(theta)
    if scaling is not None and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if fam.arch == "gemma3" and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))
    w.add_vocab_size(int(rows))
    w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[quant])))
    if quant not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def save_gguf(model_or_dir, out_path: str, quant: str = "f16", tokenizer=None, *, name: Optional[str] = None,
              modelfile: Union[bool, str] = True) -> str:
    """Write a GGUF file of a model for llama.cpp / Ollama (Llama, Mistral, Qwen3, Gemma 3 text).

    ``model_or_dir``: a PeftModel (its LoRA adapters are merged in fp32, NF4 base weights dequantized), a
    Transformers model, or a folder written by :func:`sloth.save_merged` / ``save_pretrained``. ``quant``:
    ``"f16"``, ``"bf16"``, ``"f32"``, ``"q8_0"``, ``"q4_0"``, ``"q4_k_m"``, ``"q5_k_m"`` or ``"q6_k"`` (the mixes
    llama.cpp's ``llama-quantize`` makes; see the module docstring). ``tokenizer``: its vocabulary, merges, special
    tokens and chat template go into the file (loaded from the folder when not given; required for a model). With
    ``modelfile`` an Ollama ``Modelfile`` is written beside it (``ollama create NAME -f Modelfile``; a string names
    its path). The file is written to a temporary name and renamed at the end. Returns ``out_path``.
    """
    gguf = _require_gguf()
    quant = str(quant).lower()
    if quant not in QUANTS:
        raise ValueError(f"sloth.save_gguf: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if tokenizer is None and not isinstance(model_or_dir, (str, os.PathLike)):
        raise ValueError("sloth.save_gguf: pass tokenizer= (its vocabulary and chat template go into the GGUF file)")
    config, tokenizer, rows, tied, tensors = _source(model_or_dir, tokenizer)
    from .gguf_vocab import add_vocab, vocab_from_tokenizer
    from .modelfile import write_modelfile

    fam = export_family(config)
    names = gguf_tensor_names(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    n_layers = int(config.num_hidden_layers)
    vocab = vocab_from_tokenizer(tokenizer, rows)
    if len(vocab.tokens) != rows:
        raise ValueError(f"sloth.save_gguf: the tokenizer has {len(vocab.tokens)} tokens but the embedding has "
                         f"{rows} rows")
    _, scaling = _rope(config)
    out_path = os.fspath(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, fam.arch)
        _write_metadata(w, gguf, config, fam, rows, quant, name or os.path.splitext(os.path.basename(out_path))[0])
        add_vocab(w, vocab)
        if scaling is not None and scaling["rope_type"] == "llama3":
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        for hf, t in tensors:  # one tensor at a time: the file holds the encoded model, never an fp32 copy
            if "rotary_emb" in hf:
                continue
            if hf not in names:
                raise ValueError(f"sloth.save_gguf: tensor {hf!r} has no GGUF name in the {fam.arch} architecture")
            t = t.float()
            if fam.permute_qk and hf.endswith("self_attn.q_proj.weight"):
                t = rope_to_interleaved(t, n_head)
            elif fam.permute_qk and hf.endswith("self_attn.k_proj.weight"):
                t = rope_to_interleaved(t, n_kv)
            if fam.norm_shift and hf.endswith("norm.weight"):
                t = t + fam.norm_shift
            gname = names[hf]
            data, raw = encode(t, tensor_type(gname, tuple(t.shape), quant, n_layers, tied))
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if modelfile:
        write_modelfile(out_path, tokenizer, add_bos=vocab.add_bos,
                        path=modelfile if isinstance(modelfile, str) else None)
    return out_path


__all__ = ["EXPORT_FAMILIES", "ExportFamily", "QUANTS", "check_exportable", "encode", "export_family", "gguf_name",
           "gguf_tensor_names", "interleaved_to_rope", "llama3_rope_factors", "rope_to_interleaved", "save_gguf",
           "tensor_type", "use_more_bits"]
