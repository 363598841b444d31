"""FinetuneConfig: every setting of a `sloth finetune` run, with the defaults of the bundled demo."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

METHODS = ("lora", "qlora", "full")
DTYPES = ("auto", "bf16", "fp16", "fp32")
#: the LoRA target modules (Llama / Qwen / Mistral / Gemma naming)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. ``model=None``: the bundled tiny Llama; ``dataset=None``: the bundled
    instruction data. ``steps`` (optimizer steps) wins over ``epochs`` when both are given; ``lr=None`` picks
    2e-3 for the bundled random-weight model and 2e-4 for a real one. ``exports``: formats of
    :data:`sloth.finetune.export.FORMATS` written after training (``merged``, ``gguf-q8_0``, ...)."""

    model: Optional[str] = None
    dataset: Optional[str] = None
    dataset_split: str = "train"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    chat_template: Optional[str] = None
    method: str = "lora"
    r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    max_seq_length: int = 128
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 3
    max_grad_norm: float = 1.0
    output_dir: str = "sloth-finetune-out"
    exports: Tuple[str, ...] = ()
    seed: int = 0
    dtype: str = "auto"
    device: Optional[str] = None
    patch: bool = True
    progress: bool = True

    #: optimizer steps when neither steps nor epochs is given
    DEFAULT_STEPS = 120

    def validate(self) -> "FinetuneConfig":
        """Raise FinetuneError on settings that cannot work; returns self."""
        from .errors import FinetuneError

        if self.method not in METHODS:
            raise FinetuneError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise FinetuneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("r", "max_seq_length", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.max_seq_length < 8:
            raise FinetuneError(f"--max-seq-length must be at least 8, got {self.max_seq_length}")
        if self.steps is not None and self.steps < 1:
            raise FinetuneError(f"--steps must be a positive integer, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise FinetuneError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise FinetuneError(f"--lr must be in (0, 1), got {self.lr}")
        if not self.lora_alpha > 0:
            raise FinetuneError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        from .export import FORMATS

        bad = [e for e in self.exports if e not in FORMATS]
        if bad:
            raise FinetuneError(f"--export: unknown format {bad[0]!r}; use some of {', '.join(FORMATS)}")
        return self

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (for summary.json)."""
        return dataclasses.asdict(self)
