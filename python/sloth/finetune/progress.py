"""A small progress bar on stderr: step, loss, tokens/s, memory, elapsed / remaining time."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Redraws one line per update on a terminal; elsewhere prints a line every ~10% of the steps."""

    def __init__(self, total: int, device: torch.device, enabled: bool = True, stream=None):
        self.total, self.device, self.enabled = total, device, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.every = max(1, total // 10)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Show the state after optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        el = time.perf_counter() - self.start
        eta = el / step * (self.total - step)
        mem = peak_memory_bytes(self.device) / 2**20
        width = 20
        done = width * step // self.total
        bar = "#" * done + "-" * (width - done)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s | mem {mem:,.0f} MiB | {_fmt_time(el)}<{_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        elif step % self.every == 0 or step == self.total or step == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line on a terminal (after an interruption)."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
