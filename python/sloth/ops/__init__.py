"""One thin wrapper per ``torch.ops.sloth`` op: argument checks, fake kernels, autograd."""

from .cross_entropy import cross_entropy_chunk
from .mxfp4 import mxfp4_dequantize, mxfp4_quantize
from .nf4 import NF4_BLOCKSIZES, NF4State, nf4_dequantize, nf4_quantize

__all__ = ["NF4State", "cross_entropy_chunk", "NF4_BLOCKSIZES", "mxfp4_dequantize", "mxfp4_quantize", "nf4_dequantize", "nf4_quantize"]
