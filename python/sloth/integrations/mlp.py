"""A decoder layer's MLP ``down(act(gate(x)) * up(x))`` on sloth's fused path (:func:`sloth.lora_mlp`).

The MLP modules of the supported families (``FamilySpec.mlp`` in :mod:`sloth.models`) get a
forward that runs the three projections through :func:`sloth.lora_linear` (NF4 or 16-bit base, the LoRA term of
a PEFT layer on the fast path, see :mod:`sloth.integrations.peft`) and the activation through the fused GLU
kernel, whose backward reuses the gate / up buffers in place. Whenever a projection or the activation is not
on the fast path (LoRA dropout in training, several adapters, DoRA, an Accelerate hook, another activation),
the model's own forward runs, so the answer never differs.

Recompute: under ``use_gradient_checkpointing="sloth"`` the backward recomputes each decoder layer. In the
decoder layers whose MLP output only feeds the residual sum that is the layer's output
(``FamilySpec.mlp_output_feeds_residual``: Llama, Qwen3, Mistral; not Gemma 3, whose post-MLP norm reads it), that output is never read during the recompute, so the down projection's
GEMM is skipped there (``lora_mlp(need_output=False)``): the backward is the same, one of the layer's largest
GEMMs less per step. :func:`sloth.integrations.transformers.patch` marks those MLPs (``OUTPUT_FEEDS_RESIDUAL``).

Long sequences: when the MLP's ``[tokens, intermediate]`` activations would take more than a quarter of the
free GPU memory, the tokens are processed in chunks, each under its own (non-reentrant) checkpoint, so only one
chunk's activations are alive through the layer's backward (one more MLP forward per chunk in backward).
``SLOTH_MLP_CHUNK_TOKENS=<n>`` forces chunks of n tokens (0: never chunk), on any device.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .. import config
from ..nn.lora_mlp import lora_mlp
from ..runtime.offload_checkpoint import recomputing
from .projections import as_layer_output, autocast_off, fast_projection, run_dtype

#: Transformers activation name -> sloth GLU kind
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu"}
#: Attribute set on such an MLP by sloth.patch: its recompute may skip the down projection's product
OUTPUT_FEEDS_RESIDUAL = "_sloth_output_feeds_residual"
#: Smallest chunk (tokens) the automatic policy uses: below it the GEMMs lose efficiency
MIN_CHUNK_TOKENS = 4096


def glu_kind_of(mlp) -> Optional[str]:
    """The GLU kind of ``mlp``'s activation from its config (None: not supported, the model's forward runs)."""
    cfg = getattr(mlp, "config", None)
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    return ACTIVATIONS.get(act) if isinstance(act, str) else None


def chunk_tokens(tokens: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per MLP chunk (``tokens``: no chunking): SLOTH_MLP_CHUNK_TOKENS when set, else on a GPU the largest
    multiple of 1024 (at least MIN_CHUNK_TOKENS) whose gate / up / hidden activations fit a quarter of the free
    memory (no chunks, without asking, when they take at most 1/128 of the GPU's total memory; none under
    torch.compile, which cannot trace the memory queries)."""
    n = config.MLP_CHUNK_TOKENS
    if n is not None:
        return tokens if n <= 0 else min(n, tokens)
    if device.type != "cuda" or torch.compiler.is_compiling():  # (compiled: no host memory queries, no chunks)
        return tokens
    per_token = 3 * intermediate * dtype.itemsize  # gate, up, act(gate) * up
    if tokens * per_token <= _total_memory(device) // 128:  # small next to the GPU: no query (it costs ~20 us)
        return tokens
    free, _ = torch.cuda.mem_get_info(device)
    if tokens * per_token <= free // 4:
        return tokens
    return min(tokens, max(MIN_CHUNK_TOKENS, (free // 4 // per_token) // 1024 * 1024))


@functools.lru_cache(maxsize=None)
def _total_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def sloth_mlp_forward(self, x):
    """``down(act(gate(x)) * up(x))`` through :func:`sloth.lora_mlp` (see the module docstring)."""
    kind = glu_kind_of(self)
    projs = [fast_projection(p) for p in (self.gate_proj, self.up_proj, self.down_proj)] if kind else []
    if not projs or any(p is None for p in projs) or x.device.type not in ("cpu", "cuda") or x.numel() == 0:
        return self._sloth_orig_forward(x)
    (gate, dt), (up, _), (down, _) = projs
    in_dtype = x.dtype
    dt = run_dtype(x, dt)
    with autocast_off(x.device.type):
        x2 = x.to(dt).reshape(-1, x.shape[-1])  # [tokens, hidden]
        intermediate = gate.weight.shape[0] if gate.quant_state is None else gate.quant_state.shape[0]
        n = chunk_tokens(x2.shape[0], intermediate, dt, x.device)
        if n >= x2.shape[0]:
            need = not (recomputing() and self.__dict__.get(OUTPUT_FEEDS_RESIDUAL, False))
            y = lora_mlp(x2, gate, up, down, kind, need_output=need)
        else:
            grad = torch.is_grad_enabled()
            y = torch.cat([checkpoint(lora_mlp, xc, gate, up, down, kind, use_reentrant=False) if grad
                           else lora_mlp(xc, gate, up, down, kind) for xc in x2.split(n)])  # [tokens, hidden]
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return as_layer_output(y, in_dtype, down.quant_state)  # the dtype the model's own forward gives
