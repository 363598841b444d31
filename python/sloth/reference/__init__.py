"""Plain-PyTorch implementations of every sloth op: the oracle of the tests, written for clarity."""

from . import cross_entropy, glu, lora_linear, mxfp4, nf4

__all__ = ["cross_entropy", "glu", "lora_linear", "mxfp4", "nf4"]
