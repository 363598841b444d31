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


def ce_online_block_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    state: torch.Tensor,
    acc: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    margin: float = 0.0,
) -> None:
    """One vocabulary block of the online linear cross-entropy (frozen head), in place.

    ``logits [rows, vb]`` raw block logits (columns ``vocab_start ..``) become ``p' = exp(z - m) dz/dx``;
    ``state [rows, 4]`` fp32 = (m, sum exp(z - m), z_label, dz/dx_label) is updated (initialized when
    ``vocab_start == 0``) and ``acc [rows, H]`` fp32 rescaled where m moves; the caller then adds
    ``p' @ W_block`` into acc. m only moves by more than ``margin`` (p' <= e^margin dz/dx).
    Traffic: the block read twice and written once, plus the rescaled acc rows.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("labels", labels, dtypes=(torch.int64,), dim=1, device=logits.device)
    check_tensor("state", state, dtypes=(torch.float32,), dim=2, device=logits.device)
    check_tensor("acc", acc, dtypes=(torch.float32,), dim=2, device=logits.device)
    rows = logits.shape[0]
    if labels.shape[0] != rows or tuple(state.shape) != (rows, 4) or acc.shape[0] != rows:
        raise ValueError(f"sloth: ce_online_block needs labels [{rows}], state [{rows}, 4], acc [{rows}, H]; got "
                         f"{tuple(labels.shape)}, {tuple(state.shape)}, {tuple(acc.shape)}")
    if not (logits.is_contiguous() and state.is_contiguous() and acc.is_contiguous() and labels.is_contiguous()):
        raise ValueError("sloth: ce_online_block needs contiguous logits, labels, state and acc (updated in place)")
    check_device_supported(logits, "ce_online_block")
    torch.ops.sloth.ce_online_block(logits, labels, int(vocab_start), state, acc, float(softcap) if softcap else 0.0,
                                    1.0 if logit_scale is None else float(logit_scale), float(margin))


def ce_online_finish(state: torch.Tensor, acc: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int, dh: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """After the last block: per-row loss ``[rows]`` fp32 (0 on ignored rows, NaN for labels outside [0, V)),
    and ``dh [rows, H]`` (weight's dtype, written) = ``c * d loss / d h = c (acc / s - dz/dx_label W[label])``
    with ``c = row_scale [rows]`` (1 when None), 0 on ignored rows.
    Traffic: acc [rows, H] fp32 and one W row per row read, dh written."""
    check_tensor("acc", acc, dtypes=(torch.float32,), dim=2)
    check_tensor("state", state, dtypes=(torch.float32,), dim=2, device=acc.device)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, device=acc.device)
    check_tensor("labels", labels, dtypes=(torch.int64,), dim=1, device=acc.device)
    check_tensor("dh", dh, dtypes=(weight.dtype,), dim=2, device=acc.device)
    rows, h = acc.shape
    if tuple(state.shape) != (rows, 4) or labels.shape[0] != rows or tuple(dh.shape) != (rows, h) \
            or weight.shape[1] != h:
        raise ValueError(f"sloth: ce_online_finish needs state [{rows}, 4], labels [{rows}], dh [{rows}, {h}], "
                         f"weight [V, {h}]; got {tuple(state.shape)}, {tuple(labels.shape)}, {tuple(dh.shape)}, "
                         f"{tuple(weight.shape)}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, dtypes=FLOAT_DTYPES, dim=1, device=acc.device)
        if row_scale.shape[0] != rows:
            raise ValueError(f"sloth: row_scale has {row_scale.shape[0]} entries, expected {rows}")
    check_device_supported(acc, "ce_online_finish")
    return torch.ops.sloth.ce_online_finish(state, acc, weight, labels, row_scale, int(ignore_index), dh)


@torch.library.register_fake("sloth::ce_online_block")
def _(logits, labels, vocab_start, state, acc, softcap, logit_scale, margin):
    return None


@torch.library.register_fake("sloth::ce_online_finish")
def _(state, acc, weight, labels, row_scale, ignore_index, dh):
    return acc.new_empty((acc.shape[0],))
