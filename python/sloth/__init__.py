"""sloth: compiled kernels that make fine-tuning of Hugging Face language models faster and smaller.

Importing sloth loads the operator library (``torch.ops.sloth.*``); the public API is re-exported here.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sloth.*)
from . import ops
from .ops import (
    NF4State,
    mxfp4_dequantize,
    mxfp4_quantize,
    nf4_dequantize,
    nf4_quantize,
)

# QLoRA linear, fused GLU activation, LoRA MLP (qlora branch)
from . import nn
from .nn import glu, lora_linear, lora_mlp
from .nn.lora_mlp import LoraProj

__version__ = "0.1.0"

__all__ = [
    "NF4State",
    "__version__",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "nf4_dequantize",
    "nf4_quantize",
    "ops",
]
__all__ += ["LoraProj", "glu", "lora_linear", "lora_mlp", "nn"]
