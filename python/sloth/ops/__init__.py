"""One thin wrapper per ``torch.ops.sloth`` op: argument checks, fake kernels, autograd."""

from .attention import attention_backward, attention_forward
from .cross_entropy import ce_online_block_, ce_online_finish, cross_entropy_chunk
from .glu import GLU_KINDS, glu_backward_, glu_forward
from .mxfp4 import MXFP4State, mxfp4_dequantize, mxfp4_quantize
from .moe import (MoEWeight, moe_combine, moe_combine_backward, moe_glu_backward, moe_grouped_gemm,  # MoE
                  moe_permute, moe_route)
from .norm_rope import rms_norm_backward, rms_norm_forward, rope, rope_
from .nf4 import NF4_BLOCKSIZES, NF4State, nf4_dequantize, nf4_quantize
from .qlora import NF4Args, nf4_gemv_lora

__all__ = [
    "MoEWeight", "moe_combine", "moe_combine_backward", "moe_glu_backward", "moe_grouped_gemm", "moe_permute",
    "moe_route",
    "attention_backward", "attention_forward",
    "GLU_KINDS", "MXFP4State", "NF4Args", "NF4State", "NF4_BLOCKSIZES", "ce_online_block_", "ce_online_finish",
    "cross_entropy_chunk", "glu_backward_", "glu_forward",
    "mxfp4_dequantize", "mxfp4_quantize", "nf4_dequantize", "nf4_gemv_lora", "nf4_quantize",
    "rms_norm_backward", "rms_norm_forward", "rope", "rope_",
]
