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
    hidden = hidden.reshape(-1, hidden.shape[-1])
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
