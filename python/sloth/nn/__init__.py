"""Modules and autograd Functions built on torch.ops.sloth."""

from .linear_cross_entropy import LinearCrossEntropyFunction, causal_lm_loss, linear_cross_entropy
from .linear_logprobs import LinearLogprobsFunction, linear_logprobs

__all__ = [
    "LinearCrossEntropyFunction",
    "LinearLogprobsFunction",
    "causal_lm_loss",
    "linear_cross_entropy",
    "linear_logprobs",
]
