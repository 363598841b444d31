"""sloth: compiled kernels that make fine-tuning of Hugging Face language models faster and smaller.

Importing sloth loads the operator library (``torch.ops.sloth.*``); the public API is re-exported here.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import compat

compat.check()  # one line naming the fix when this build cannot load under the installed torch

from . import _C  # noqa: F401,E402  (registers torch.ops.sloth.*)
from . import models, nn, ops, runtime
from .nn import attention, causal_lm_loss, glu, linear_cross_entropy, linear_logprobs, lora_linear, lora_mlp
from .nn.lora_mlp import LoraProj
from .ops import MXFP4State, NF4State, mxfp4_dequantize, mxfp4_quantize, nf4_dequantize, nf4_quantize

from .integrations.transformers import patch, patched_modules, unpatch
from .nn.norm_rope import rms_norm, rope

from .api import FastLanguageModel, FastModel, from_pretrained, get_peft_model, is_bfloat16_supported
from .integrations.checkpointing import set_gradient_checkpointing
from .runtime.offload_checkpoint import offloaded_checkpoint
# transformers / trl / gguf are imported on use
from .nn.linear_logprobs import linear_logprobs_stats
from .integrations.trl import train_on_responses_only
from .export import save_gguf, save_merged

__version__ = "0.1.0"

__all__ = [
    "FastLanguageModel",
    "FastModel",
    "LoraProj",
    "MXFP4State",
    "NF4State",
    "__version__",
    "attention",
    "causal_lm_loss",
    "from_pretrained",
    "get_peft_model",
    "glu",
    "is_bfloat16_supported",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_logprobs_stats",
    "lora_linear",
    "lora_mlp",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "nf4_dequantize",
    "nf4_quantize",
    "models",
    "nn",
    "offloaded_checkpoint",
    "ops",
    "patch",
    "patched_modules",
    "rms_norm",
    "rope",
    "runtime",
    "save_gguf",
    "save_merged",
    "set_gradient_checkpointing",
    "train_on_responses_only",
    "unpatch",
]
