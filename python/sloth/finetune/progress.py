"""Progress of a `sloth finetune` run as a Transformers ``TrainerCallback`` on tqdm: steps, ETA, loss, learning
rate, grad norm, smoothed tokens/s and peak memory; it also keeps the loss history for the plot and summary."""

from __future__ import annotations

import resource
import sys
import time
from typing import List, Optional, Tuple

import torch
from transformers import TrainerCallback


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run: CUDA allocations on a GPU, peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over the optimizer steps (on stderr; off with ``enabled=False``), the loss history
    (``losses``, ``eval_losses``: (step, value)) and the tokens seen."""

    def __init__(self, device: torch.device, enabled: bool = True, smoothing: float = 0.3):
        self.device, self.enabled, self.smoothing = device, enabled, smoothing
        self.bar = None
        self.losses: List[Tuple[int, float]] = []
        self.eval_losses: List[Tuple[int, float]] = []
        self.tokens_per_s: Optional[float] = None
        self._last: Optional[Tuple[float, int]] = None  # (time, tokens seen) at the last update
        self.tokens = 0
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self._last = (self.start, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def on_step_end(self, args, state, control, **kwargs):
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        now = time.perf_counter()
        if self._last is not None and now > self._last[0] and seen >= self._last[1]:
            rate = (seen - self._last[1]) / (now - self._last[0])
            a = self.smoothing
            self.tokens_per_s = rate if self.tokens_per_s is None else a * rate + (1 - a) * self.tokens_per_s
        self._last = (now, seen)
        self.tokens = seen
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self.losses.append((step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_losses.append((step, float(logs["eval_loss"])))
        if self.bar is not None and "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if logs.get("grad_norm") is not None:
                parts.append(f"gnorm {float(logs['grad_norm']):.2f}")
            if self.tokens_per_s:
                parts.append(f"{self.tokens_per_s:,.0f} tok/s")
            parts.append(f"mem {peak_memory_bytes(self.device) / 2**30:.2f} GiB")
            self.bar.set_postfix_str(" | ".join(parts), refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
