"""Fused linear cross-entropy: loss and gradients of softmax(h W^T) without materializing the logits.

Gradients are computed in the forward pass; backward only scales them by the upstream gradient. With a frozen
W (LoRA) the online path (_online_head) keeps one [rows, vocab block] of logits and an fp32 [rows, H]
accumulator alive. When dW or db is wanted, forward loops over row chunks of the hidden states: the chunk's
logits come from one cuBLAS GEMM in the input dtype, one sloth kernel turns them in place into d loss / d logits
(fp32 math), and two more GEMMs fold that into dh and dW / db; one [chunk, V] logits buffer is alive.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._checks import check_linear_head
from ._chunking import chunk_logits, fold_chunk_grads, prepare_head_inputs
from ._online_head import online_head_grad

REDUCTIONS = ("mean", "sum")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over rows of the cross-entropy, divided by ``divisor``; gradients computed during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, ignore_index, softcap, logit_scale, chunk, needs):
        # hidden [tokens, hidden], weight [vocab, hidden], bias [vocab] | None, labels [tokens] int64,
        # divisor: 0-d fp32 tensor or float; needs = (dh, dW, db) wanted.
        need_dh, need_dw, need_db = needs
        grad = need_dh or need_dw or need_db
        n, v = hidden.shape[0], weight.shape[0]
        if needs == (True, False, False):  # frozen head: the online path
            loss_rows, dh = online_head_grad(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, chunk)
            ctx.divisor, ctx.grads, ctx.bias_dtype = divisor, (dh, None, None), None
            return loss_rows.sum() / divisor
        loss_rows = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
        dh = torch.empty_like(hidden) if need_dh else None  # [tokens, hidden]
        # dW accumulates in the weight's dtype: each chunk's GEMM accumulates its `chunk` rows in fp32 inside
        # cuBLAS and rounds once (beta=1 addmm), and a trainable W gets large chunks (few roundings, see
        # _chunking); an fp32 accumulator would cost another V * H * 4 bytes (2 GiB at V=128k, H=4096).
        dw = torch.zeros_like(weight) if need_dw else None  # [vocab, hidden]
        db = torch.zeros((v,), dtype=torch.float32, device=hidden.device) if need_db else None  # [vocab] fp32
        if n > 0:
            buf = hidden.new_empty((min(chunk, n), v))  # [chunk, vocab] logits, then their gradient
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                h_c = hidden[s:e]  # [c, hidden]
                lg = chunk_logits(h_c, weight, bias, buf[: e - s])  # [c, vocab]
                loss_c, _, _ = torch.ops.sloth.cross_entropy_chunk(
                    lg, labels[s:e], None, None, 1.0, ignore_index, softcap, logit_scale, grad)
                loss_rows[s:e] = loss_c
                if grad:
                    fold_chunk_grads(lg, h_c, weight, dh[s:e] if need_dh else None, dw, db)
            del buf
        ctx.divisor = divisor
        ctx.grads = (dh, dw, db)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_rows.sum() / divisor

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("sloth.linear_cross_entropy: backward ran twice; its gradients are computed in "
                               "forward and consumed by the first backward (retain_graph is not supported)")
        dh, dw, db = ctx.grads
        ctx.grads = None
        scale = grad_out.float() / ctx.divisor  # 0-d fp32
        if dh is not None:
            dh.mul_(scale)  # in place: no second [tokens, hidden] buffer
        if dw is not None:
            dw.mul_(scale)
        if db is not None:
            db = db.mul_(scale).to(ctx.bias_dtype)
        return dh, dw, db, None, None, None, None, None, None, None


def _check_labels(labels, vocab, ignore_index):
    """Raise for a label outside [0, vocab) other than ignore_index where that costs no host sync (labels on the
    CPU, eager); elsewhere (labels on a GPU, or traced by torch.compile) such a row's loss and gradient are NaN
    (the kernels poison them), never a finite gradient an optimizer would step on."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"sloth.linear_cross_entropy: label {int(labels[i])} at flat position {i} is outside "
                         f"[0, {vocab}) and not ignore_index ({ignore_index}); fix the labels (or the vocabulary "
                         "size of the head)")


def _divisor(labels, ignore_index, reduction, num_items_in_batch, device):
    """The loss's divisor: num_items_in_batch, else the number of non-ignored labels (mean) or 1 (sum); a
    divisor of 0 (nothing to average) becomes 1, so an all-ignored batch has loss 0, not NaN. A negative
    num_items_in_batch is an error (a number, or a CPU tensor), or (a GPU tensor, read without a host sync) a NaN
    divisor: loss and gradients NaN."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.device.type == "cpu" and not torch.compiler.is_compiling() and \
                    bool((num_items_in_batch < 0).any()):
                raise ValueError(f"sloth.linear_cross_entropy: num_items_in_batch must be >= 0, got "
                                 f"{num_items_in_batch.tolist()}")
            # a host tensor (a Trainer's count made on the CPU): an asynchronous copy (the value is staged at once),
            # not a blocking one that waits for the queued forward to drain
            d = num_items_in_batch.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
            d = torch.where(d < 0, torch.full_like(d, float("nan")), d)
            return torch.where(d == 0, torch.ones_like(d), d)
        d = float(num_items_in_batch)
        if not d >= 0:
            raise ValueError(f"sloth.linear_cross_entropy: num_items_in_batch must be >= 0, got {num_items_in_batch}")
        return d if d != 0 else 1.0
    if reduction == "sum":
        return 1.0
    return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy of ``softmax(z)`` with ``z = logit_scale * (hidden @ weight.T + bias)``, optionally
    softcapped ``softcap * tanh(z / softcap)``, against ``labels``, without materializing the logits.

    Shapes: ``hidden [..., H]`` (fp32 / fp16 / bf16), ``weight [V, H]`` (same dtype), ``bias [V]``, ``labels [...]``
    integer. Returns a 0-d fp32 loss: the sum over non-ignored tokens divided by ``num_items_in_batch`` when
    given (so that gradient accumulation over micro-batches equals one big batch), else by the number of
    non-ignored tokens (``reduction="mean"``) or 1 (``"sum"``). An all-ignored batch gives loss 0 and zero grads.
    Differentiable in hidden, weight and bias; gradients are computed in the forward pass, only for inputs that
    require grad (a frozen weight costs no dW work). A label outside ``[0, V)`` other than ``ignore_index`` is an
    error when the labels are on the CPU; on a GPU (checking would wait for the device) its row gives a NaN loss
    and NaN gradients instead, so the step is visibly broken rather than silently wrong. A negative
    ``num_items_in_batch`` is an error (NaN for a GPU tensor).
    ``chunk_size`` (rows per chunk) defaults to 1024 rows when only ``hidden`` needs a gradient (the frozen-head
    online path: 1024 x 8192 logits + a 1024 x H fp32 accumulator alive), else ~64 MiB of logits but at least
    256 rows on a GPU (256 MiB when the weight is trainable); at most a quarter of the free GPU memory.
    """
    check_linear_head("linear_cross_entropy", hidden, weight, labels, bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"sloth.linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"sloth.linear_cross_entropy: softcap must be positive, got {softcap}")
    h2, lab, needs, chunk = prepare_head_inputs(hidden, weight, bias, labels, chunk_size, online=True)
    _check_labels(lab, weight.shape[0], ignore_index)
    divisor = _divisor(lab, ignore_index, reduction, num_items_in_batch, hidden.device)
    return LinearCrossEntropyFunction.apply(
        h2, weight, bias, lab, divisor, int(ignore_index), float(softcap) if softcap else 0.0,
        1.0 if logit_scale is None else float(logit_scale), chunk, needs)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    final_logit_softcapping: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """Causal-LM loss as Transformers' ``ForCausalLMLoss`` computes it, from ``hidden [B, T, H]`` (the last
    hidden states, before the LM head ``weight [V, H]``) instead of logits: position t predicts ``labels[t+1]``
    (labels are padded with ``ignore_index`` and shifted, so hidden is not copied); ``shift_labels [B, T]``
    when given is used as is. Sum over tokens / ``num_items_in_batch`` when given, else mean over non-ignored
    tokens. ``final_logit_softcapping`` (Gemma 2/3) and ``logit_scale`` (Cohere) act on the logits; other
    keyword arguments a ForCausalLM loss receives are accepted and ignored."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)  # [B, T + 1]
        shift_labels = labels[..., 1:]  # [B, T]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    return linear_cross_entropy(
        hidden, weight, shift_labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, softcap=final_logit_softcapping, logit_scale=logit_scale,
        chunk_size=chunk_size)
