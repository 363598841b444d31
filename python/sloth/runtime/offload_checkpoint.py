"""Offloaded activation checkpointing: of each checkpointed layer only its input hidden state is kept, in pinned
host memory, and the layer is recomputed in the backward pass.

``offloaded_checkpoint(function, *args)`` has the calling convention of ``torch.utils.checkpoint.checkpoint`` as
Transformers uses it (``GradientCheckpointingLayer`` calls ``func(partial(forward, layer, **kwargs), *args)``):

- forward: ``function(*args)`` runs without building a graph (on CUDA replayed from a CUDA graph of the layer once
  it has run with the same argument shapes, :mod:`sloth.runtime.layer_graphs`). The hidden state (the first tensor of
  ``args``) is copied to pinned host memory on a side CUDA stream, so the copy overlaps the layers that follow;
  its device memory is released as soon as the copy is done. The RNG states (CPU and the hidden state's GPU) and
  the autocast state are recorded, so the recompute draws the same dropout masks and runs in the same precision.
- backward: the hidden state comes back to the GPU (its copy was started by the backward of the next layer, see
  below), the layer is recomputed with autograd on, and backpropagated (on CUDA both from one CUDA graph of the
  layer once it has been through a backward with the same shapes, except under a process group, where the
  parameters' gradients must pass DDP's hooks: :mod:`sloth.runtime.distributed`); before recomputing, the
  host-to-device copy of the input of the layer before it (the previous offloaded checkpoint in forward order) is
  started on the side stream, so it hides behind this layer's recompute and backward. At most two hidden states are
  on the GPU at a time.
- off CUDA (CPU, other devices) nothing is copied: the hidden state is kept where it is (plain checkpointing).
  So on CUDA when the pinned copies of all checkpoints would exceed the host limit (:func:`_host_limit`: most of
  the host's memory, or ``SLOTH_OFFLOAD_HOST_GB``): the inputs of further layers stay on the GPU (one warning),
  rather than the host running out of memory at very long context.
- during the recompute :func:`recomputing` is True, so that a module whose output the backward never reads (a
  decoder layer's MLP whose output only feeds the residual sum, see :mod:`sloth.integrations.mlp`) can skip
  computing it and only build its backward graph.

Gradients reach the layer's parameters the way reentrant checkpointing does it (a nested backward through the
recomputed layer), so use ``loss.backward()``; ``torch.autograd.grad`` with respect to parameters inside a
checkpointed layer sees no gradient. Tensors captured in ``function`` that require grad (not the case for the
position embeddings and masks Transformers passes) make the call fall back to PyTorch's non-reentrant checkpoint, and
so does a DDP forward with ``find_unused_parameters=True`` (:func:`sloth.runtime.distributed.reentrant_checkpoint_ok`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from typing import Any, Callable, List, Optional

import torch

from .. import config
from . import distributed, saved_attention, streams
from .layer_graphs import graphed_backward, graphed_call, output_grad_pairs
from .pinned_arena import arena

logger = logging.getLogger("sloth")

_local = threading.local()  # .last: weakref to the most recent _HostCopy of this thread (forward order);
#                             .recomputing: inside a checkpoint's recompute (see recomputing())
_host = {"live": 0, "attention": 0}  # bytes of pinned host memory held by checkpoints (as allocated) / by saved
#                                      attentions (exact)
_host_lock = threading.RLock()  # (re-entrant: a _HostCopy may be collected, and release, inside the lock)
_warned: list = []  # the one warning that layer inputs stay on the GPU (host memory full)


def _phys_bytes() -> int:
    """The host memory this process may use: physical memory, or the container's (cgroup) limit if lower."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        phys = 64 * 2**30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            phys = min(phys, int(value))
    return phys


def _host_limit() -> int:
    """Bytes of pinned host memory all checkpoints of this process may hold: SLOTH_OFFLOAD_HOST_GB (GiB), else the
    host memory (:func:`_phys_bytes`) less what everything else needs: an eighth of it, or a quarter up to 16 GiB if
    more (12 GiB of a 16 GiB host, 112 GiB of a 128 GiB one), shared by the training processes of the host
    (:func:`sloth.runtime.distributed.local_world_size`: 14 GiB each for 8 ranks of a 128 GiB host)."""
    limit = config.OFFLOAD_HOST_GB
    if limit is None:
        phys = _phys_bytes()
        limit = (phys - max(phys // 8, min(16 * 2**30, phys // 4))) // distributed.local_world_size()
    return limit


def _attention_budget() -> int:
    """Bytes of pinned host memory saved attentions may hold at once: SLOTH_SAVE_ATTENTION_HOST_GB (GiB), else an
    eighth of the machine's physical memory, shared by its training processes (so that at long context, where the
    layers' inputs alone fill the host, most layers recompute their attention rather than the host running out)."""
    budget = config.SAVE_ATTENTION_HOST_GB
    return budget if budget is not None else _phys_bytes() // 8 // distributed.local_world_size()


def _pinned_bytes(t: torch.Tensor, exact: bool) -> int:
    """Host bytes a pinned copy of ``t`` takes: exact in the arena, else rounded up to a power of two as torch's
    pinned-memory allocator does."""
    n = max(1, t.numel() * t.element_size())
    return n if exact else 1 << (n - 1).bit_length()


def _reserve_host(tensors: List[torch.Tensor], attention_bytes: int) -> Optional[int]:
    """Account for pinned copies of ``tensors`` (``attention_bytes`` of them saved attention); returns the bytes
    accounted, or None (nothing accounted) when they would exceed the host limit or the attention budget."""
    exact = arena() is not None
    nbytes = sum(_pinned_bytes(t, exact) for t in tensors)
    limit, budget = _host_limit(), _attention_budget()  # (outside the lock: they read the environment)
    with _host_lock:
        if _host["live"] + nbytes > limit or (attention_bytes and _host["attention"] + attention_bytes > budget):
            return None
        _host["live"] += nbytes
        _host["attention"] += attention_bytes
        return nbytes


def _release_host(nbytes: int, attention_bytes: int) -> None:
    if nbytes or attention_bytes:
        with _host_lock:
            _host["live"] -= nbytes
            _host["attention"] -= attention_bytes


def _warn_host_full() -> None:
    if not _warned:
        _warned.append(True)
        logger.warning("sloth: offloaded checkpoints hold %.1f GiB of pinned host memory, the limit is %.1f GiB "
                       "(SLOTH_OFFLOAD_HOST_GB sets it); the inputs of further layers stay on the GPU",
                       _host["live"] / 2**30, _host_limit() / 2**30)


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return streams.side_stream(streams.OFFLOAD, device)


class _HostCopy:
    """Copies of CUDA tensors in pinned host memory, made on the side stream; :meth:`prefetch` starts the copies
    back, :meth:`fetch` returns the tensors on the GPU, ready on the current stream (once: the host copies are then
    freed). ``accounted``: the (host bytes, saved-attention bytes) :func:`_reserve_host` counted for them,
    released with them."""

    __slots__ = ("host", "device", "prev", "accounted", "_gpu", "_ready", "_arena", "_slots", "__weakref__")

    def __init__(self, tensors: List[torch.Tensor], prev: Optional["_HostCopy"], accounted=(0, 0)):
        self.device = tensors[0].device
        self.prev = weakref.ref(prev) if prev is not None else None
        self.accounted = (0, 0)  # set once the copies are queued (a failure before: the caller releases it)
        self._gpu = self._ready = None
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # written by work queued on the compute stream
        self._arena = arena()  # None: torch's pinned allocator
        self.host, self._slots = [], []
        for t in tensors:
            if self._arena is not None:
                h, slot = self._arena.alloc(t.shape, t.dtype)
            else:
                h, slot = torch.empty(t.shape, dtype=t.dtype, pin_memory=True), None
            self.host.append(h)
            self._slots.append(slot)
            with torch.cuda.stream(stream):
                h.copy_(t, non_blocking=True)
            t.record_stream(stream)  # t's memory is not handed out again before the copy has read it
        self.accounted = accounted

    def prefetch(self) -> None:
        if self._gpu is not None or self.host is None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.device(self.device):
            # allocated on the compute stream, where they are used and freed; the side stream first waits for the
            # compute stream, so the blocks' previous users are done before the copies overwrite them
            gpu = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in self.host]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for g, h in zip(gpu, self.host):
                    g.copy_(h, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
        self._gpu, self._ready = gpu, ready

    def fetch(self) -> List[torch.Tensor]:
        if self.host is None and self._gpu is None:
            raise RuntimeError("sloth: offloaded checkpoint: the saved hidden state was already used; backward "
                               "through a checkpointed layer twice needs retain_graph, which this checkpoint does "
                               "not support")
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self._ready)
        gpu = self._gpu
        self._gpu = self._ready = None
        self._release()
        return gpu

    def _release(self) -> None:
        # The pinned blocks return to torch's host cache after the copies; an arena slot is reused only by a later
        # offload, whose copy runs on the same side stream, after this one's.
        self.host = None
        if self._arena is not None:
            for slot in reversed(self._slots):
                if slot is not None:
                    self._arena.free(slot)
        self._slots = []
        _release_host(*self.accounted)
        self.accounted = (0, 0)

    def __del__(self):  # a checkpoint whose backward never ran (its graph freed)
        if getattr(self, "host", None) is not None:
            self._release()

    def previous(self) -> Optional["_HostCopy"]:
        return self.prev() if self.prev is not None else None


def recomputing() -> bool:
    """Whether this thread is inside an offloaded checkpoint's recompute (the layer's forward run again in the
    backward pass, whose outputs are only the roots of the nested backward: their values are never read)."""
    return getattr(_local, "recomputing", False)


def _offloads(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_available()


def _requires_grad_inside(obj, depth: int = 0) -> bool:
    """Whether a (nested tuple / list / dict of) tensor(s) has one that requires grad."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if depth > 3:
        return False
    if isinstance(obj, (tuple, list)):
        return any(_requires_grad_inside(o, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return any(_requires_grad_inside(o, depth + 1) for o in obj.values())
    return False


def _captures_grad_tensors(function) -> bool:
    """Whether ``function`` (a functools.partial as Transformers builds it) carries a tensor that requires grad."""
    keywords = getattr(function, "keywords", None) or {}
    args = getattr(function, "args", ()) or ()
    return _requires_grad_inside(dict(keywords)) or _requires_grad_inside([a for a in args if not isinstance(a, torch.nn.Module)])


class _State:
    """What the recompute needs besides the inputs: RNG states and the autocast state of the forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = []
        for dev_type in {device.type, "cpu"}:
            if torch.is_autocast_enabled(dev_type):
                self.autocast.append((dev_type, torch.get_autocast_dtype(dev_type)))
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def recompute(self):
        """The forward's precision, grad mode on and :func:`recomputing` True (the RNG state untouched)."""
        outer, _local.recomputing = recomputing(), True
        try:
            with torch.enable_grad(), _autocast(self.autocast, self.autocast_cache):
                yield
        finally:
            _local.recomputing = outer

    def replay(self, run: Callable, args: List[Any]):
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with self.recompute():
                return run(*args)


class _autocast:
    def __init__(self, entries, cache_enabled):
        self.contexts = [torch.autocast(d, dtype=dt, cache_enabled=cache_enabled) for d, dt in entries]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False


class OffloadedCheckpointFunction(torch.autograd.Function):
    """``apply(run, hidden_index, anchor, *args)``: ``run(*args)`` checkpointed with ``args[hidden_index]`` offloaded.

    ``anchor`` is an empty tensor that requires grad, so that the output requires grad (and the backward runs,
    giving the layer's trainable parameters their gradients) even when no input does."""

    @staticmethod
    def forward(ctx, run, hidden_index, anchor, *args):
        hidden = args[hidden_index]
        ctx.run, ctx.hidden_index = run, hidden_index
        ctx.state = _State(hidden.device)
        collect = [] if _offloads(hidden) and saved_attention.enabled() and \
            hidden.numel() <= saved_attention.MAX_TOKENS * hidden.shape[-1] else None  # saved attentions
        with torch.no_grad(), saved_attention.collecting(collect):
            ctx.collected = saved_attention.collected() is not None  # (part of the layer graphs' signature)
            outputs = graphed_call(run, args)
        ctx.layout = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]  # positions of tensor args
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.host_copy, ctx.attention = None, []
        offload = _offloads(hidden)
        if offload:
            per_item = [item.tensors() for item in collect or ()]
            extras = [t for ts in per_item for t in ts]
            attention_bytes = sum(t.numel() * t.element_size() for t in extras)
            accounted = _reserve_host([hidden, *extras], attention_bytes) if extras else None
            if accounted is None:  # without the saved attention (over its budget or the host limit)
                extras, attention_bytes = [], 0
                accounted = _reserve_host([hidden], 0)
            offload = accounted is not None
            if not offload:
                _warn_host_full()
        if offload:
            ctx.attention = collect if extras else []  # their tensors travel with the hidden state
            last = getattr(_local, "last", None)
            try:
                ctx.host_copy = _HostCopy([hidden.detach(), *extras], last() if last is not None else None,
                                          (accounted, attention_bytes))
            except BaseException:  # e.g. pinned memory could not be allocated: nothing stays accounted
                _release_host(accounted, attention_bytes)
                raise
            _local.last = weakref.ref(ctx.host_copy)
            ctx.counts = [len(ts) for ts in per_item]
            for item in ctx.attention:  # the GPU copies are freed once copied (the host copy recorded the stream)
                item.drop()
            ctx.save_for_backward(*[a if i != hidden_index else None for i, a in enumerate(args) if i in ctx.layout])
        else:  # off CUDA, or the host is full: the hidden state stays where it is
            ctx.save_for_backward(*[args[i] for i in ctx.layout])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = list(ctx.saved_tensors)
        attention = []
        if ctx.host_copy is not None:
            fetched = ctx.host_copy.fetch()
            saved[ctx.layout.index(ctx.hidden_index)] = fetched[0]
            at = 1
            for item, n in zip(ctx.attention, ctx.counts):
                attention.append(item.with_tensors(fetched[at:at + n]))
                at += n
            prev = ctx.host_copy.previous()
            if prev is not None:
                prev.prefetch()  # the input of the layer before this one: copied while this one recomputes
            ctx.host_copy, ctx.attention = None, []
        needs = ctx.needs_input_grad[3:]
        args = list(ctx.others)
        for i, t in zip(ctx.layout, saved):
            d = t.detach()
            args[i] = d.requires_grad_(needs[i]) if d.is_floating_point() or d.is_complex() else d
        grads = graphed_backward(ctx.run, args, needs, grad_outputs, ctx.state.recompute, tuple(ctx.state.autocast),
                                 attention, ctx.collected)
        if grads is None:
            with saved_attention.replaying(attention):
                pairs = output_grad_pairs(ctx.state.replay(ctx.run, args), grad_outputs)
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grads = [args[i].grad if isinstance(args[i], torch.Tensor) and needs[i] else None
                     for i in range(len(args))]
        ctx.run = ctx.state = None
        return (None, None, None, *grads)


def offloaded_checkpoint(function: Callable, *args, use_reentrant: Optional[bool] = None,
                         preserve_rng_state: bool = True, **kwargs):
    """Checkpoint ``function(*args, **kwargs)`` keeping only its first tensor argument (the hidden state), in pinned
    host memory on CUDA (see the module docstring). Drop-in for ``torch.utils.checkpoint.checkpoint`` as a
    Transformers ``_gradient_checkpointing_func``; ``use_reentrant`` / ``preserve_rng_state`` are accepted and
    ignored (RNG state is always preserved)."""
    if kwargs:
        import functools

        function = functools.partial(function, **kwargs)
    if not torch.is_grad_enabled():
        return function(*args)
    hidden_index = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if hidden_index is None or _captures_grad_tensors(function) or \
            any(_requires_grad_inside(a) for a in args if not isinstance(a, torch.Tensor)) or \
            not distributed.reentrant_checkpoint_ok():  # (DDP finding unused parameters: see there)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, *args, use_reentrant=False)
    anchor = torch.empty(0, requires_grad=True)
    return OffloadedCheckpointFunction.apply(function, hidden_index, anchor, *args)
