"""The loss curve of a run: ``loss.csv`` always, and ``loss.png`` drawn with matplotlib when it is installed
(axes labelled, values on the ticks, a title naming the model and the method, the per-step loss, its running
mean and the eval loss)."""

from __future__ import annotations

import io
import math
from typing import List, Optional, Sequence, Tuple

from ..export.files import atomic_write


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_csv(losses: Sequence[Tuple[int, float]], eval_losses: Sequence[Tuple[int, float]] = ()) -> str:
    """``step,loss,eval_loss`` rows (one per logged step; eval_loss empty where none was measured)."""
    ev = dict(eval_losses)
    steps = sorted(set(s for s, _ in losses) | set(ev))
    tr = dict(losses)
    rows = ["step,loss,eval_loss"]
    for s in steps:
        a, b = tr.get(s), ev.get(s)
        rows.append(f"{s},{'' if a is None else repr(float(a))},{'' if b is None else repr(float(b))}")
    return "\n".join(rows) + "\n"


def loss_figure(losses: Sequence[Tuple[int, float]], title: str, eval_losses: Sequence[Tuple[int, float]] = ()):
    """The matplotlib ``Figure`` of the loss curve ((step, loss) pairs), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(s, v) for s, v in losses if math.isfinite(v)]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color="#a0bee8", linewidth=1, label="loss per step")
        ax.plot(xs, running_mean(ys, max(1, len(ys) // 20)), color="#1446be", linewidth=2,
                label=f"running mean ({max(1, len(ys) // 20)} steps)")
    ev = [(s, v) for s, v in eval_losses if math.isfinite(v)]
    if ev:
        ax.plot(*zip(*ev), "o-", color="#d2691e", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats / token)")
    ax.set_title(title)
    ax.grid(True, color="#e1e1e1")
    if pts or ev:
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def loss_png(losses: Sequence[Tuple[int, float]], title: str,
             eval_losses: Sequence[Tuple[int, float]] = ()) -> Optional[bytes]:
    """PNG bytes of :func:`loss_figure`, or None when matplotlib is not installed."""
    fig = loss_figure(losses, title, eval_losses)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_loss_outputs(out_csv: str, out_png: str, losses, title: str, eval_losses=()) -> bool:
    """Write ``loss.csv`` and (with matplotlib) ``loss.png`` atomically; returns whether the PNG was written."""
    atomic_write(out_csv, loss_csv(losses, eval_losses).encode())
    png = loss_png(losses, title, eval_losses)
    if png is None:
        return False
    atomic_write(out_png, png)
    return True
