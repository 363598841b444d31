"""One thin wrapper per ``torch.ops.sloth`` op: argument checks, fake kernels, autograd."""

from .cross_entropy import cross_entropy_chunk
from .mxfp4 import mxfp4_dequantize, mxfp4_quantize
from .nf4 import NF4_BLOCKSIZES, NF4State, nf4_dequantize, nf4_quantize

<<<<<<< HEAD
__all__ = ["NF4State", "cross_entropy_chunk", "NF4_BLOCKSIZES", "mxfp4_dequantize", "mxfp4_quantize", "nf4_dequantize", "nf4_quantize"]
=======
__all__ = ["NF4State", "NF4_BLOCKSIZES", "mxfp4_dequantize", "mxfp4_quantize", "nf4_dequantize", "nf4_quantize"]

# QLoRA linear and fused GLU ops (qlora branch)
from .glu import GLU_KINDS, glu_backward_, glu_forward  # noqa: E402
from .qlora import NF4Args, nf4_gemv_lora  # noqa: E402

__all__ += ["GLU_KINDS", "NF4Args", "glu_backward_", "glu_forward", "nf4_gemv_lora"]
>>>>>>> qlora
