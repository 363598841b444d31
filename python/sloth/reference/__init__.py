"""Plain-PyTorch implementations of every sloth op: the oracle of the tests, written for clarity."""

from . import cross_entropy, glu, lora_linear, mxfp4, nf4
from . import norm_rope
from . import moe
from . import attention

__all__ = ["attention", "cross_entropy", "glu", "lora_linear", "moe", "mxfp4", "nf4", "norm_rope"]
