"""TRL on sloth: :func:`patch_trainer` for a trainer already built, response-only label masking
(:func:`train_on_responses_only`) and a stand-alone per-token log-prob function for RL code
(:func:`selective_logprobs`). The fused LM head itself is :mod:`sloth.integrations.fused_head`.

- :func:`patch_trainer` on a trainer already built (e.g. one that wrapped the model with ``peft_config=``):
  sloth-patches its model and swaps TRL's head of the model and of a separate ``ref_model`` for sloth's, with the
  temperature / outputs TRL chose.

The reference log-probs of DPO / GRPO with a PEFT model come from the same weights with the adapter disabled
(TRL's ``use_adapter(model, None)`` = PEFT's ``disable_adapter()``; TRL keeps ``ref_model=None``): no second model.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterable, List, Optional, Sequence

import torch

from ._models import peft_parts
from .fused_head import (FUSED_ATTR, IGNORE_INDEX, add_fused_lm_head, head_logprobs, install,
                         is_sloth_patched, trl_head_settings,
                         takes_over)


def _lm_of(model):
    """The causal LM inside a (possibly accelerate-wrapped) PeftModel / Transformers model."""
    model = getattr(model, "module", model)  # DDP
    lm, _ = peft_parts(model)
    return lm


def patch_trainer(trainer):
    """Put a built TRL trainer on sloth: :func:`sloth.patch` its model (norms, loss, LoRA layers) and replace TRL's
    fused LM head of the model and of a separate ``ref_model`` by sloth's (:func:`add_fused_lm_head`, with the
    temperature and outputs TRL chose). Also :func:`install`s the hook for trainers built later. Returns the
    trainer. Idempotent."""
    from .transformers import patch

    install()
    models = [trainer.model]
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        models.append(ref)
    for m in models:
        lm = _lm_of(m)
        trl = trl_head_settings(lm)
        if trl is not None and takes_over(lm):
            add_fused_lm_head(lm, trl["temperature"], trl["cast_lm_head_to_fp32"], trl["outputs"])
        elif trl is None and FUSED_ATTR not in lm.__dict__ and not is_sloth_patched(lm):
            warnings.warn(f"sloth.integrations.trl.patch_trainer: {type(trainer).__name__}'s model has no TRL fused "
                          "LM head (TRL < 1.0?); only sloth.patch is applied", stacklevel=2)
        patch(getattr(m, "module", m))
    return trainer


# ------------------------------------------------------------------------------------- stand-alone log-probs

def selective_logprobs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                       logits_to_keep: Optional[int] = None, completion_mask: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, reference: bool = False, return_entropy: bool = False,
                       position_ids: Optional[torch.Tensor] = None):
    """Per-token log-probabilities of ``input_ids [B, T]`` under ``model`` (a causal LM or a PeftModel), each token
    scored from the position before it, through sloth's chunked kernel (no ``[tokens, vocab]`` logits).

    Returns fp32 ``[B, T - 1]`` (token t+1 given the tokens up to t), or ``[B, logits_to_keep]`` for the last
    ``logits_to_keep`` tokens (GRPO's completions), and with ``return_entropy`` the entropies too. Positions where
    ``attention_mask`` (of the scored token) or ``completion_mask [B, logits_to_keep or T - 1]`` is 0 give 0.
    ``reference=True`` scores with the PEFT adapter disabled (the reference model of DPO / GRPO from the same
    weights). Differentiable when grad is enabled. Matches TRL's ``selective_log_softmax`` of the logits divided
    by ``temperature``.
    """
    lm, peft_model = peft_parts(model)
    if reference and peft_model is None:
        raise ValueError("sloth.integrations.trl.selective_logprobs: reference=True needs a PeftModel (the reference "
                         "is the base model with the adapter disabled); score a separate reference model directly")
    ctx = peft_model.disable_adapter() if reference else contextlib.nullcontext()
    with ctx:
        out = getattr(lm, lm.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # [B, T-1, H]
    targets = input_ids[:, 1:]  # [B, T-1]
    keep = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    if logits_to_keep:
        hidden, targets, keep = hidden[:, -logits_to_keep:], targets[:, -logits_to_keep:], keep[:, -logits_to_keep:]
    if completion_mask is not None:
        if completion_mask.shape != targets.shape:
            raise ValueError(f"sloth.integrations.trl.selective_logprobs: completion_mask has shape "
                             f"{tuple(completion_mask.shape)}, expected {tuple(targets.shape)}")
        keep &= completion_mask.bool()
    labels = targets.masked_fill(~keep, IGNORE_INDEX)
    res = head_logprobs(lm, hidden, labels, temperature=temperature, outputs=("log_probs", "entropy"))
    return (res["log_probs"], res["entropy"]) if return_entropy else res["log_probs"]


# ---------------------------------------------------------------------------------- response-only training

def _part_ids(tokenizer, part) -> List[List[int]]:
    """Token-id spellings of a template part: encoded alone, and as it is encoded after a newline / a space
    (BPE merges across the boundary can change its first token)."""
    if isinstance(part, (list, tuple)) and all(isinstance(x, int) for x in part):
        return [list(part)]
    if not isinstance(part, str) or not part:
        raise ValueError(f"sloth.train_on_responses_only: a template part must be a non-empty string, got {part!r}")
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = [enc(part)]
    for prefix in ("\n", " ", "\n\n"):
        p, full = enc(prefix), enc(prefix + part)
        if full[: len(p)] == p and full[len(p):] and full[len(p):] not in out:
            out.append(full[len(p):])
    return [ids for ids in out if ids]


def response_mask(ids: Sequence[int], instruction_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  starts: Iterable[int] = ()) -> List[bool]:
    """For one row of token ids: True on the tokens of assistant responses, i.e. after a response part and up to
    (not including) the next instruction part or the start of the next packed example (``starts``); the parts
    themselves are False."""
    ids = list(ids)
    starts = set(starts)
    n = len(ids)
    keep = [False] * n
    inside = False
    i = 0

    def match(at, seqs):
        for s in seqs:
            if ids[at: at + len(s)] == list(s):
                return len(s)
        return 0

    while i < n:
        if i in starts:
            inside = False
        m = match(i, response_ids)
        if m:
            inside = True
            i += m
            continue
        m = match(i, instruction_ids)
        if m:
            inside = False
            i += m
            continue
        keep[i] = inside
        i += 1
    return keep


class ResponseOnlyCollator:
    """Wraps a data collator: after it builds a batch, labels outside the assistant responses become -100 (see
    :func:`train_on_responses_only`). Rows of a padding-free batch are split at ``position_ids == 0``."""

    def __init__(self, collator, instruction_ids, response_ids):
        self.collator, self.instruction_ids, self.response_ids = collator, instruction_ids, response_ids

    def __getattr__(self, name):  # TRL reads attributes of its collator (padding_free, ...)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples, *args, **kwargs):
        batch = self.collator(examples, *args, **kwargs)
        ids = batch["input_ids"]
        labels = batch.get("labels")
        labels = ids.clone() if labels is None else labels.clone()
        pos = batch.get("position_ids")
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() if pos is not None else ()
            keep = torch.tensor(response_mask(ids[r].tolist(), self.instruction_ids, self.response_ids, starts),
                                dtype=torch.bool)
            labels[r][~keep] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


def train_on_responses_only(trainer_or_collator, instruction_part, response_part, *, tokenizer=None):
    """Train only on the assistant responses: labels become -100 everywhere except on the tokens after each
    ``response_part`` (e.g. ``"<|start_header_id|>assistant<|end_header_id|>\\n\\n"`` for Llama 3) up to the next
    ``instruction_part`` (e.g. ``"<|start_header_id|>user<|end_header_id|>\\n\\n"``); the assistant's end-of-turn
    token stays trained, the parts themselves do not. Works on padded and padding-free / packed batches.

    ``trainer_or_collator``: a Transformers / TRL trainer (its ``data_collator`` is wrapped in place and the trainer
    returned) or a data collator (a wrapped collator is returned). ``tokenizer`` defaults to the trainer's
    ``processing_class``. The parts may also be given as lists of token ids.
    """
    is_trainer = hasattr(trainer_or_collator, "data_collator") and hasattr(trainer_or_collator, "train")
    collator = trainer_or_collator.data_collator if is_trainer else trainer_or_collator
    if tokenizer is None and is_trainer:
        tokenizer = getattr(trainer_or_collator, "processing_class", None) or getattr(trainer_or_collator,
                                                                                    "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    if tokenizer is None and not all(isinstance(p, (list, tuple)) for p in (instruction_part, response_part)):
        raise ValueError("sloth.train_on_responses_only: pass tokenizer= (or the parts as token-id lists)")
    if collator is None or not callable(collator):
        raise ValueError("sloth.train_on_responses_only: the trainer has no data collator to wrap")
    if isinstance(collator, ResponseOnlyCollator):
        collator = collator.collator
    wrapped = ResponseOnlyCollator(collator, _part_ids(tokenizer, instruction_part),
                                   _part_ids(tokenizer, response_part))
    if is_trainer:
        trainer_or_collator.data_collator = wrapped
        return trainer_or_collator
    return wrapped


# ------------------------------------------------------------------------ TRL's pre-1.0 argument names

#: SFTTrainer keywords of TRL < 1.0 that now live in SFTConfig (old name -> SFTConfig field)
OLD_SFT_TRAINER_ARGS = {"dataset_text_field": "dataset_text_field", "max_seq_length": "max_length",
                        "packing": "packing", "dataset_num_proc": "dataset_num_proc",
                        "dataset_kwargs": "dataset_kwargs"}
_SHIMMED = "_sloth_pre_1_0_names"


def _old_names_line(names) -> None:
    warnings.warn(f"sloth: SFTTrainer / SFTConfig got TRL's pre-1.0 argument names ({', '.join(sorted(names))}); "
                  f"they were passed on as processing_class= / SFTConfig(max_length=, dataset_text_field=, packing=, "
                  f"dataset_num_proc=)", FutureWarning, stacklevel=3)


def install_pre_1_0_names() -> bool:
    """Let ``trl.SFTTrainer`` and ``trl.SFTConfig`` take the argument names notebooks written for TRL < 1.0 pass
    (``SFTTrainer(tokenizer=, dataset_text_field=, max_seq_length=, packing=, dataset_num_proc=,
    dataset_kwargs=)``, ``SFTConfig(max_seq_length=)``): each is moved to its TRL 1.x place, with one
    deprecation line. Idempotent; returns False without TRL."""
    try:
        import trl
        from transformers import TrainingArguments
    except ImportError:
        return False
    trainer_cls, config_cls = trl.SFTTrainer, trl.SFTConfig
    if getattr(trainer_cls.__init__, _SHIMMED, False):
        return True
    trainer_init, config_init = trainer_cls.__init__, config_cls.__init__

    @functools.wraps(config_init)
    def config_shim(self, *args, **kwargs):
        if "max_seq_length" in kwargs:
            if "max_length" in kwargs:
                raise TypeError("SFTConfig: pass max_length (max_seq_length is its pre-1.0 name), not both")
            kwargs["max_length"] = kwargs.pop("max_seq_length")
            _old_names_line(["max_seq_length"])
        config_init(self, *args, **kwargs)

    @functools.wraps(trainer_init)
    def trainer_shim(self, *args, **kwargs):
        old = {k: kwargs.pop(k) for k in list(kwargs) if k in OLD_SFT_TRAINER_ARGS}
        used = list(old)
        if "tokenizer" in kwargs:
            if kwargs.get("processing_class") is not None:
                raise TypeError("SFTTrainer: pass processing_class (tokenizer is its pre-1.0 name), not both")
            kwargs["processing_class"] = kwargs.pop("tokenizer")
            used.append("tokenizer")
        if old:
            args_pos = len(args) > 1
            sft_args = args[1] if args_pos else kwargs.get("args")
            if sft_args is None:
                sft_args = config_cls(output_dir="trainer_output")
            elif not isinstance(sft_args, config_cls):
                if not isinstance(sft_args, TrainingArguments):
                    raise TypeError(f"SFTTrainer: args must be an SFTConfig or TrainingArguments, got "
                                    f"{type(sft_args).__name__}")
                d = sft_args.to_dict()
                d["hub_token"] = sft_args.hub_token
                d.pop("push_to_hub_token", None)
                sft_args = config_cls(**{k: v for k, v in d.items() if k in config_cls.__dataclass_fields__})
            for k, v in old.items():
                setattr(sft_args, OLD_SFT_TRAINER_ARGS[k], v)
            if args_pos:
                args = (args[0], sft_args) + tuple(args[2:])
            else:
                kwargs["args"] = sft_args
        if used:
            _old_names_line(used)
        trainer_init(self, *args, **kwargs)

    setattr(trainer_shim, _SHIMMED, True)
    trainer_cls.__init__ = trainer_shim
    config_cls.__init__ = config_shim
    return True


__all__ = ["ResponseOnlyCollator", "install_pre_1_0_names", "patch_trainer", "response_mask", "selective_logprobs",
           "train_on_responses_only"]
