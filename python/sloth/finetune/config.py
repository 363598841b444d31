"""FinetuneConfig: every setting of a `sloth finetune` run, with the defaults of the bundled demo, and the YAML
file form of it (``--config run.yaml``: the same names as the flags, dashes or underscores)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

METHODS = ("lora", "qlora", "full")
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. ``model=None``: the bundled tiny Llama; ``dataset=None``: the bundled
    instruction data. ``steps`` (optimizer steps) wins over ``epochs`` when both are given; ``lr=None`` picks
    2e-3 for the bundled random-weight model and 2e-4 for a real one. ``exports``: formats of
    :data:`sloth.finetune.export.FORMATS` written after training (``merged``, ``gguf-q4_k_m``, ...).
    ``overwrite``: replace an earlier run in ``output_dir`` (its adapter, plot, summary, ``merged*/``, ``gguf/``,
    ``checkpoints/``); without it such a folder is refused. ``resume``: continue from the last checkpoint in
    ``output_dir/checkpoints`` (``"auto"``) or from a checkpoint folder."""

    model: Optional[str] = None
    dataset: Optional[str] = None
    dataset_split: str = "train"
    eval_split: Optional[float] = None
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
    packing: bool = False
    padding_free: bool = False
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 3
    max_grad_norm: float = 1.0
    gradient_checkpointing: str = "sloth"
    output_dir: str = "sloth-finetune-out"
    overwrite: bool = False
    resume: Optional[str] = None
    save_steps: Optional[int] = None
    report_to: str = "none"
    exports: Tuple[str, ...] = ()
    seed: int = 0
    dtype: str = "auto"
    device: Optional[str] = None
    progress: bool = True
    verbose: bool = False

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
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_seq_length < 8:
            raise FinetuneError(f"--max-seq-length must be at least 8, got {self.max_seq_length}")
        for name in ("steps", "save_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise FinetuneError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise FinetuneError(f"--epochs must be positive, got {self.epochs}")
        if self.eval_split is not None and not 0 < self.eval_split < 1:
            raise FinetuneError(f"--eval-split must be a fraction in (0, 1), got {self.eval_split}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise FinetuneError(f"--lr must be in (0, 1), got {self.lr}")
        if not self.lora_alpha > 0:
            raise FinetuneError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.gradient_checkpointing not in ("sloth", "true", "false"):
            raise FinetuneError(f"--gradient-checkpointing must be sloth, true or false, got "
                                f"{self.gradient_checkpointing!r}")
        from .export import FORMATS

        bad = [e for e in self.exports if e not in FORMATS]
        if bad:
            raise FinetuneError(f"--export: unknown format {bad[0]!r}; use some of {', '.join(FORMATS)}")
        return self

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (for summary.json)."""
        return dataclasses.asdict(self)


def read_yaml(path: str) -> dict:
    """The settings of a ``--config`` YAML file as a dict of FinetuneConfig field names (dashes become
    underscores; ``max_length`` is read as ``max_seq_length``, TRL's name); unknown keys are an error."""
    from .errors import FinetuneError

    try:
        import yaml
    except ImportError:
        raise FinetuneError("--config needs PyYAML: pip install pyyaml") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise FinetuneError(f"--config {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise FinetuneError(f"--config {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"--config {path!r} must hold a mapping of option names to values")
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    aliases = {"max_length": "max_seq_length", "learning_rate": "lr", "max_steps": "steps",
               "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "export": "exports", "lora_r": "r"}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        key = aliases.get(key, key)
        if key not in names:
            raise FinetuneError(f"--config {path!r}: unknown option {k!r}")
        if key == "exports" and isinstance(v, str):
            from .export import parse_exports

            v = parse_exports(v)
        elif key == "exports" and isinstance(v, list):
            v = tuple(v)
        out[key] = v
    return out
