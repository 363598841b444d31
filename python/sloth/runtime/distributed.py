"""What sloth needs to know about ``torch.distributed``: the world, how the model is wrapped (DDP / FSDP2), the
token count of a whole optimizer step for exact gradient accumulation, and checks that turn the combinations sloth
cannot run correctly into errors that name the fix.

How sloth's pieces meet DDP and FSDP2 (``fully_shard``):

- DDP averages the gradients of all ranks. Its reducer hooks the AccumulateGrad node of every parameter (in C++,
  invisible to Python); a parameter whose ``.grad`` is written without going through AccumulateGrad is never marked
  ready, so the step's all-reduce waits forever or leaves that gradient unreduced. The backward CUDA graphs of
  :mod:`sloth.runtime.layer_graphs` write ``.grad`` themselves, so under an initialized process group they are off
  (:func:`grad_hooks_must_fire`); the layers' forward graphs stay on (no hook is involved). Offloaded checkpointing
  backpropagates each layer's recompute through autograd, so the hooks fire as in plain reentrant checkpointing;
  like that, it needs ``find_unused_parameters=False`` (DDP's default) or ``static_graph=True``, and each parameter
  used once per step; inside a DDP forward that finds unused parameters it runs as PyTorch's non-reentrant
  checkpoint instead (:func:`reentrant_checkpoint_ok`).
- FSDP2 keeps each ``fully_shard`` unit's parameters as sharded ``DTensor`` s and gathers them in the unit's
  forward pre-hook. sloth's fused code reads weights of modules it never calls (a LoRA layer reads its base layer
  and ``lora_A`` / ``lora_B``; the fused MLP its projections; the causal-LM loss ``lm_head.weight``), so those modules
  must be inside the unit of the module that reads them, never a unit of their own (PEFT's
  ``fsdp_auto_wrap_policy`` makes one of every ``lora_A`` / ``lora_B``): :func:`check_model` finds such units.
  Forward hooks make :mod:`sloth.runtime.layer_graphs` run sharded layers eagerly.
- Both average gradients over ranks. With ``num_items_in_batch = N / world_size`` (:func:`num_items_in_batch`, N
  the non-ignored tokens of the whole step on all ranks) each rank's loss is its token sum / N times world_size:
  the averaged gradient is exactly that of the global batch, and the mean of the ranks' losses is its loss.
- bitsandbytes ``Params4bit`` carry their quantization state on the parameter object, which ``fully_shard``
  replaces: a sharded 4-bit layer gathers packed bytes without it (see :func:`check_model`).
- Everything collective (:func:`full_tensor`, :func:`num_items_in_batch`, ``sloth.save_merged`` of a sharded
  model) must be called on every rank, in the same order.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence, Union

import torch

logger = logging.getLogger("sloth")


def _dist():
    return torch.distributed if torch.distributed.is_available() else None


def initialized() -> bool:
    """Whether a default process group exists (``torchrun`` / ``accelerate launch`` after ``init_process_group``)."""
    d = _dist()
    return d is not None and d.is_initialized()


def world_size(group=None) -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank(group) if initialized() else 0


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes files."""
    return rank() == 0


def _env_int(name: str):
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def local_world_size() -> int:
    """The number of training processes on this host: ``LOCAL_WORLD_SIZE`` (set by torchrun, and so by accelerate
    launch), else 1. Host resources sized per process (the pinned memory of offloaded checkpoints) are shared by
    that many processes."""
    return max(1, _env_int("LOCAL_WORLD_SIZE") or 1)


def local_cuda_index():
    """The CUDA device this process should load onto: ``LOCAL_RANK`` (modulo the visible devices) when launched by
    torchrun / accelerate launch, else the current device; None without CUDA. (Under torchrun every process starts
    on device 0 until something calls ``torch.cuda.set_device``, which accelerate does only once a Trainer or
    Accelerator exists, after the model was loaded.)"""
    if not torch.cuda.is_available():
        return None
    local = _env_int("LOCAL_RANK")
    if local is not None:
        return local % torch.cuda.device_count()
    return torch.cuda.current_device()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if initialized() and world_size() > 1:
        torch.distributed.barrier()


def grad_hooks_must_fire() -> bool:
    """Whether parameter gradients must reach ``.grad`` through autograd's AccumulateGrad (so that the hooks a
    distributed wrapper put there fire): under an initialized process group. DDP's reducer hooks are registered in
    C++ and cannot be seen on a parameter, so any process group counts."""
    return initialized()


def active_ddp():
    """The ``DistributedDataParallel`` whose forward is running now (None outside one)."""
    if _dist() is None:
        return None
    get = getattr(torch.nn.parallel.DistributedDataParallel, "_get_active_ddp_module", None)  # (torch >= 2.0)
    return get() if get is not None else None


_warned_unused: list = []


def reentrant_checkpoint_ok() -> bool:
    """Whether a checkpoint that backpropagates its recompute in a nested backward (sloth's offloaded checkpoint,
    like PyTorch's reentrant one) may run in the current forward: not inside a DDP forward with
    ``find_unused_parameters=True`` (without ``static_graph``). That DDP marks every parameter its forward graph does
    not reach as ready at the end of the forward (a checkpointed layer's parameters, which only the recompute
    reaches), and the recompute's backward then marks them again: "Expected to mark a variable ready only once".
    A Transformers Trainer passes ``find_unused_parameters=True`` for any model that is not a ``PreTrainedModel``
    (a PeftModel) unless ``ddp_find_unused_parameters=False``. Logs once when it returns False."""
    ddp = active_ddp()
    if ddp is None or not getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        return True
    if not _warned_unused:
        _warned_unused.append(True)
        logger.warning("sloth: DDP with find_unused_parameters=True: offloaded checkpointing runs as PyTorch's "
                       "non-reentrant checkpoint (nothing offloaded); pass ddp_find_unused_parameters=False "
                       "(TrainingArguments / SFTConfig) or find_unused_parameters=False to DDP to offload")
    return False


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def is_ddp(model) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper."""
    return _dist() is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel)


def fsdp2_units(model: torch.nn.Module) -> list:
    """``(name, module)`` of every ``fully_shard`` unit in ``model`` (FSDP2; empty when none)."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def is_fsdp2(model: torch.nn.Module) -> bool:
    """Whether ``model`` or a module inside it was sharded with ``fully_shard`` (FSDP2)."""
    return bool(fsdp2_units(unwrap(model)))


def is_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` is or holds a ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    if _dist() is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def unwrap(model):
    """The module inside a DDP wrapper (FSDP2 shards modules in place: they are returned as they are)."""
    while is_ddp(model):
        model = model.module
    return model


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter outside its unit's forward)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered from every rank when it is a ``DTensor`` (collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def _comm_device(group=None) -> torch.device:
    """Where a tensor must be for a collective of ``group``'s backend: the current accelerator for NCCL / others,
    the CPU for gloo."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None:
        return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def global_token_count(labels: Union[torch.Tensor, Sequence[torch.Tensor]], ignore_index: int = -100,
                       shift: bool = True, group=None) -> torch.Tensor:
    """The number of tokens that contribute a loss term in the whole optimizer step: the labels of this rank's
    micro-batches (one tensor ``[B, T]`` or a sequence of them), ``shift``: causal-LM labels (position t predicts
    ``labels[t + 1]``, so each row's first label is not a target, as ``sloth.causal_lm_loss`` shifts them; False for
    labels already shifted), summed over the ranks of ``group`` (all-reduce; every rank must call it). A 0-d int64
    tensor on the labels' device."""
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    labels = list(labels)
    if not labels:
        raise ValueError("sloth.runtime.distributed.global_token_count: no labels given (pass this rank's "
                         "micro-batches of the step, an empty list on a rank without data is not allowed: "
                         "pass an all-ignore_index tensor instead)")
    device = labels[0].device
    local = sum(((lab[..., 1:] if shift else lab) != ignore_index).sum().to(device, torch.int64) for lab in labels)
    if not initialized() or world_size(group) == 1:
        return local.reshape(())
    buf = local.reshape(1).to(_comm_device(group))
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)
    return buf.reshape(()).to(device)


def num_items_in_batch(labels: Union[torch.Tensor, Sequence[torch.Tensor]], ignore_index: int = -100,
                       shift: bool = True, group=None) -> torch.Tensor:
    """What to pass as ``num_items_in_batch`` to ``sloth.causal_lm_loss`` / a patched model's forward on every
    micro-batch of a step under DDP or FSDP2, for exact gradient accumulation across ranks and micro-batches:
    :func:`global_token_count` divided by the world size (0-d fp32). DDP and FSDP2 average the ranks'
    gradients, so each rank's loss (its token sum / this) averages to the global batch's gradient; the ranks'
    losses average to the global batch's loss. Without a process group: the token count of the step."""
    n = global_token_count(labels, ignore_index=ignore_index, shift=shift, group=group)
    return n.to(torch.float32) / world_size(group)


# ---------------------------------------------------------------------------------------------------------- checks

def _patched_readers(lm: torch.nn.Module) -> list:
    """``(name, module)`` of the modules whose sloth forward reads parameters of modules below it without calling
    them: PEFT LoRA layers, patched MLPs / attentions / causal LMs (their ``_sloth_orig_forward``)."""
    out = []
    for n, m in lm.named_modules():
        if "_sloth_orig_forward" in m.__dict__:
            out.append((n, m))
    return out


def _offloaded_layers(model: torch.nn.Module) -> list:
    """The layers of ``model`` checkpointed by sloth's offloaded checkpoint (Transformers' checkpointing function;
    told by name: :mod:`.offload_checkpoint` imports this module)."""
    def offloaded(f) -> bool:
        return getattr(f, "__module__", None) == f"{__package__}.offload_checkpoint" and \
            getattr(f, "__name__", None) == "offloaded_checkpoint"

    return [m for m in model.modules() if m.__dict__.get("gradient_checkpointing") and
            offloaded(m.__dict__.get("_gradient_checkpointing_func"))]


def check_model(model) -> None:
    """Raise ``ValueError`` naming the fix when ``model`` (a sloth-patched model, bare, DDP-wrapped or sharded)
    is wrapped in a way sloth cannot run correctly:

    - an FSDP unit (FSDP2 ``fully_shard``, or an FSDP1 ``FullyShardedDataParallel``) below a module whose sloth
      forward reads that unit's weights without calling it (a LoRA layer's ``lora_A`` / ``lora_B`` / base layer, a
      fused MLP's projections, the LM head under the causal-LM loss): those weights would still be sharded when
      read. Shard whole decoder layers (and the root).
    - FSDP1 with sloth's offloaded checkpointing (``use_gradient_checkpointing="sloth"``).
    - an FSDP2-sharded bitsandbytes 4-bit weight: ``fully_shard`` replaces ``Params4bit`` by a DTensor without its
      quantization state (keep 4-bit layers out of sharding: ``ignored_params``).
    Nothing is raised for a model that is not distributed. (FSDP1 is deprecated by PyTorch; it is tested only with one
    root unit, ``use_orig_params=True``, over a 16-bit LoRA model.)"""
    inner = unwrap(model)
    units = [m for _, m in fsdp2_units(inner)]
    if _dist() is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        units += [m for m in inner.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return
    if len(units) > len(fsdp2_units(inner)) and _offloaded_layers(inner):
        raise ValueError(
            "sloth: FSDP1 (FullyShardedDataParallel) with sloth's offloaded checkpointing is not supported (the "
            "recompute in the backward pass reads resharded weights); use FSDP2 (fully_shard on each decoder layer "
            "and the root, accelerate's `fsdp_version: 2`), or use_gradient_checkpointing=True under FSDP1")
    unit_ids = {id(m) for m in units}
    names = {id(m): n for n, m in inner.named_modules()}
    for name, reader in _patched_readers(inner):
        get_head = getattr(reader, "get_output_embeddings", None)
        if callable(get_head):  # a causal LM: it calls its base model, and reads the LM head's weight (the loss)
            head = get_head()
            if head is not None and id(head) in unit_ids and head is not reader:
                raise ValueError(
                    f"sloth: the LM head {names.get(id(head), 'lm_head')} is an FSDP unit of its own, but sloth's "
                    f"causal-LM loss reads its weight without calling it, so it would be read sharded; leave the LM "
                    f"head in the root unit (do not fully_shard it separately)")
            continue
        for sub_name, sub in reader.named_modules():  # a LoRA layer, MLP or attention: its projections are read
            if sub is reader or id(sub) not in unit_ids:
                continue
            full = f"{name}.{sub_name}" if name else sub_name
            raise ValueError(
                f"sloth: {full} is an FSDP unit of its own, but sloth's forward of {name or '<root>'} "
                f"({type(reader).__name__}) reads its weights without calling it, so they would be read sharded. "
                f"Shard whole decoder layers (fully_shard(layer) for each decoder layer, then fully_shard(model)); "
                f"with accelerate: fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP and the decoder layer class, not "
                f"PEFT's fsdp_auto_wrap_policy, which makes a unit of every lora_A / lora_B")
    for n, m in inner.named_modules():
        w = getattr(m, "weight", None)
        if is_sharded(w) and (type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") or
                              type(w).__name__ == "Params4bit" or w.dtype == torch.uint8):
            raise ValueError(
                f"sloth: {n} is a bitsandbytes 4-bit layer ({type(m).__name__}) whose weight FSDP2 sharded, which "
                f"drops its quantization state (packed 4-bit bytes would be gathered without it); keep 4-bit layers "
                f"out of fully_shard (its ignored_params) or train them with DDP")


__all__ = ["active_ddp", "barrier", "check_model", "fsdp2_units", "full_tensor", "global_token_count",
           "grad_hooks_must_fire", "initialized", "is_ddp", "is_fsdp1", "is_fsdp2", "is_main_process", "is_sharded",
           "local_cuda_index", "local_world_size", "num_items_in_batch", "rank", "reentrant_checkpoint_ok", "unwrap",
           "world_size"]
