"""Plain-PyTorch implementations of every sloth op: the oracle of the tests, written for clarity."""

from . import mxfp4, nf4
from . import glu, lora_linear  # qlora branch

__all__ = ["mxfp4", "nf4"]
__all__ += ["glu", "lora_linear"]
