"""Merged weights of a fine-tuned model: every LoRA layer folded into its base weight (``W + s * B @ A`` in fp32,
NF4 base weights dequantized with :func:`sloth.nf4_dequantize`), cast once to the export dtype, under the
plain Transformers parameter names; and :func:`save_merged`, which writes them as a Transformers checkpoint."""

from __future__ import annotations

import copy
import json
import os
from typing import Dict, Iterator, Tuple, Union

import torch

from ..integrations._models import peft_parts
from .files import atomic_write, save_into

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "f16": torch.float16, "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A torch dtype from ``torch.bfloat16`` / ``"bf16"`` / ``"fp16"`` / ``"fp32"`` (and their long names)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"sloth export: dtype must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"sloth export: dtype must be bf16, fp16 or fp32, got {dtype!r}")
    return _DTYPES[str(dtype).lower()]


def unwrap(model):
    """(the Transformers causal LM, the PeftModel or None) of a PeftModel / Transformers model (DDP-wrapped too)."""
    return peft_parts(getattr(model, "module", model))


# FSDP2 (fully_shard): a sharded parameter is a DTensor; it is gathered here, where it is read (a collective: every
# rank iterates over the merged tensors, and only rank 0 writes them, see save_merged)
def _full(t: torch.Tensor) -> torch.Tensor:
    from ..runtime.distributed import full_tensor

    return full_tensor(t)


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense fp32 tensor ``[out, in]``: NF4 (bitsandbytes ``Linear4bit``)
    dequantized with :func:`sloth.nf4_dequantize` (bitsandbytes' own dequantizer for its CPU-repacked layout)."""
    w = _full(layer.weight)
    qs = getattr(w, "quant_state", None)
    if qs is None:
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"sloth export: cannot merge a {type(layer).__name__} weight of dtype {w.dtype}")
        return w.detach().float()
    if getattr(qs, "quant_type", None) != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, qs).float()
    from ..ops.nf4 import nf4_dequantize

    return nf4_dequantize(w.data, qs, dtype=torch.float32)


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """s * B @ A of one LoRA adapter in fp32 ``[out, in]``."""
    if getattr(layer, "use_dora", {}).get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
        raise ValueError("sloth export: DoRA / LoRA variants are not supported by save_merged; merge with PEFT's "
                         "merge_and_unload() first")
    a = layer.lora_A[adapter]
    b = layer.lora_B[adapter]
    if not isinstance(a, torch.nn.Linear) or getattr(b, "bias", None) is not None:
        raise ValueError(f"sloth export: unsupported LoRA layer {type(layer).__name__} (only Linear LoRA without "
                         "bias can be merged)")
    delta = _full(b.weight).detach().float() @ _full(a.weight).detach().float()  # [out, r] @ [r, in]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.t()
    return delta * float(layer.scaling[adapter])


def iter_merged_tensors(model, dtype: Union[str, torch.dtype] = torch.bfloat16,
                        device: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor; on the CPU unless ``device``, then where the weight is) of every tensor of the merged checkpoint of ``model``, one at a time (so that an export
    holds one fp32 weight at a time, not the model): a PeftModel with LoRA adapters, possibly over an NF4 base,
    or a plain Transformers model; every active LoRA adapter merged, plain Transformers names, each tensor cast
    once to ``dtype`` (the merge itself in fp32), in module order. The model is not modified. A tied output
    embedding is left out, as ``save_pretrained`` does."""
    dtype = resolve_dtype(dtype)
    lm, _ = unwrap(model)
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        LoraLayer = ModulesToSaveWrapper = ()  # noqa: N806
    tied = set()
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and emb is not None and getattr(lm.config.get_text_config(), "tie_word_embeddings", False):
        hw = getattr(head, "weight", None)
        if hw is not None and hw is getattr(emb, "weight", None):
            tied = {f"{n}.weight" for n, m in lm.named_modules() if m is head}
    skip = []  # prefixes of modules handled by their parent

    def cast(t):
        t = _full(t)
        if device:
            return t.detach().to(dtype) if t.is_floating_point() else t.detach()
        return t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().to("cpu")

    for name, module in lm.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        pre = f"{name}." if name else ""
        if LoraLayer and isinstance(module, LoraLayer):
            base = module.get_base_layer()
            w = dense_weight(base)
            if not module.merged and not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        w = w + _lora_delta(module, adapter).to(w.device)
            yield pre + "weight", cast(w)
            if getattr(base, "bias", None) is not None:
                yield pre + "bias", cast(base.bias)
            skip.append(pre)
            continue
        if ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
            active = module.active_adapter
            active = active[0] if isinstance(active, (list, tuple)) else active
            inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            for pname, p in inner.state_dict().items():
                if pre + pname not in tied:
                    yield pre + pname, cast(p)
            skip.append(pre)
            continue
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:  # a quantized linear without LoRA
            yield pre + "weight", cast(dense_weight(module))
            if getattr(module, "bias", None) is not None:
                yield pre + "bias", cast(module.bias)
            skip.append(pre)
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pre + pname not in tied:
                yield pre + pname, cast(p)
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield pre + bname, cast(b)


def merged_state_dict(model, dtype: Union[str, torch.dtype] = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """:func:`iter_merged_tensors` as a dict (the whole merged model in memory at once)."""
    return dict(iter_merged_tensors(model, dtype))


def merged_config(model, dtype: torch.dtype):
    """A copy of the model's config for the merged checkpoint: no quantization config, ``dtype`` set."""
    lm, _ = unwrap(model)
    cfg = copy.deepcopy(lm.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    cfg.dtype = dtype
    cfg.architectures = [type(lm).__name__]
    cfg.use_cache = True
    return cfg


def _source_folders(model) -> list:
    """Folders the model's weights were loaded from (its checkpoint, and a PEFT adapter's base model)."""
    lm, peft_model = unwrap(model)
    out = [getattr(lm.config, "_name_or_path", None), getattr(lm, "name_or_path", None)]
    if peft_model is not None:
        for cfg in getattr(peft_model, "peft_config", {}).values():
            out.append(getattr(cfg, "base_model_name_or_path", None))
    return [os.path.realpath(p) for p in out if p and os.path.isdir(p)]


def check_output_folder(model, out_dir: str, overwrite: bool, what: str = "sloth.save_merged") -> None:
    """Refuse ``out_dir`` when it is the folder a weight of ``model`` was loaded from (always: that would
    replace the base model) or when it holds files and ``overwrite`` is False."""
    real = os.path.realpath(out_dir)
    if real in _source_folders(model):
        raise ValueError(f"{what}: {out_dir!r} holds the checkpoint the model was loaded from; saving there would "
                         f"replace the base weights; pick another folder")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{what}: {out_dir!r} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{what}: {out_dir!r} is not empty ({len(os.listdir(out_dir))} entries); pass "
                         f"overwrite=True to replace a model saved there, or pick an empty folder")


def save_merged(model, out_dir: str, tokenizer=None, dtype: Union[str, torch.dtype] = torch.bfloat16, *,
                max_shard_size: int = 5 * 1024**3, overwrite: bool = False) -> str:
    """Save ``model`` (a PeftModel with LoRA / QLoRA adapters, or a fully fine-tuned Transformers model) as a
    plain Transformers checkpoint with the adapters merged: safetensors in ``dtype`` (default bf16; each base
    weight dequantized from NF4 when needed and added to ``s * B @ A`` in fp32, cast once), ``config.json``
    (without quantization config), ``generation_config.json``, and the ``tokenizer`` (with its chat template)
    when given. Shards above ``max_shard_size`` bytes get a ``model.safetensors.index.json``. The in-memory model
    is not modified. Returns ``out_dir``; load it with ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    ``out_dir`` must be new or empty unless ``overwrite=True`` (then an earlier save's shards are replaced); the
    folder the model was loaded from is always refused (the base weights are never deleted). Every file is
    written under a temporary name and renamed into place, so a failed save leaves the earlier files, and a
    symbolic link in ``out_dir`` is replaced rather than written through."""
    from safetensors.torch import save_file

    from ..runtime import distributed

    dtype = resolve_dtype(dtype)
    check_output_folder(model, out_dir, overwrite)
    if distributed.is_fsdp2(model) and not distributed.is_main_process():  # gathers every weight with rank 0
        for _ in iter_merged_tensors(model, dtype):
            pass
        distributed.barrier()  # rank 0 has written everything
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt"}
    written = []  # (temporary file, {name: nbytes}) of each shard, written as soon as it is full
    shard, size = {}, 0

    def flush():
        tmp = os.path.join(out_dir, f".tmp-model-shard-{len(written)}.safetensors")
        save_file(shard, tmp, metadata=meta)
        written.append((tmp, {k: t.numel() * t.element_size() for k, t in shard.items()}))

    try:
        for k, t in iter_merged_tensors(model, dtype):
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_size:
                flush()
                shard, size = {}, 0
            shard[k] = t.contiguous()
            size += n
        if shard or not written:
            flush()
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    new = set()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(out_dir, "model.safetensors"))
        new.add("model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, (tmp, sizes) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, os.path.join(out_dir, fname))
            new.add(fname)
            for k, nb in sizes.items():
                weight_map[k] = fname
                total += nb
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        atomic_write(os.path.join(out_dir, "model.safetensors.index.json"), index.encode())
        new.add("model.safetensors.index.json")
    for old in os.listdir(out_dir):  # an earlier save's shards that the new one does not replace
        if old not in new and old.startswith("model") and \
                (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
            os.remove(os.path.join(out_dir, old))
    lm, _ = unwrap(model)
    gen = getattr(lm, "generation_config", None)

    def save_rest(d):
        merged_config(model, dtype).save_pretrained(d)
        if gen is not None:
            try:
                gen.save_pretrained(d)
            except Exception:  # an invalid generation config must not lose the weights
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    save_into(out_dir, save_rest)
    if distributed.is_fsdp2(model):
        distributed.barrier()
    return out_dir


def checkpoint_files(path: str):
    """The safetensors files of a (possibly sharded) checkpoint directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = []
    for fname in files:
        full = os.path.join(path, fname)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"sloth export: {full} not found; expected a safetensors checkpoint in {path}")
        out.append(full)
    return out


def iter_checkpoint_tensors(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a safetensors checkpoint directory, read one at a time."""
    from safetensors import safe_open

    for full in checkpoint_files(path):
        with safe_open(full, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    return dict(iter_checkpoint_tensors(path))


__all__ = ["check_output_folder", "checkpoint_files", "dense_weight", "iter_checkpoint_tensors", "iter_merged_tensors", "load_state_dict",
           "merged_config", "merged_state_dict", "resolve_dtype", "save_merged", "unwrap"]
