"""Transformers' attention ``"sloth"``: :func:`sloth.attention` (sinks, sliding window, softcap, GQA, packed and
padded batches as packed documents) behind Transformers' ``AttentionInterface``.

:func:`register` adds ``"sloth"`` to ``AttentionInterface`` and, to ``AttentionMaskInterface``, Transformers' flash
attention mask (None, or the 2-D padding mask): the kernel takes the structure (causal, window, documents) as
arguments, so no [seq, seq] mask is ever built. Packed batches (``position_ids`` that restart, or the flash
keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` of TRL's padding-free collator) and padded batches run as
packed documents. What the kernel cannot do (dropout, a 4-D mask, a head_dim or dtype the device kernel lacks)
falls back, with one log line per reason, to SDPA with the sink as an extra key column (exact), or to the
reference math when softcap is set (SDPA has none).

Select it with ``attn_implementation="sloth"`` (or ``model.set_attn_implementation("sloth")``) after
:func:`register`; :func:`supports_config` says whether a model configuration runs on the kernel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..nn.attention import attention
from ..ops.attention import GPU_DTYPES, GPU_HEAD_DIMS

logger = logging.getLogger("sloth")
NAME = "sloth"
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("sloth attention: %s; this call falls back to SDPA (same result, slower)", reason)


def supports_config(config, device: str | torch.device = "cuda") -> tuple[bool, str]:
    """(True, "") when every attention layer of a model with this configuration runs on sloth's kernel during
    training on `device`, else (False, the reason). Per-call limits (dropout in training, 4-D masks) are checked
    at call time and fall back to SDPA."""
    config = getattr(config, "get_text_config", lambda: config)()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if torch.device(device).type == "cuda" and head_dim not in GPU_HEAD_DIMS:
        return False, f"head_dim {head_dim} (the GPU kernels have {GPU_HEAD_DIMS})"
    if getattr(config, "attention_dropout", 0.0):
        return False, f"attention_dropout {config.attention_dropout} (the kernel has no dropout)"
    if getattr(config, "num_attention_heads", 1) % (getattr(config, "num_key_value_heads", None) or 1):
        return False, "q heads not a multiple of kv heads"
    return True, ""


def _call_limit(query, dropout, attention_mask, module) -> str | None:
    """Why this call cannot run on the kernel (None when it can)."""
    if dropout and module.training:
        return f"attention dropout {dropout}"
    if attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-D attention mask"
    if query.device.type == "cuda":
        if query.dtype not in GPU_DTYPES:
            return f"dtype {query.dtype} on the GPU (the kernels take bf16 / fp16)"
        if query.shape[-1] not in GPU_HEAD_DIMS:
            return f"head_dim {query.shape[-1]}"
    elif query.device.type != "cpu":
        return f"device {query.device.type}"
    return None


_cu_cache: dict = {}


@torch.compiler.disable  # reads the positions back (under torch.compile: a graph break, never a wrong answer)
def _packed_cu_seqlens(position_ids: torch.Tensor):
    """(cu_seqlens int32, max_seqlen) of the documents of a packed batch (positions restart at each document;
    the rows of a batch are laid end to end), or None when every row is one sequence. Cached for the tensor
    (all layers of one forward share it; one device read per forward)."""
    key = (position_ids.data_ptr(), position_ids.shape, position_ids._version)
    hit = _cu_cache.get(key)
    if hit is not None and hit[0] is position_ids:
        return hit[1]
    pos = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    result = None
    if bool(starts[:, 1:].any()):
        idx = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([idx, idx.new_tensor([pos.numel()])]).to(torch.int32)
        result = (cu, int((cu[1:] - cu[:-1]).max()))
    _cu_cache.clear()
    _cu_cache[key] = (position_ids, result)
    return result


def _cu_from_lengths(lengths: torch.Tensor):
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max()) if lengths.numel() else 0


def sloth_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, sliding_window: int | None = None,
                            softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs):
    """Transformers' attention function signature: query [batch, q_heads, seq_q, D], key / value [batch, kv_heads,
    seq_k, D] -> (out [batch, seq_q, q_heads, D], None). ``s_aux`` (or ``sinks``): per-head sink logits."""
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = int(sliding_window) if sliding_window else None
    softcap = softcap or None
    reason = _call_limit(query, dropout, attention_mask, module)
    if reason is None and kwargs.get("output_attentions"):
        reason = "output_attentions"
    if reason is not None:
        _log_once(reason)
        return _fallback(query, key, value, attention_mask, dropout if module.training else 0.0, scaling, causal,
                         window, sinks, softcap, kwargs.get("position_ids")), None

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [batch, seq, heads, D]
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    kw = dict(causal=causal, window=window, sinks=sinks, softcap=softcap, scale=scaling)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and cu_q is not None and cu_k is not None and Sq == Sk and B == 1:
        # flash keyword arguments (TRL padding-free collator): the documents of the one packed row
        out = attention(q[0], k[0], v[0], cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                        max_seqlen_q=kwargs.get("max_length_q"), max_seqlen_k=kwargs.get("max_length_k"), **kw)
        return out.unsqueeze(0), None
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and Sq == Sk:
        packed = _packed_cu_seqlens(position_ids.expand(B, -1) if position_ids.shape[0] != B else position_ids)
        if packed is not None:
            cu, mx = packed
            out = attention(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, -1, D), v.reshape(B * Sk, -1, D),
                            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx, **kw)
            return out.view(B, Sq, Hq, D), None
    if attention_mask is None:
        return attention(q, k, v, **kw), None
    # 2-D padding mask [batch, seq_k] (True = token): the rows' tokens as packed documents, padding rows of the
    # output zero
    mask_k = attention_mask[:, -Sk:].bool()
    mask_q = mask_k[:, -Sq:]
    idx_q, idx_k = mask_q.flatten().nonzero().flatten(), mask_k.flatten().nonzero().flatten()
    cu_q, mq = _cu_from_lengths(mask_q.sum(1))
    cu_k, mk = _cu_from_lengths(mask_k.sum(1))
    out_p = attention(q.reshape(B * Sq, Hq, D)[idx_q], k.reshape(B * Sk, -1, D)[idx_k], v.reshape(B * Sk, -1, D)[idx_k],
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk, **kw)
    out = out_p.new_zeros(B * Sq, Hq, D).index_copy(0, idx_q, out_p)
    return out.view(B, Sq, Hq, D), None


def _fallback(query, key, value, attention_mask, dropout, scaling, causal, window, sinks, softcap, position_ids):
    """SDPA with an explicit mask (causal, window, documents, padding) and the sink as one more key whose value is
    zero; softcap (which SDPA lacks) through the reference math. Returns [batch, seq_q, q_heads, D]."""
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    dev = query.device
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = allowed.expand(B, -1, Sq, Sk)
        seg_ok = None
    else:
        # document ids per token (-1: padding) and the token's index within its document
        valid_k = (attention_mask[:, -Sk:].bool() if attention_mask is not None
                   else torch.ones(B, Sk, dtype=torch.bool, device=dev))
        if position_ids is not None and attention_mask is None and Sq == Sk:
            pos = position_ids.expand(B, -1)
            starts = torch.ones_like(pos, dtype=torch.bool)
            starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            seg_k = starts.cumsum(1)
        else:
            seg_k = torch.zeros(B, Sk, dtype=torch.long, device=dev)
        seg_k = seg_k.masked_fill(~valid_k, -1)
        idx_k = valid_k.long().cumsum(1)  # position among the row's valid tokens (+1)
        first = torch.zeros(B, Sk, dtype=torch.long, device=dev)  # documents' first positions
        if position_ids is not None and attention_mask is None and Sq == Sk:
            first = torch.where(starts, idx_k, torch.zeros_like(idx_k)).cummax(1).values
        p_k = idx_k - first
        seg_q, p_q = seg_k[:, -Sq:], p_k[:, -Sq:]
        # bottom-right alignment within each row: query positions continue the key positions
        allowed = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] >= 0)
        if causal:
            allowed &= p_k[:, None, :] <= p_q[:, :, None]
        if window:
            allowed &= p_k[:, None, :] > p_q[:, :, None] - window
        allowed = allowed[:, None]  # [B, 1, Sq, Sk]
        seg_ok = seg_q >= 0
    scale = D**-0.5 if scaling is None else scaling
    if softcap:
        qf, kf, vf = query.float(), key.repeat_interleave(Hq // Hkv, 1).float(), value.repeat_interleave(Hq // Hkv, 1).float()
        s = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.float()[None, :, None, None].expand(B, Hq, Sq, 1)], dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)[..., :Sk]
        p = F.dropout(p, dropout) if dropout else p
        out = torch.einsum("bhij,bhjd->bhid", p, vf).to(query.dtype)
    else:
        k, v = key.repeat_interleave(Hq // Hkv, 1), value.repeat_interleave(Hq // Hkv, 1)
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=dev).masked_fill(~allowed, float("-inf"))
        bias = bias.expand(B, Hq, Sq, Sk)
        if sinks is not None:
            k = torch.cat([k, k.new_zeros(B, Hq, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, Hq, 1, D)], dim=2)
            bias = torch.cat([bias, sinks.to(query.dtype)[None, :, None, None].expand(B, Hq, Sq, 1)], dim=-1)
        else:
            # a row that sees nothing would be NaN in SDPA: give it one zero-valued key it ignores
            k = torch.cat([k, k.new_zeros(B, Hq, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, Hq, 1, D)], dim=2)
            none = ~allowed.any(-1, keepdim=True)  # [B, 1, Sq, 1]
            extra = torch.zeros(B, 1, Sq, 1, dtype=query.dtype, device=dev).masked_fill(~none, float("-inf"))
            bias = torch.cat([bias, extra.expand(B, Hq, Sq, 1)], dim=-1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    if seg_ok is not None:
        out = out * seg_ok[:, None, :, None].to(out.dtype)  # padding queries: zero, as on the kernel path
    return out.transpose(1, 2).contiguous()


def register() -> bool:
    """Register ``"sloth"`` in Transformers' attention and attention-mask registries (idempotent); False when this
    Transformers has no such registries."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, sloth_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return True
