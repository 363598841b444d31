"""Modules and autograd Functions built on torch.ops.sloth."""

from .attention import AttentionFunction, attention
from .glu import glu
from .linear_cross_entropy import LinearCrossEntropyFunction, causal_lm_loss, linear_cross_entropy
from .linear_logprobs import LinearLogprobsFunction, linear_logprobs, linear_logprobs_stats
from .lora_group import LoraGroupFunction, lora_linear_group
from .lora_linear import lora_linear
from .lora_mlp import lora_mlp
from .moe import MoEExpertsFunction, MoEExpertsSpec, MoERouteFunction, moe_experts, moe_route  # MoE
from .norm_rope import RMSNormFunction, RopeFunction, rms_norm, rope

__all__ = [
    "MoEExpertsFunction", "MoEExpertsSpec", "MoERouteFunction", "moe_experts", "moe_route",
    "AttentionFunction",
    "attention",
    "LinearCrossEntropyFunction",
    "LinearLogprobsFunction",
    "LoraGroupFunction",
    "causal_lm_loss",
    "glu",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_logprobs_stats",
    "lora_linear",
    "lora_linear_group",
    "lora_mlp",
    "RMSNormFunction",
    "RopeFunction",
    "rms_norm",
    "rope",
]
