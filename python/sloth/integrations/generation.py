"""Graph-captured decoding: ``generate`` of a sloth-patched causal LM replays one CUDA graph per new token.

Transformers' ``generate`` spends most of a decode step on the host for a QLoRA model at small batch (Python
module calls, PEFT dispatch, mask building: ~100 ms per token for a 36-layer Qwen3-4B, where the GPU needs a
few ms), which is what makes RL rollouts slow. On CUDA, :func:`sloth.patch` routes a supported ``generate``
call through :func:`graphed_generate`:

1. prefill: the model's own forward on the prompt, into a ``StaticCache`` of prompt + ``max_new_tokens``
   positions (eager);
2. one decode step (the model's forward on static ``[B, 1]`` buffers: token ids, positions, the cache slot;
   the step also advances them) is captured into a ``torch.cuda.CUDAGraph`` after one eager warm-up (whose
   cache writes are undone), then replayed per token;
3. sampling runs eagerly on the graph's logits with Transformers' own warpers (temperature, top-k, top-p,
   min-p) and min-length / min-new-tokens masking, in Transformers' order, so tokens are drawn from the
   distribution ``generate`` samples from; greedy decoding takes the argmax. Finished rows get the pad token and
   decoding stops when every row has finished (checked every few steps, then trimmed to where ``generate``
   would have stopped).

Both build their own 4-D additive attention masks over the cache slots (left padding, causality and, for the
sliding-window layers of Gemma 3, the window; every layer's cache holds all positions), which the model takes as
prepared masks. The configuration is resolved by Transformers' own ``_prepare_generation_config`` (the model's generation
config merged with the call's). Anything else — beams, other logits processors, stopping strings, streamers,
dict outputs, extra model inputs, a sliding window without per-layer types shorter than the sequence,
attention other than SDPA / eager, CPU — runs the
model's own ``generate`` unchanged, as does ``SLOTH_GRAPHED_GENERATE=0``. The model is put in eval mode for the
call (dropout off, as in vLLM-backed rollouts) and restored after.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from typing import Optional

import torch

from .. import config

logger = logging.getLogger("sloth")

#: fields of the resolved GenerationConfig that may differ from the defaults on the graphed path
_ALLOWED = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
            "top_p", "min_p", "repetition_penalty", "pad_token_id", "bos_token_id", "eos_token_id",
            "decoder_start_token_id", "cache_implementation", "disable_compile", "use_cache", "compile_config",
            "transformers_version", "_from_model_config", "num_beams", "num_return_sequences", "return_legacy_cache",
            "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
            "generation_kwargs", "_commit_hash"}
_CHECK_EVERY = 8  # decode steps between the host's looks at "has every row finished?"


class _Plan:
    """What one graphed ``generate`` call does: the resolved settings and the prompt."""

    def __init__(self, input_ids, attention_mask, max_new, min_new, min_length, do_sample, warpers, eos, pad, window):
        self.input_ids = input_ids            # [B, P] long
        self.attention_mask = attention_mask  # [B, P] long (1 = token, 0 = left padding)
        self.max_new, self.min_new, self.min_length = max_new, min_new, min_length
        self.do_sample, self.warpers = do_sample, warpers
        self.eos = eos                        # [n_eos] long on the device, or None
        self.pad = pad                        # int, or None (no eos: nothing finishes)
        self.window = window                  # sliding window of the sliding layers (None: full attention only)


def _fallback(why: str) -> None:
    logger.debug("sloth graphed generate: model's generate (%s)", why)
    return None


def _warpers(gc):
    """Transformers' sampling warpers for ``gc``, in the order and under the conditions ``generate`` uses."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    out = []
    if gc.temperature is not None and gc.temperature != 1.0:
        out.append(TemperatureLogitsWarper(gc.temperature))
    if gc.top_k is not None and gc.top_k != 0:
        out.append(TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=1))
    if gc.top_p is not None and gc.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=1))
    if gc.min_p is not None:
        out.append(MinPLogitsWarper(min_p=gc.min_p, min_tokens_to_keep=1))
    return out


def _non_default(gc) -> list:
    """Fields of ``gc`` outside ``_ALLOWED`` set to anything but a default (the class's, or the global default
    that ``_prepare_generation_config`` fills in): each would need a processor the graphed path does not run."""
    from transformers import GenerationConfig

    base = GenerationConfig()
    glob = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return sorted(k for k, v in gc.to_dict().items()
                  if k not in _ALLOWED and v != getattr(base, k, None) and not (k in glob and v == glob[k]))


def _text_config(lm):
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


def _attention_layout(lm, total: int):
    """``(supported, window)`` for ``lm`` decoding ``total`` positions: ``window`` None for full attention
    everywhere, the sliding window for interleaved sliding-window layers (Gemma 3). A model with a sliding window
    but no per-layer types (Mistral with ``sliding_window`` set) is taken only when the window covers ``total``."""
    cfg = _text_config(lm)
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types:
        if not set(types) <= {"full_attention", "sliding_attention"}:
            return False, None
        if "sliding_attention" in types:
            return isinstance(window, int) and window > 0, window
        return True, None
    return window is None or not getattr(cfg, "use_sliding_window", True) or window >= total, None


def plan(lm, args, kwargs, require_cuda: bool = True) -> Optional[_Plan]:
    """A :class:`_Plan` for ``lm.generate(*args, **kwargs)`` when the graphed path computes the same thing, else
    None (the caller runs the model's own generate). ``require_cuda=False`` plans CPU calls too (tests)."""
    if not config.GRAPHED_GENERATE:
        return _fallback("SLOTH_GRAPHED_GENERATE=0")
    if getattr(lm, "_sloth_generate_broken", False):
        return _fallback("an earlier capture failed")
    kwargs = dict(kwargs)
    input_ids = kwargs.pop("input_ids", args[0] if args else None)
    if len(args) > 1 or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return _fallback("input_ids")
    if require_cuda and (input_ids.device.type != "cuda" or not torch.cuda.is_available()):
        return _fallback("not CUDA")
    attn = getattr(lm.config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager") or lm.config.is_encoder_decoder:
        return _fallback(f"attention {attn}")
    attention_mask = kwargs.pop("attention_mask", None)
    gen_cfg = kwargs.pop("generation_config", None)
    for k in ("streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
              "negative_prompt_ids", "synced_gpus", "custom_generate"):
        if kwargs.get(k) is not None:
            return _fallback(k)
        kwargs.pop(k, None)
    try:
        gc, model_kwargs = lm._prepare_generation_config(copy.deepcopy(gen_cfg), **kwargs)
    except Exception as e:  # a Transformers without this helper, or arguments it rejects: its own generate decides
        return _fallback(f"config: {e}")
    if {k for k, v in model_kwargs.items() if v is not None} - {"use_cache"}:
        return _fallback(f"model kwargs {sorted(model_kwargs)}")
    diff = _non_default(gc)
    if diff:
        return _fallback(f"settings {sorted(diff)}")
    if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1 or gc.return_dict_in_generate or \
            gc.output_scores or gc.output_logits or gc.output_attentions or gc.output_hidden_states:
        return _fallback("beams / dict outputs")
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        return _fallback("repetition_penalty")
    b, p = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        return _fallback("attention_mask shape")
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    elif gc.max_length is not None:
        max_new = gc.max_length - p
    else:
        return _fallback("no max_new_tokens / max_length")
    if max_new <= 0:
        return _fallback("nothing to generate")
    supported, window = _attention_layout(lm, p + max_new)
    if not supported:
        return _fallback("layer types")
    eos = gc.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos) if eos is not None else []
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device) if eos else None
    return _Plan(input_ids, attention_mask.to(torch.long), max_new, gc.min_new_tokens or 0, gc.min_length or 0,
                 bool(gc.do_sample), _warpers(gc) if gc.do_sample else [], eos_t, pad, window)


def _cache_kwargs(lm):
    """The keyword that takes the cache in ``lm``'s class forward (``cache`` in Transformers >= 5.2x, else
    ``past_key_values``), and whether it also takes ``cache_position``."""
    params = inspect.signature(type(lm).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, "cache_position" in params


def _layer_counters(cache):
    """The cache layers' in-place position counters (Transformers' StaticLayer ``cumulative_length``)."""
    return [layer.cumulative_length for layer in getattr(cache, "layers", [])
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]


@torch.no_grad()
def decode(lm, pl: _Plan, use_graph: bool = True) -> torch.Tensor:
    """``[B, P + n]`` prompt and generated tokens for plan ``pl`` (``n <= max_new_tokens``: decoding stops once
    every row has produced an end token, as ``generate`` does); ``use_graph=False`` replays the same static-cache
    step eagerly (CPU tests)."""
    from transformers import StaticCache

    ids, am = pl.input_ids, pl.attention_mask
    b, p = ids.shape
    total = p + pl.max_new
    dev = ids.device
    dtype = lm.get_input_embeddings().weight.dtype
    cfg = _text_config(lm)
    if pl.window is not None:  # every layer caches every position; the sliding layers' masks apply the window
        cfg = copy.deepcopy(cfg)
        cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    cache = StaticCache(config=cfg, max_cache_len=total)
    cache_kw, takes_cache_position = _cache_kwargs(lm)
    neg = torch.finfo(dtype).min
    slots = torch.arange(total, device=dev)  # [L] cache slots = positions in the left-padded sequence

    def masks(valid, q_slots):
        """The attention masks handed to the model: additive ``[B, 1, Q, L]`` in the model dtype (0 = attend)
        from ``valid [B, L]`` (bool, slot holds a token) for queries in slots ``q_slots [Q]``: a tensor for
        full attention only, else one per layer type (the sliding one also needs ``slot > q - window``)."""
        ok = valid[:, None, None, :] & (slots[None, None, None, :] <= q_slots[None, None, :, None])
        full = torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill_(~ok, neg)
        if pl.window is None:
            return full
        ok &= slots[None, None, None, :] > (q_slots - pl.window)[None, None, :, None]
        return {"full_attention": full,
                "sliding_attention": torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill_(~ok, neg)}

    # prefill (eager), positions as generate computes them for left padding
    valid = torch.zeros(b, total, dtype=torch.bool, device=dev)  # [B, L] slots holding a token
    valid[:, :p] = am.bool()
    pos0 = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)  # [B, P]
    extra = {"cache_position": slots[:p]} if takes_cache_position else {}
    logits = lm(input_ids=ids, attention_mask=masks(valid, slots[:p]), position_ids=pos0, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache}, **extra).logits[:, -1, :]

    # decode-step state: static buffers the (captured) step reads and advances
    tok_buf = torch.zeros(b, 1, dtype=torch.long, device=dev)     # [B, 1] the token to feed
    pos_buf = am.sum(-1, keepdim=True)                            # [B, 1] its position
    cpos_buf = torch.full((1,), p, dtype=torch.long, device=dev)  # [1] its cache slot

    def step():
        valid.index_fill_(1, cpos_buf, True)  # the new token's slot
        extra = {"cache_position": cpos_buf} if takes_cache_position else {}
        out = lm(input_ids=tok_buf, attention_mask=masks(valid, cpos_buf), position_ids=pos_buf, use_cache=True,
                 logits_to_keep=1, **{cache_kw: cache}, **extra).logits[:, -1, :]
        pos_buf.add_(1)
        cpos_buf.add_(1)
        return out

    graph = None
    out = torch.full((b, total), pl.pad if pl.pad is not None else 0, dtype=torch.long, device=dev)
    out[:, :p] = ids
    unfinished = torch.ones(b, dtype=torch.bool, device=dev)
    all_done = torch.zeros(pl.max_new, dtype=torch.bool, device=dev)  # [max_new] after step s, every row done
    n = 0
    for s in range(pl.max_new):
        scores = logits.float()
        if pl.eos is not None and (s < pl.min_new or p + s < pl.min_length):
            scores[:, pl.eos] = -float("inf")
        if pl.do_sample:
            for w in pl.warpers:
                scores = w(out[:, :p + s], scores)
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        if pl.eos is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pl.pad))
            unfinished &= ~torch.isin(nxt, pl.eos)
            all_done[s] = ~unfinished.any()
        out[:, p + s] = nxt
        n = s + 1
        if n == pl.max_new or (pl.eos is not None and n % _CHECK_EVERY == 0 and not bool(unfinished.any())):
            break
        tok_buf.copy_(nxt[:, None])
        if not use_graph:
            logits = step()
            continue
        if graph is None:
            counters = _layer_counters(cache)
            saved = [c.clone() for c in counters] + [pos_buf.clone(), cpos_buf.clone()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up: lazy initializations, cuBLAS handles, workspaces, outside the capture
            torch.cuda.current_stream().wait_stream(side)
            for c, v in zip(counters + [pos_buf, cpos_buf], saved):
                c.copy_(v)  # undo the warm-up (its cache write is redone identically by the first replay)
            valid.index_fill_(1, cpos_buf, False)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_logits = step()
        graph.replay()
        logits = graph_logits
    if pl.eos is not None:
        done = all_done[:n]
        first = int(done.int().argmax()) if bool(done.any()) else n - 1  # generate stops after this step
        n = first + 1
    del graph, cache
    return out[:, :p + n]


def graphed_generate(lm, orig_generate, *args, **kwargs):
    """``lm.generate(*args, **kwargs)`` by graph-captured decoding where supported (module docstring), else
    ``orig_generate(*args, **kwargs)``."""
    pl = plan(lm, args, kwargs)
    if pl is None:
        return orig_generate(*args, **kwargs)
    modes = [(m, m.training) for m in lm.modules()]  # restored one by one: some may be in eval on purpose
    lm.eval()  # also keeps training-mode gradient checkpointing from turning the cache off
    try:
        return decode(lm, pl)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # a model whose step cannot be captured: the model's own generate, once noted
        if not getattr(lm, "_sloth_generate_warned", False):
            warnings.warn(f"sloth: graph-captured generate failed ({type(e).__name__}: {e}); using the model's "
                          "own generate for this model", stacklevel=3)
            lm._sloth_generate_warned = True
        lm._sloth_generate_broken = True
        return orig_generate(*args, **kwargs)
    finally:
        for m, training in modes:
            m.training = training
