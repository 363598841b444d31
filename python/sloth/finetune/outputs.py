"""The outputs of a run in the output directory: the adapter (or full model), the tokenizer with its chat
template, loss.png and summary.json."""

from __future__ import annotations

import json
import os

from .plot import write_loss_plot


def save_outputs(output_dir: str, model, tokenizer, summary: dict) -> None:
    """Save the trained weights (PEFT ``save_pretrained``: the LoRA adapter only; the whole model for full
    fine-tuning), the tokenizer, the loss curve and the summary into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_loss_plot(os.path.join(output_dir, "loss.png"), summary["losses"])
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
