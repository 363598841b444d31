"""Modules and autograd Functions built on torch.ops.sloth."""

from .glu import glu
from .lora_linear import lora_linear
from .lora_mlp import lora_mlp
from .workspace import Workspace

__all__ = ["Workspace", "glu", "lora_linear", "lora_mlp"]
