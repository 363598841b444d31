"""sloth's training runtime: what runs around the differentiable ops of :mod:`sloth.nn` during a step.

- :mod:`.offload_checkpoint`: per-layer checkpoints whose inputs live in pinned host memory
- :mod:`.layer_graphs`: CUDA graphs of whole decoder layers (forward, recompute + backward)
- :mod:`.saved_attention`: attention outputs kept through the checkpoint so the recompute skips them
- :mod:`.pinned_arena`: one exact-size page-locked host region for the offloaded inputs
- :mod:`.workspace`: reusable scratch buffers (dequantized weights)
- :mod:`.allocator`: the CUDA caching-allocator settings sloth applies
- :mod:`.streams`: the side CUDA streams of all of the above
"""

from .offload_checkpoint import OffloadedCheckpointFunction, offloaded_checkpoint
from .workspace import Workspace

__all__ = ["OffloadedCheckpointFunction", "Workspace", "offloaded_checkpoint"]
