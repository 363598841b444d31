"""Put sloth's kernels into Transformers models: ``sloth.patch(model)`` / ``sloth.unpatch(model)``.

Supported: the families of :mod:`sloth.models` (Llama 3, Qwen3, Mistral, Gemma 3 text, gpt-oss, Qwen3-MoE;
``*ForCausalLM``), bare or wrapped in a PEFT ``PeftModel``; of another family only the PEFT LoRA layers, with one
warning. What is replaced (each listed with ``verbose=True``):

- every RMSNorm module (``LlamaRMSNorm``, ``Qwen3RMSNorm`` incl. the q_norm / k_norm of attention,
  ``MistralRMSNorm``, ``Gemma3RMSNorm``): its ``forward`` becomes :func:`sloth.nn.rms_norm` with the family's
  rounding order (Llama / Qwen / Mistral: ``w * round(x * rstd)``; Gemma 3: ``round(x * rstd * (1 + w))``,
  all in fp32). Transformers has no registry for norms, so the module's forward is replaced on the instance.
- the causal-LM head + loss: the ``*ForCausalLM`` instance's ``forward`` is wrapped. When ``labels`` is
  given, it runs the base model, takes the last hidden state (sliced by ``logits_to_keep`` as the model
  does) and computes the loss with :func:`sloth.causal_lm_loss` (chunked linear cross-entropy, with the
  config's ``final_logit_softcapping`` for Gemma 3, ``num_items_in_batch`` / ``shift_labels`` from the
  kwargs, ignore_index -100) **without materializing the logits: the output's ``logits`` is None**. Without
  labels the original forward runs unchanged (logits are returned as usual).
- every MLP module (``LlamaMLP``, ``Qwen3MLP``, ``MistralMLP``, ``Gemma3MLP``): gate / up / down and the GLU
  activation run through :func:`sloth.lora_mlp` (fused activation, in-place backward; token chunks for long
  sequences), see :mod:`sloth.integrations.mlp`. In Llama, Qwen3 and Mistral decoder layers the MLP is marked so
  that the recompute of offloaded checkpointing skips the down projection's product, which nothing reads.
- PEFT LoRA layers (when the model is a ``PeftModel``): :func:`sloth.integrations.peft.patch_peft_model`.
- the causal LM's ``generate``: on CUDA, supported calls (greedy or sampled, no beams) decode by replaying one
  captured CUDA graph per token on a static KV cache (:mod:`sloth.integrations.generation`); everything else
  runs the model's own ``generate``.

- every attention module (``LlamaAttention``, ``Qwen3Attention``, ``MistralAttention``, ``Gemma3Attention``):
  its forward is wrapped so that the rotary embedding of q and k runs on :func:`sloth.rope`, in place (see
  :mod:`sloth.integrations.rope`).

- the attention function of families whose attention SDPA cannot express (``FamilySpec.attention_kernel``,
  gpt-oss's sinks): Transformers' attention ``"sloth"`` (:mod:`sloth.integrations.attention`); with
  ``SLOTH_MOE_EXPERTS=1``, the experts of MoE families: Transformers' experts ``"sloth"``
  (:mod:`sloth.integrations.moe`); for MoE models the router load-balancing loss is added as their own forward does.

Otherwise the attention computation stays the model's own (SDPA / eager / flash), except that under offloaded
checkpointing on CUDA the ``"sdpa"`` function saves plain causal attention's output for the recompute
(:mod:`sloth.integrations.sdpa`); Gemma 3's embedding scale sqrt(hidden) and sliding-window layers are
untouched. gpt-oss's half-split RoPE is the model's own. :func:`unpatch` restores every replaced attribute and
implementation exactly.

With TRL: when ``trl`` is imported, :func:`patch` also hooks TRL's fused LM head so that trainers built on the
patched model compute their per-token log-probs with sloth's kernel (see :mod:`sloth.integrations.fused_head`).
"""

from __future__ import annotations

import functools
import logging
import sys
import types
import warnings

import torch

from .. import config, models
from ..nn.linear_cross_entropy import causal_lm_loss
from ..nn.norm_rope import rms_norm
from ._models import peft_parts
from .mlp import OUTPUT_FEEDS_RESIDUAL, glu_kind_of, sloth_mlp_forward
from .rope import install_dispatcher, sloth_attention_forward

logger = logging.getLogger("sloth")

_RECORD = "_sloth_patches"  # on the patched (top-level) model: ([(module, had_own, old, what)], is_peft, [LoRA lines])

_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_IMPL = "_sloth_impl:"  # record entries that switched an implementation ("attn" / "experts"), not a method
_FUSED_HEAD = "_sloth_fused_head"  # sloth.integrations.trl's fused LM head on a causal LM


def _rms_norm_forward(self, x, norm: models.NormSpec):
    w = self.weight
    if w.dtype != x.dtype and not norm.cast_before_weight and x.dtype == torch.float32:
        w = w.float()  # Gemma computes (1 + w.float()) anyway: exact
    if w.dtype != x.dtype or x.device.type not in ("cpu", "cuda") or x.shape[-1] != w.shape[0] or x.numel() == 0:
        return self._sloth_orig_forward(x)  # mixed dtypes promote in Llama's order: keep the model's own code
    return rms_norm(x, w, getattr(self, norm.eps_attr), norm.offset, norm.cast_before_weight)


def _slice_to_keep(hidden, logits_to_keep):
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        return slice_logits_to_keep(hidden, logits_to_keep)
    except ImportError:  # older Transformers: the int / 1-D tensor forms
        if isinstance(logits_to_keep, int):
            return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        return hidden[:, logits_to_keep, :]


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """sloth's ForCausalLM forward: with ``labels``, the loss from the last hidden state through the chunked
    linear cross-entropy, and ``logits=None`` (never materialized); without, the model's own forward."""
    lm_head = self.get_output_embeddings()
    if kwargs.get("fused_lm_head") is False:
        kwargs.pop("fused_lm_head")
    if "fused_lm_head" in kwargs:  # a fused LM head (TRL's or sloth's) under sloth's forward: it runs as it is
        given = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache)
        return self._sloth_orig_forward(**{k: v for k, v in given.items() if v is not None}, **kwargs)
    if past_key_values is not None:  # only when given: newer Transformers take the cache as `cache`
        kwargs["past_key_values"] = past_key_values
    if labels is None or type(lm_head) is not torch.nn.Linear:
        return self._sloth_orig_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                        logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    router = kwargs.get("output_router_logits")
    router = getattr(self.config, "output_router_logits", False) if router is None else router
    aux_loss_fn = getattr(sys.modules.get(type(self).__module__), "load_balancing_loss_func", None)
    if router and aux_loss_fn is None:  # an MoE model whose router loss sloth cannot find: the model's own forward
        return self._sloth_orig_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                        logits_to_keep=logits_to_keep, **kwargs)
    if router:
        kwargs["output_router_logits"] = True
    return_dict = kwargs.pop("return_dict", None)
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_ONLY_KWARGS if k in kwargs}
    base = getattr(self, self.base_model_prefix)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = _slice_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = causal_lm_loss(
        hidden, lm_head.weight, labels, num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
        ignore_index=loss_kwargs.get("ignore_index", -100), shift_labels=loss_kwargs.get("shift_labels"),
        bias=lm_head.bias, final_logit_softcapping=getattr(self.config, "final_logit_softcapping", None))
    fields = dict(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    cls = CausalLMOutputWithPast
    if router:  # the family's load-balancing loss, as its own forward adds it
        aux = aux_loss_fn(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
        fields.update(loss=loss + self.router_aux_loss_coef * aux.to(loss.device), aux_loss=aux,
                      router_logits=outputs.router_logits)
        cls = MoeCausalLMOutputWithPast
    cache_field = "cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"  # (renamed in Transformers 5)
    fields[cache_field] = getattr(outputs, cache_field, None)
    out = cls(**fields)
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return out.to_tuple()
    return out


def _replace_method(record, module, fn, what, attr="forward"):
    """Bind ``fn`` as ``module.<attr>`` (the previous one kept as ``module._sloth_orig_<attr>``) and record it."""
    had_own = attr in module.__dict__
    old = module.__dict__.get(attr)
    setattr(module, f"_sloth_orig_{attr}", getattr(module, attr))
    setattr(module, attr, types.MethodType(fn, module))
    record.append((module, attr, had_own, old, what))


def _set_flag(record, module, attr):
    """Set ``module.<attr> = True`` on the instance and record it (undone by :func:`unpatch`; not listed)."""
    had_own = attr in module.__dict__
    record.append((module, attr, had_own, module.__dict__.get(attr), None))
    module.__dict__[attr] = True


def _generate(self, *args, **kwargs):
    """sloth's ``generate``: graph-captured decoding where supported, the model's own otherwise."""
    from .generation import graphed_generate

    return graphed_generate(self, self._sloth_orig_generate, *args, **kwargs)


def _peft_base(model):
    """(the Transformers model inside, is_peft) for a PeftModel; (model, False) otherwise."""
    base, peft_model = peft_parts(model)
    return base, peft_model is not None


def _lora_descriptions(model) -> list[str]:
    """One line per PEFT LoRA layer of ``model`` that :func:`sloth.integrations.peft.patch_peft_model` patched."""
    from .peft import patched_lora_layers

    out = []
    for name, module in patched_lora_layers(model):
        base = module.get_base_layer()
        kind = "NF4" if getattr(base.weight, "quant_state", None) is not None else str(base.weight.dtype).replace("torch.", "")
        out.append(f"{name}: {type(module).__name__}.forward ({kind} base) -> sloth.lora_linear")
    return out


def patch(model, verbose: bool = False):
    """Route ``model``'s RMSNorms and causal-LM loss through sloth (see the module docstring); LoRA layers
    too when ``model`` is a PeftModel. Idempotent; returns ``model``. Undo with :func:`unpatch`.

    Every replacement is logged (logger ``sloth``, INFO) and, with ``verbose=True``, printed one per line;
    :func:`patched_modules` returns the same list."""
    if _RECORD in model.__dict__:
        if verbose:
            print(f"sloth.patch: {type(model).__name__} is already patched")
        return model
    base, is_peft = _peft_base(model)
    record: list = []
    names = {m: n for n, m in base.named_modules()}
    norms, mlps, attentions, causal_lms = models.norms(), models.mlps(), models.rope_attentions(), models.causal_lms()
    layers = models.decoder_layers()
    residual_mlps = {m.mlp for m in base.modules() if type(m).__name__ in layers and
                     layers[type(m).__name__].mlp_output_feeds_residual and
                     isinstance(getattr(m, "mlp", None), torch.nn.Module)}
    has_attention = False
    for module in base.modules():
        cls = type(module).__name__
        if "_sloth_orig_forward" in module.__dict__:
            continue
        if cls in norms:
            norm = norms[cls]
            weight = f"({norm.offset:g}+w)" if norm.offset else "w"
            order = f"round(x*rstd)*{weight}" if norm.cast_before_weight else f"round(x*rstd*{weight})"
            _replace_method(record, module, functools.partial(_rms_norm_forward, norm=norm),
                            f"{names[module] or '<root>'}: {cls}.forward -> sloth.rms_norm (offset={norm.offset:g}, "
                            f"{order})")
        elif cls in mlps and glu_kind_of(module):
            skip = module in residual_mlps
            _replace_method(record, module, sloth_mlp_forward,
                            f"{names[module] or '<root>'}: {cls}.forward -> sloth.lora_mlp (fused {glu_kind_of(module)};"
                            f" the model's forward where a projection is off the fast path"
                            f"{'; no down projection product in the recompute' if skip else ''})")
            if skip:
                _set_flag(record, module, OUTPUT_FEEDS_RESIDUAL)
        elif cls in attentions and install_dispatcher(module):
            has_attention = True
            _replace_method(record, module, sloth_attention_forward,
                            f"{names[module] or '<root>'}: {cls}.forward -> RoPE of q, k by sloth.rope (in place; "
                            f"q, k, v LoRA A products in one GEMM when all three are LoRA layers on the fast "
                            f"path; the attention itself is the model's)")
        elif cls in causal_lms:
            softcap = getattr(module.config, "final_logit_softcapping", None)
            _replace_method(record, module, _causal_lm_forward,
                            f"{names[module] or '<root>'}: {cls}.forward -> loss by sloth.causal_lm_loss "
                            f"(chunked linear cross-entropy, softcap={softcap}; logits=None when labels are given)")
            _replace_method(record, module, _generate,
                            f"{names[module] or '<root>'}: {cls}.generate -> CUDA-graph decoding on a static cache "
                            f"(sloth.integrations.generation; the model's generate where unsupported)",
                            attr="generate")
    spec = models.family_of(base)
    if spec is not None:
        _select_implementations(record, base, spec)
    lora: list = []
    if is_peft:
        from .peft import patch_peft_model

        patch_peft_model(model)
        lora = _lora_descriptions(model)
    model.__dict__[_RECORD] = (record, is_peft, lora)
    if is_peft:  # the Transformers model inside holds the record too: what merge_and_unload() returns can be unpatched
        base.__dict__[_RECORD] = (record, False, [])
    if has_attention:
        from .sdpa import install as install_sdpa

        install_sdpa()  # "sdpa" saves its output in offloaded checkpoints (sloth.integrations.sdpa)
    if "trl" in sys.modules:  # trainers built from now on give this model sloth's fused LM head
        from .fused_head import install

        install()
    if spec is None:
        done = f"patched its {len(lora)} PEFT LoRA layers only" if lora else "nothing patched"
        warnings.warn(f"sloth.patch: {type(base).__name__} (model_type {getattr(base.config, 'model_type', None)!r}) "
                      f"is not a family sloth knows ({done}); supported: {models.supported()}", stacklevel=2)
    whats = patched_modules(model)
    summary = f"sloth.patch: {len(whats) - len(lora)} replacements in {type(base).__name__}" + \
        (f", {len(lora)} LoRA layers" if is_peft else "")
    logger.info(summary)
    for what in whats:
        logger.info("  %s", what)
    if verbose:
        print(summary)
        for what in whats:
            print(f"  {what}")
    return model


def _select_implementations(record, base, spec) -> None:
    """Switch ``base`` to sloth's attention function (families whose ``attention_kernel`` is "sloth") and, with
    ``SLOTH_MOE_EXPERTS=1``, to sloth's experts (MoE families), recording the previous choices for :func:`unpatch`."""
    if spec.attention_kernel == "sloth" and base.config._attn_implementation != "sloth":
        from .attention import register

        if register():
            old = base.config._attn_implementation
            base.set_attn_implementation("sloth")
            record.append((base, _IMPL + "attn", True, old, f"<root>: attention {old!r} -> 'sloth' (sloth.attention: "
                                                             f"sinks, sliding window, packed documents)"))
    experts_classes = models.experts()
    if config.MOE_EXPERTS and any(type(m).__name__ in experts_classes for m in base.modules()) and \
            getattr(base.config, "_experts_implementation", None) != "sloth":
        from .moe import register

        if register():
            old = getattr(base.config, "_experts_implementation", None)
            base.set_experts_implementation("sloth")
            record.append((base, _IMPL + "experts", True, old, f"<root>: experts {old!r} -> 'sloth' (sloth's MoE "
                                                                f"kernels: grouped GEMM, 16-bit / NF4 / MXFP4 experts)"))


def _restore_implementation(module, which: str, old) -> None:
    if which == "attn":
        module.set_attn_implementation(old or "eager")
    else:
        module.set_experts_implementation(old or "eager")


def unpatch(model) -> int:
    """Restore everything :func:`patch` replaced on ``model``; returns the number of restored replacements."""
    entry = model.__dict__.pop(_RECORD, None)
    if entry is None:
        return 0
    record, is_peft, _ = entry
    if is_peft:
        base, _ = _peft_base(model)
        if base.__dict__.get(_RECORD, (None,))[0] is record:
            base.__dict__.pop(_RECORD)
    # emptied in place: the other holder of the same record (a PeftModel and the model inside it) restores nothing
    shared, record = record, list(record)
    shared.clear()
    for module, attr, had_own, old, _ in reversed(record):
        if attr.startswith(_IMPL):
            _restore_implementation(module, attr[len(_IMPL):], old)
            continue
        if attr != "forward":
            if had_own:
                setattr(module, attr, old)
            else:
                module.__dict__.pop(attr, None)
            module.__dict__.pop(f"_sloth_orig_{attr}", None)
            continue
        on_top = None  # sloth's fused LM head added on top of sloth's forward (a TRL trainer built after patch)
        if _FUSED_HEAD in module.__dict__ and getattr(module.__dict__.get("forward"), "__func__", None) \
                is not _causal_lm_forward:
            from .fused_head import remove_fused_lm_head

            on_top = remove_fused_lm_head(module)
        if had_own:
            module.forward = old
        else:
            module.__dict__.pop("forward", None)
        module.__dict__.pop("_sloth_orig_forward", None)
        if _FUSED_HEAD in module.__dict__:  # sloth's head under sloth's forward (patch_trainer): back to TRL's
            from .fused_head import remove_fused_lm_head

            remove_fused_lm_head(module)
        if on_top is not None:  # keep the trainer working: TRL's own head with the same settings
            from .fused_head import reattach_trl_head

            reattach_trl_head(module, on_top)
    n = sum(what is not None for *_, what in record)
    if is_peft:
        from .peft import unpatch_peft_model

        n += unpatch_peft_model(model)
    return n


def patched_modules(model) -> list[str]:
    """The replacements :func:`patch` made on ``model``, one line each (``"<module name>: <class>.forward ->
    <sloth function> (...)"``), PEFT LoRA layers included; empty when ``model`` is not patched."""
    entry = model.__dict__.get(_RECORD)
    return [what for *_, what in entry[0] if what is not None] + list(entry[2]) if entry else []
