"""Plain-PyTorch linear cross-entropy and log-probs: materialize the logits, then F.cross_entropy."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def transformed_logits(hidden, weight, bias=None, softcap=None, logit_scale=None) -> torch.Tensor:
    """fp32 ``[N, V]`` logits z of ``hidden [N, H]`` and ``weight [V, H]``: the GEMM runs in the input dtype
    (as the chunked kernel's cuBLAS GEMM does), then scale and softcap in fp32."""
    logits = hidden @ weight.t()  # [N, V] input dtype
    if bias is not None:
        logits = logits + bias
    z = logits.float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of softmax(z) against labels; ``num_items_in_batch`` overrides the mean's divisor.
    An all-ignored batch gives 0 (divisor clamped to 1)."""
    hidden = hidden.reshape(labels.numel(), hidden.shape[-1])  # [N, H] (H may be 0)
    labels = labels.reshape(-1)
    z = transformed_logits(hidden, weight, bias, softcap, logit_scale)  # [N, V] fp32
    total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp_min(1)


def linear_logprobs(hidden, weight, tokens, bias=None, temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(h W^T / temperature)[token] per row ``[N]`` (and the entropy ``[N]``)."""
    z = transformed_logits(hidden, weight, bias, None, 1.0 / temperature)  # [N, V]
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, tokens.reshape(-1, 1).long()).squeeze(-1)
    if not return_entropy:
        return lp
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def _z(x, softcap, logit_scale):
    """(z, dz/dx) in fp32 of raw logits x."""
    y = x.float() * logit_scale
    if softcap:
        z = softcap * torch.tanh(y / softcap)
        return z, logit_scale * (1 - (z / softcap) ** 2)
    return y, torch.full_like(y, logit_scale)


def online_block(logits, labels, vocab_start, state, acc, softcap=0.0, logit_scale=1.0, margin=0.0):
    """Reference of ``torch.ops.sloth.ce_online_block``: returns the new (p' [rows, vb] in logits' dtype,
    state [rows, 4] fp32, acc [rows, H] fp32) instead of updating them in place."""
    z, dz = _z(logits, softcap, logit_scale)  # [rows, vb]
    rows, vb = z.shape
    first = vocab_start == 0
    m_old = torch.full((rows,), -float("inf")) if first else state[:, 0].cpu()
    s_old = torch.zeros(rows) if first else state[:, 1].cpu()
    z, dz = z.cpu(), dz.cpu()
    bmax = z.max(-1).values if vb else torch.full((rows,), -float("inf"))
    moves = torch.isinf(m_old) | (bmax > m_old + margin)
    m = torch.where(moves, bmax, m_old)
    e = torch.where(torch.isinf(z) & (z < 0), torch.zeros_like(z), torch.exp(z - m[:, None]))
    alpha = torch.where(m == m_old, torch.ones_like(m), torch.where(torch.isinf(m_old), torch.zeros_like(m),
                                                                     torch.exp(m_old - m)))
    new_state = torch.zeros(rows, 4) if first else state.cpu().clone()
    new_state[:, 0], new_state[:, 1] = m, s_old * alpha + e.sum(-1)
    col = labels.cpu() - vocab_start
    inside = (col >= 0) & (col < vb)
    idx = col.clamp(0, max(vb - 1, 0))[:, None]
    if vb:
        new_state[:, 2] = torch.where(inside, z.gather(1, idx)[:, 0], new_state[:, 2])
        new_state[:, 3] = torch.where(inside, dz.gather(1, idx)[:, 0], new_state[:, 3])
    new_acc = acc.cpu() if first else acc.cpu() * alpha[:, None]  # the first block's GEMM overwrites acc
    dev = logits.device
    return (e * dz).to(dev, logits.dtype), new_state.to(dev), new_acc.to(dev)


def online_finish(state, acc, weight, labels, row_scale, ignore_index):
    """Reference of ``torch.ops.sloth.ce_online_finish``: (loss [rows] fp32, dh [rows, H] in weight's dtype)."""
    state, acc, labels = state.cpu().double(), acc.cpu().double(), labels.cpu()
    w = weight.cpu().double()
    v = w.shape[0]
    ignored = labels == ignore_index
    valid = ~ignored & (labels >= 0) & (labels < v)
    m, s, zl, dl = state.unbind(-1)
    loss = torch.where(valid, m + torch.log(s) - zl, torch.where(ignored, 0.0, float("nan")))
    c = torch.ones_like(m) if row_scale is None else row_scale.cpu().double()
    c = torch.where(ignored, 0.0, c)
    w_lab = w[labels.clamp(0, v - 1)] * (valid * dl)[:, None]
    dh = c[:, None] * (acc / s[:, None] - w_lab)
    dh = torch.where(c[:, None] == 0, 0.0, dh)
    return loss.float().to(weight.device), dh.to(weight.device, weight.dtype)
