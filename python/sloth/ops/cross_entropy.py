"""One chunk of the linear cross-entropy (``torch.ops.sloth.cross_entropy_chunk``)."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor

INT_DTYPES = (torch.int64, torch.int32)


def cross_entropy_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    grad_nll: Optional[torch.Tensor] = None,
    grad_entropy: Optional[torch.Tensor] = None,
    grad_scale: float = 1.0,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax statistics of one chunk of raw logits ``[rows, V]`` and, with ``compute_grad``, its gradient in place.

    ``z = logit_scale * logits`` (then ``softcap * tanh(z / softcap)`` when ``softcap``); returns fp32 ``[rows]``
    ``(loss, lse, entropy)`` with ``loss = lse - z[label]`` (0 on ``ignore_index`` rows, NaN for labels outside
    ``[0, V)``). With ``compute_grad`` ``logits`` is overwritten by d/dlogits of
    ``sum_rows c_nll * loss + c_ent * entropy``, ``c_nll = grad_scale * grad_nll`` (1 when None), ``c_ent =
    grad_scale * grad_entropy`` (0 when None). Traffic: reads logits once (twice and writes once with grad).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=2)
    if not logits.is_contiguous():
        raise ValueError("sloth: logits must be contiguous (the gradient is written into it in place)")
    check_tensor("labels", labels, dtypes=INT_DTYPES, dim=1, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"sloth: labels has {labels.shape[0]} entries but logits has {logits.shape[0]} rows")
    for name, g in (("grad_nll", grad_nll), ("grad_entropy", grad_entropy)):
        if g is not None:
            check_tensor(name, g, dtypes=FLOAT_DTYPES, dim=1, device=logits.device)
            if g.shape[0] != logits.shape[0]:
                raise ValueError(f"sloth: {name} has {g.shape[0]} entries but logits has {logits.shape[0]} rows")
    check_device_supported(logits, "cross_entropy_chunk")
    return torch.ops.sloth.cross_entropy_chunk(
        logits, labels, grad_nll, grad_entropy, float(grad_scale), int(ignore_index),
        float(softcap) if softcap else 0.0, 1.0 if logit_scale is None else float(logit_scale), bool(compute_grad),
    )


@torch.library.register_fake("sloth::cross_entropy_chunk")
def _(logits, labels, grad_nll, grad_entropy, grad_scale, ignore_index, softcap, logit_scale, compute_grad):
    rows = logits.shape[0]
    return tuple(logits.new_empty((rows,), dtype=torch.float32) for _ in range(3))
