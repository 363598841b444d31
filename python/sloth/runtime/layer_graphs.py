"""CUDA graphs of checkpointed layers: their no-grad forward (:func:`graphed_call`) and their recompute + backward
(:func:`graphed_backward`).

Under ``use_gradient_checkpointing="sloth"`` every decoder layer first runs without autograd (its result feeds the
next layer; the layer is run again, with autograd, in the backward pass). That forward is a pure function of the
layer's tensor arguments (hidden state, rotary cos / sin, mask, positions) and of its parameters, and it is about a
hundred small operations whose launches from Python cost about as much host time as the GPU needs for them at a few
thousand tokens: the GPU waits on the host. So once a layer has run with one argument signature, its next call with
the same signature is captured into a CUDA graph, and every later call replays it: a few launches instead of ~100.
The backward pass likewise: the layer's recompute (grad mode on) and its backward from the output gradients are one
graph, whose replay leaves the gradients of the inputs and of the parameters in static buffers; the parameter
gradients are then accumulated into ``.grad`` the way AccumulateGrad does, so not where AccumulateGrad itself must
run: under a process group (:func:`sloth.runtime.distributed.grad_hooks_must_fire`: DDP's reducer hooks it to start
the all-reduce; the forward graphs stay on), nor for parameters with gradient hooks. The autograd graph of the
capture must reach no trainable tensor but the layer's own parameters and inputs.

- The graphs of all layers with one signature (tensor shapes / dtypes, the non-tensor arguments) share one memory
  pool (one layer's temporaries, since the layers run one after the other), one set of static input buffers and one
  of static outputs: a call copies its tensors into the static inputs, replays, and returns copies of the outputs
  (two copies of the hidden state per layer, ~20 us of GPU time at [4096, 4096] bf16).
- A forward that saves attention outputs (:mod:`sloth.runtime.saved_attention`) has static buffers for them too, shared
  with the backward graphs: the forward graph writes them (copies go to the checkpoint after each replay), the
  checkpoint's saved tensors are copied in before a backward replay. Whether the forward saves is part of the
  signature.
- What a capture froze is checked at every call: the same parameter and buffer tensors (an adapter reloaded or a
  weight replaced recaptures), the same active / disabled / merged LoRA adapters, train / eval flags, the same
  module forwards (``sloth.unpatch`` recaptures), autocast. Any change recaptures that layer.
- Not graphed (the layer runs as it always did): forward hooks anywhere in the layer (Accelerate, FSDP), active
  dropout (train mode with p > 0: the recompute must draw the same mask, which a replay does not), non-tensor
  arguments other than plain constants (a KV cache object), tensors on another device, a capture already in
  progress. A layer whose capture fails (an operation that cannot be captured) is remembered, runs eagerly from
  then on, and the first such failure is reported with one warning.
- Only up to :data:`MAX_TOKENS` tokens (4096): with more, the GPU time of a layer dwarfs its launch overhead.
- At most :data:`MAX_SIGNATURES` signatures keep graphs (least recently used dropped, its pool freed): a
  batch shape that never repeats is never captured; each new shape first runs eagerly once per layer. After
  :data:`MAX_EVICTIONS` signatures were dropped (more shapes recur than are kept, e.g. batches padded to their
  longest example), no new signature is captured: recapturing every few steps would cost more than it saves.

``SLOTH_CUDA_GRAPHS=0`` (read at import) turns this off; :func:`clear` drops every graph and its memory.
"""

from __future__ import annotations

import collections
import logging
import weakref
from typing import Any, Callable, List, Optional

import torch

from .. import config
from . import distributed, saved_attention, streams

logger = logging.getLogger("sloth")

ENABLED = config.CUDA_GRAPHS
#: largest number of tokens (hidden-state rows) graphed. Up to about 4096 (Llama-3.1-8B, 2048 x 2) a layer's ~100
#: launches cost about as much host time as its GPU time; beyond it the GPU time grows with the tokens, the launches
#: do not, and the static buffers and pool only hold memory (measurements: benchmarks/NOTES.md)
MAX_TOKENS = 4096
#: signatures whose graphs are kept at once (each holds one pool of one layer's temporaries + static buffers)
MAX_SIGNATURES = 2
#: signatures dropped for others before no new one is captured
MAX_EVICTIONS = 4
#: eager first runs remembered (layer, signature, state); a second run of one of them is captured
MAX_SEEN = 512

_DropoutNd = torch.nn.modules.dropout._DropoutNd
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


class NotGraphable(Exception):
    """This call cannot be replayed from a graph; the layer runs eagerly."""


class _Slot:
    """The place of the i-th tensor argument in a call's argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _split(obj, tensors: list, layer=None, depth: int = 0):
    """(template, signature) of ``obj``: each tensor replaced by a _Slot (the tensor appended to ``tensors``), and a
    hashable description of everything else (``layer`` itself as the same entry for every layer); raises
    NotGraphable for values a replay could not reproduce."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1), ("T", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, _CONSTANTS):
        return obj, ("C", type(obj), obj)
    if obj is layer and layer is not None:
        return obj, ("L",)
    if depth < 4 and isinstance(obj, (tuple, list)):
        parts = [_split(o, tensors, layer, depth + 1) for o in obj]
        return type(obj)(p[0] for p in parts), (type(obj).__name__, tuple(p[1] for p in parts))
    if depth < 4 and type(obj) is dict and all(isinstance(k, str) for k in obj):
        parts = {k: _split(v, tensors, layer, depth + 1) for k, v in obj.items()}
        return {k: p[0] for k, p in parts.items()}, ("D", tuple((k, p[1]) for k, p in sorted(parts.items())))
    raise NotGraphable(f"argument of type {type(obj).__name__}")


def _fill(template, tensors: list):
    """``template`` with each _Slot replaced by its tensor."""
    if isinstance(template, _Slot):
        return tensors[template.i]
    if isinstance(template, (tuple, list)):
        return type(template)(_fill(t, tensors) for t in template)
    if type(template) is dict:
        return {k: _fill(v, tensors) for k, v in template.items()}
    return template


def _layer_call(function: Callable, args: tuple):
    """(layer, template, tensors, signature) of ``function(*args)`` where ``function`` is the ``functools.partial``
    Transformers builds for a checkpointed layer (``partial(forward, layer, **kwargs)`` or
    ``partial(layer.__call__, **kwargs)``)."""
    func = getattr(function, "func", None)
    if func is None or hasattr(func, "func"):
        raise NotGraphable("not a single functools.partial")
    pargs, kwargs = tuple(function.args or ()), dict(function.keywords or {})
    layer = getattr(func, "__self__", None)
    if not isinstance(layer, torch.nn.Module):
        layer = pargs[0] if pargs and isinstance(pargs[0], torch.nn.Module) else None
    if layer is None:
        raise NotGraphable("no module")
    tensors: list = []
    template, signature = _split((pargs, kwargs, tuple(args)), tensors, layer)
    return layer, (func, template), tensors, (id(getattr(func, "__func__", func)), signature)


def _layer_state(layer: torch.nn.Module) -> tuple:
    """What a capture of ``layer`` froze besides its arguments (see the module docstring); raises NotGraphable for a
    layer that must not be graphed."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        raise NotGraphable("global forward hooks")
    state: List[Any] = [torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")]
    stack = [layer]
    while stack:
        m = stack.pop()
        d = m.__dict__
        if d["_forward_hooks"] or d["_forward_pre_hooks"] or d.get("_hf_hook") is not None:
            raise NotGraphable("a module has forward hooks")
        training = d["training"]
        if training and ((isinstance(m, _DropoutNd) and m.p > 0) or (d.get("attention_dropout") or 0) > 0):
            raise NotGraphable("dropout is active")  # the recompute must draw the same masks
        state.append((training, id(d.get("forward"))))
        if "_active_adapter" in d:  # a PEFT tuner layer
            state.append((str(d["_active_adapter"]), d.get("_disable_adapters"), tuple(d.get("merged_adapters", ()))))
        for p in d["_parameters"].values():
            if p is not None:
                if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                    raise NotGraphable("a parameter has gradient hooks")
                state.append((p.data_ptr(), p.requires_grad))
        for b in d["_buffers"].values():
            if b is not None:
                state.append(b.data_ptr())
        stack.extend(c for c in d["_modules"].values() if c is not None)
    return tuple(state)


class _Graph:
    """One layer's captured forward, or its recompute + backward."""

    __slots__ = ("layer", "state", "graph", "params", "keep")

    def __init__(self, layer, state, graph, params, keep):
        self.layer, self.state, self.graph = weakref.ref(layer), state, graph
        self.params, self.keep = params, keep  # parameters whose gradients a backward graph gives; buffers kept


def _saved_buffers(layouts: tuple, device: torch.device) -> list:
    """Static buffers of saved attentions of these layouts (:meth:`SavedAttention.layout`): per item, its
    :meth:`SavedAttention.flat` tensors."""
    out = []
    for main, aux, _ in layouts:
        bufs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in main]
        bufs += [torch.empty(a[1], dtype=a[2], device=a[3]) for a in aux if a[0] == "T"]
        out.append(bufs)
    return out


def _load_saved(buffers: list, items: list) -> None:
    """Copy the saved attentions ``items`` into static ``buffers`` (of the same layouts)."""
    assert len(buffers) == len(items)
    for bufs, item in zip(buffers, items):
        flat = item.flat()
        assert len(bufs) == len(flat)
        for dst, src in zip(bufs, flat):
            dst.copy_(src)


class _Signature:
    """The graphs of every layer called with one signature: static inputs / outputs and one shared memory pool.

    A forward that collects saved attentions (:func:`sloth.runtime.saved_attention.collecting`) leaves them in static
    buffers (``saved``, of ``saved_layouts``), copied out after each replay; the backward graphs read them back from
    the same buffers (the two never run at once)."""

    def __init__(self, tensors: list, out_template, out_signature, out_meta: list, saved_layouts: tuple):
        self.inputs = [torch.empty_like(t) for t in tensors]  # static inputs
        self.out_template, self.out_signature = out_template, out_signature
        self.outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in out_meta]
        self.saved_layouts = saved_layouts
        self.saved = _saved_buffers(saved_layouts, self.inputs[0].device)
        self.pool = None  # of the forward and backward graphs (they never run at once), made at the first capture
        self.graphs: dict = {}  # id(layer) -> _Graph
        self.backward: dict = {}  # (needs, grad-output signature, autocast, saved layouts) -> _BackwardSet

    def load(self, tensors: list) -> None:
        with torch.no_grad():  # (static inputs of backward graphs are leaves that require grad)
            for dst, src in zip(self.inputs, tensors):
                dst.copy_(src)

    def result(self, collect: Optional[list]):
        """Copies of the static outputs (the layer's result); copies of the saved attentions go to ``collect``."""
        if collect is not None:
            collect.extend(saved_attention.from_flat(layout, [b.clone() for b in bufs])
                           for layout, bufs in zip(self.saved_layouts, self.saved))
        return _fill(self.out_template, [o.clone() for o in self.outputs])


_signatures: "collections.OrderedDict[Any, _Signature]" = collections.OrderedDict()
_seen: "collections.OrderedDict[Any, tuple]" = collections.OrderedDict()  # forward / backward key -> (state, outputs)
_failed: set = set()  # forward / backward keys whose capture failed
_warned = [False]
_evictions = [0]  # signatures dropped for others
_trim = [False]  # a backward graph was captured since the last forward replay: release unused cached memory


def _out_meta(out):
    """(template, signature, [(shape, dtype, device)] of the tensors) of a layer's output."""
    tensors: list = []
    template, signature = _split(out, tensors)
    return template, signature, [(tuple(t.shape), t.dtype, t.device) for t in tensors]


def _record(sig: _Signature, work: Callable[[], None]):
    """A CUDA graph of ``work()`` (run once, captured) in ``sig``'s pool, on a side stream that first waits for the
    work queued so far; its ``replay()`` redoes that work on the current stream."""
    device = sig.inputs[0].device
    if sig.pool is None:
        torch.cuda.empty_cache()  # the first capture of a signature: the eager run's cached blocks go back first
        sig.pool = torch.cuda.graph_pool_handle()
    stream = streams.side_stream(streams.CAPTURE, device)
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=sig.pool, capture_error_mode="thread_local")
        try:
            work()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph


def _outside_buffers() -> list:
    """Buffers a graph may use that live outside its pool (the dequantization workspace): kept alive with it."""
    from .workspace import Workspace

    return [b for b in Workspace._buffers.values() if b is not None]


def _capture(sig: _Signature, layer, call, tensors: list, state: tuple, collecting: bool) -> _Graph:
    func, template = call
    sig.load(tensors)
    pargs, kwargs, args = _fill(template, sig.inputs)

    def work():
        outs: list = []
        items: Optional[list] = [] if collecting else None
        with saved_attention.collecting(items):
            result = func(*pargs, *args, **kwargs)
        if _split(result, outs)[1] != sig.out_signature:
            raise NotGraphable("outputs differ from those of the eager run")
        if tuple(i.layout() for i in items or ()) != sig.saved_layouts:
            raise NotGraphable("saved attentions differ from those of the eager run")
        for dst, src in zip(sig.outputs, outs):
            dst.copy_(src)
        _load_saved(sig.saved, items or [])

    return _Graph(layer, state, _record(sig, work), (), _outside_buffers())


def _remember(key, value) -> None:
    """Note a layer's first (eager) run with a signature: the next one is captured."""
    _seen[key] = value
    _seen.move_to_end(key)
    while len(_seen) > MAX_SEEN:
        _seen.popitem(last=False)


def _failed_capture(key, graphs: dict, layer, what: str, e: Exception) -> None:
    """A capture failed: the layer runs this pass eagerly from now on (warned once per process)."""
    _failed.add(key)
    graphs.pop(id(layer), None)  # a graph of an earlier state, stale
    if not _warned[0]:
        _warned[0] = True
        logger.warning("sloth: CUDA graph capture of the %s of %s failed (%s: %s); it runs eagerly", what,
                       type(layer).__name__, type(e).__name__, e)


def _small_cuda(hidden) -> bool:
    """Whether a layer with this hidden-state argument is graphed at all: on CUDA, at most MAX_TOKENS rows."""
    return isinstance(hidden, torch.Tensor) and hidden.is_cuda and hidden.dim() >= 2 and \
        hidden.numel() <= MAX_TOKENS * hidden.shape[-1]


def may_graph(hidden) -> bool:
    """Whether a checkpointed layer whose hidden-state argument is ``hidden`` may run from CUDA graphs (forward
    or recompute + backward): graphs on, on CUDA, at most MAX_TOKENS rows."""
    return ENABLED and _small_cuda(hidden)


def _capturing_now(t: torch.Tensor) -> bool:
    """Whether a CUDA graph capture is in progress on the current stream (a layer inside another graph)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def graphed_call(function: Callable, args: tuple):
    """``function(*args)`` (a checkpointed layer's forward, called under no_grad), replayed from a CUDA graph where
    possible (see the module docstring)."""
    if not args or not may_graph(args[0]) or _capturing_now(args[0]):
        return function(*args)
    collect = saved_attention.collected()  # (the checkpoint's list of saved attentions, or None)
    try:
        layer, call, tensors, sig_key = _layer_call(function, args)
        sig_key = (sig_key, collect is not None)
        device = args[0].device
        if any(t.device != device for t in tensors):
            raise NotGraphable("tensors on several devices")
        state = _layer_state(layer)
    except NotGraphable as e:
        logger.debug("sloth: layer not graphed: %s", e)
        return function(*args)
    key = (sig_key, id(layer))
    sig = _signatures.get(sig_key)
    if sig is not None:
        _signatures.move_to_end(sig_key)
        g = sig.graphs.get(id(layer))
        if g is not None and g.layer() is layer and g.state == state:
            if _trim[0]:  # the eager run before each capture left cached blocks that the graph pool now serves
                _trim[0] = False
                torch.cuda.empty_cache()
            sig.load(tensors)
            g.graph.replay()
            return sig.result(collect)
    if key in _failed:
        return function(*args)
    seen = _seen.get(key)
    if seen is None or seen[0] != state:  # first run of this layer with this signature: eager
        n = len(collect or ())
        out = function(*args)  # (collects saved attentions when the checkpoint does, even if the graphs do not)
        try:
            _remember(key, (state, (*_out_meta(out), tuple(i.layout() for i in (collect or ())[n:]))))
        except NotGraphable:
            _failed.add(key)
        return out
    if sig is None:
        if _evictions[0] >= MAX_EVICTIONS:
            if _evictions[0] == MAX_EVICTIONS:
                _evictions[0] += 1
                logger.info("sloth: more batch shapes recur than %d; layer graphs are kept only for the shapes "
                            "already captured", MAX_SIGNATURES)
            return function(*args)
        sig = _signatures[sig_key] = _Signature(tensors, *seen[1])
        while len(_signatures) > MAX_SIGNATURES:
            _signatures.popitem(last=False)
            _evictions[0] += 1
    try:
        g = _capture(sig, layer, call, tensors, state, collect is not None)
    except Exception as e:  # noqa: BLE001 - any failure: this layer runs eagerly from now on
        _failed_capture(key, sig.graphs, layer, "forward", e)
        return function(*args)
    sig.graphs[id(layer)] = g
    sig.load(tensors)
    g.graph.replay()
    return sig.result(collect)


class _BackwardSet:
    """Backward graphs (recompute + backward) of the layers of one signature, for one set of inputs that need
    gradients, one layout of output gradients and one of saved attentions: static output gradients and saved
    attentions in, static gradients out."""

    def __init__(self, sig: _Signature, grads: list, layouts: tuple):
        self.grad_inputs = [torch.empty_like(g) for g in grads]  # static gradients of the layer's outputs
        self.outputs: Optional[list] = None  # static gradients of the inputs, then of the parameters (in the pool)
        self.graphs: dict = {}  # id(layer) -> _Graph (params: in the order of outputs after the inputs')
        self.layouts = layouts  # of the saved attentions the recompute takes (static: the forward's buffers)
        self.saved = sig.saved if layouts == sig.saved_layouts else _saved_buffers(layouts, sig.inputs[0].device)

    def load(self, grads: list, attention: list) -> None:
        for dst, src in zip(self.grad_inputs, grads):
            dst.copy_(src)
        _load_saved(self.saved, attention)

    def saved_items(self) -> list:
        """The saved attentions in the static buffers, for the recompute to take (see saved_attention.replaying)."""
        return [saved_attention.from_flat(layout, bufs) for layout, bufs in zip(self.layouts, self.saved)]


def output_grad_pairs(outputs, grad_outputs) -> list:
    """``[(output, its gradient)]`` of a checkpointed function's ``outputs`` (a tensor or a tuple) that take part in
    the backward: tensors that require grad and received a gradient."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [(o, g) for o, g in zip(outs, grad_outputs)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]


def _leaves(roots: list) -> list:
    """The leaf tensors (AccumulateGrad variables) the autograd graph of ``roots`` reaches."""
    stack, seen, leaves = [r.grad_fn for r in roots], set(), []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(n for n, _ in fn.next_functions)
    return leaves


def _capture_backward(sig: _Signature, bset: _BackwardSet, layer, call, tensors: list, grad_outputs: tuple,
                      need_idx: list, recompute, state: tuple, attention: list) -> _Graph:
    func, template = call
    sig.load(tensors)
    bset.load([g for g in grad_outputs if g is not None], attention)
    inputs = [sig.inputs[i].requires_grad_(True) for i in need_idx]
    pargs, kwargs, args = _fill(template, sig.inputs)
    it = iter(bset.grad_inputs)
    static_grads = [None if g is None else next(it) for g in grad_outputs]
    found: dict = {}

    def work():
        items = bset.saved_items()
        with saved_attention.replaying(items), recompute():
            pairs = output_grad_pairs(func(*pargs, *args, **kwargs), static_grads)
        if items:
            raise NotGraphable("the recompute did not take every saved attention")
        if not pairs:
            raise NotGraphable("no output gradient")
        roots = [o for o, _ in pairs]
        leaves = {id(t) for t in _leaves(roots)}
        params = [p for p in layer.parameters() if p.requires_grad]
        if leaves - {id(t) for t in inputs} - {id(p) for p in params}:
            raise NotGraphable("the layer reads a trainable tensor that is not its own")
        params = [p for p in params if id(p) in leaves]
        grads = torch.autograd.grad(roots, inputs + params, [g for _, g in pairs], allow_unused=True)
        if bset.outputs is None:  # one set of static gradients for all layers, allocated in the pool
            bset.outputs = [None if g is None else torch.empty_like(g) for g in grads]
        if len(grads) != len(bset.outputs) or any(
                (g is None) != (o is None) or (g is not None and (g.shape != o.shape or g.dtype != o.dtype))
                for g, o in zip(grads, bset.outputs)):
            raise NotGraphable("gradients differ from those of the other layers")
        for o, g in zip(bset.outputs, grads):
            if g is not None:
                o.copy_(g)
        found["params"] = params

    graph = _record(sig, work)
    return _Graph(layer, state, graph, found["params"], _outside_buffers())


def _run_backward(sig: _Signature, bset: _BackwardSet, g: _Graph, tensors: list, grad_outputs: tuple,
                  need_idx: list, args: list, attention: list) -> list:
    sig.load(tensors)
    bset.load([x for x in grad_outputs if x is not None], attention)
    g.graph.replay()
    n = len(need_idx)
    for p, grad in zip(g.params, bset.outputs[n:]):  # what AccumulateGrad does
        if grad is None:
            continue
        if p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.add_(grad)
    in_grads = iter(None if x is None else x.clone() for x in bset.outputs[:n])
    return [next(in_grads) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]


def graphed_backward(function: Callable, args: list, needs: tuple, grad_outputs: tuple, recompute,
                     autocast: tuple, attention: list = (), collected: bool = False) -> Optional[list]:
    """The backward of a checkpointed layer from a CUDA graph: ``function(*args)`` recomputed under
    ``recompute()`` (grad mode, the forward's ``autocast``), taking the saved attentions ``attention`` (as
    :func:`sloth.runtime.saved_attention.replaying` does; ``collected``: whether the forward collected them, part of its
    signature) and backpropagated from ``grad_outputs``, all in one graph replay; the parameters' gradients are
    accumulated into their ``.grad`` as AccumulateGrad does, and the gradients of ``args`` (those with ``needs``)
    are returned. None: the caller runs the backward eagerly (the first backward of a layer with a signature, a
    layer that cannot be graphed, a distributed run whose gradient hooks must fire). The layer's forward graph must
    exist (its static buffers and pool are shared)."""
    if not args or not may_graph(args[0]) or _capturing_now(args[0]) or (attention and not collected) or \
            distributed.grad_hooks_must_fire():
        # (saved attentions of an eager forward whose graphs do not save: recomputed eagerly). Under a process group
        # the gradients must go through AccumulateGrad, where DDP's reducer hooks (in C++, unseen by _layer_state)
        # mark them ready for the all-reduce; a replay writes .grad itself (see sloth.runtime.distributed)
        return None
    try:
        layer, call, tensors, sig_key = _layer_call(function, tuple(args))
        state = _layer_state(layer)
    except NotGraphable as e:
        logger.debug("sloth: layer backward not graphed: %s", e)
        return None
    sig_key = (sig_key, collected)
    sig = _signatures.get(sig_key)
    if sig is None:
        return None
    n_fixed = len(tensors) - sum(isinstance(a, torch.Tensor) for a in args)
    need_idx, k = [], n_fixed
    for a, need in zip(args, needs):
        if isinstance(a, torch.Tensor):
            if need:
                need_idx.append(k)
            k += 1
    layouts = tuple(item.layout() for item in attention)
    bkey = (tuple(bool(x) for x in needs), tuple(None if g is None else (tuple(g.shape), g.dtype, g.device)
                                                 for g in grad_outputs), autocast, layouts)
    bset = sig.backward.get(bkey)
    if bset is not None:
        g = bset.graphs.get(id(layer))
        if g is not None and g.layer() is layer and g.state == state:
            return _run_backward(sig, bset, g, tensors, grad_outputs, need_idx, args, attention)
    key = ("backward", sig_key, bkey, id(layer))
    if key in _failed:
        return None
    seen = _seen.get(key)
    if seen is None or seen[0] != state:  # first backward of this layer with this signature: eager
        _remember(key, (state, None))
        return None
    if bset is None:
        bset = sig.backward[bkey] = _BackwardSet(sig, [g for g in grad_outputs if g is not None], layouts)
    try:
        g = _capture_backward(sig, bset, layer, call, tensors, grad_outputs, need_idx, recompute, state, attention)
    except Exception as e:  # noqa: BLE001 - any failure: this layer's backward runs eagerly from now on
        _failed_capture(key, bset.graphs, layer, "backward", e)
        return None
    bset.graphs[id(layer)] = g
    _trim[0] = True
    return _run_backward(sig, bset, g, tensors, grad_outputs, need_idx, args, attention)


def clear() -> None:
    """Drop every captured layer graph and its memory (e.g. before a workload with other shapes)."""
    _signatures.clear()
    _seen.clear()
    _failed.clear()
    _evictions[0] = 0


def graph_count(backward: bool = False) -> int:
    """The number of layer forward graphs held (``backward=True``: backward graphs)."""
    if backward:
        return sum(len(b.graphs) for s in _signatures.values() for b in s.backward.values())
    return sum(len(s.graphs) for s in _signatures.values())
