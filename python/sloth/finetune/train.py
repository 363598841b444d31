"""`sloth finetune` on the whole stack: :func:`sloth.from_pretrained` -> :func:`sloth.get_peft_model` (LoRA /
QLoRA with offloaded checkpointing; or every weight for full fine-tuning) -> TRL's ``SFTTrainer`` on
prompt-completion data (loss on the responses only; packing / padding-free as options; checkpoints, ``--resume``,
an eval split, ``report_to``), then the adapter, tokenizer, loss plot and summary saved atomically, and the
exports."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Optional

import torch

from .. import models
from ..export.files import atomic_write
from .config import FinetuneConfig
from .data import bundled_data_path, prepare_dataset
from .errors import FinetuneError
from .outputs import clear_earlier_run, default_log, inside, prepare_output_dir, save_into, sigint_deferred

BUNDLED_SEED = 0  # the bundled model's weights do not depend on --seed
#: loggers of the libraries under the run, quiet unless --verbose (bitsandbytes' hub-kernel notice among them)
THIRD_PARTY_LOGGERS = ("bitsandbytes", "kernels", "transformers", "datasets", "trl", "peft", "accelerate",
                       "huggingface_hub", "torch.distributed")
_THIRD_PARTY_MODULES = r"(transformers|peft|trl|accelerate|datasets|bitsandbytes|kernels|huggingface_hub|torch)(\.|$)"


@dataclasses.dataclass
class FinetuneResult:
    """What a run leaves: the trained model (in memory), its tokenizer, the summary written to summary.json."""

    model: torch.nn.Module
    tokenizer: object
    summary: dict
    output_dir: str
    trainer: object = None  # the TRL SFTTrainer that ran


def quiet_libraries(verbose: bool) -> None:
    """Unless ``verbose``: silence the loggers, advisory warnings and progress bars of the libraries under the run
    (set before they are imported, so that import-time notices stay quiet too)."""
    if verbose:
        return
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for cat in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat, module=_THIRD_PARTY_MODULES)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` when given (checked), else cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FinetuneError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device cuda asked for but no CUDA GPU is visible; leave the device out to run on the CPU")
    return dev


def resolve_dtype(name: str, device: torch.device):
    """(torch dtype, name) of ``--dtype`` on ``device``: auto is bf16 on a GPU with bf16, fp16 on an older GPU,
    fp32 on the CPU."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinetuneError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16")
    if name == "fp16" and device.type == "cpu":
        raise FinetuneError("--dtype fp16 is not supported on the CPU; use --dtype fp32 or bf16")
    return names[name], name


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: the contents of a file when it names one, else the literal Jinja string; checked by
    compiling it and rendering a two-turn conversation (a bad template is a one-line FinetuneError)."""
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FinetuneError(f"--chat-template: cannot read {value!r} ({e})") from None
    elif "{%" in value or "{{" in value:
        text = value
    else:
        raise FinetuneError(f"--chat-template {value!r} is neither a file nor a Jinja template string")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        tpl = env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise FinetuneError(f"--chat-template is not valid Jinja: {e.message} (line {e.lineno})") from None
    try:
        out = tpl.render(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                         add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
    except Exception as e:  # undefined filters, raise_exception(), type errors ...
        raise FinetuneError(f"--chat-template fails on a user / assistant conversation ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if "hello" not in out:
        raise FinetuneError("--chat-template does not write the assistant's message (no 'content' of the messages)")
    return text


def _load_tokenizer(path: str, template: Optional[str]):
    from transformers import AutoTokenizer

    from .tokenizer import CHAT_TEMPLATE

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FinetuneError(f"could not load a tokenizer for --model {path!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); pass a local "
                            f"model folder or a hub id that is in the local cache") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if template is not None:
        tok.chat_template = template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _check_model(path: str):
    """The config of ``path``, checked: a causal LM of a family sloth supports."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise FinetuneError(f"could not load the config of --model {path!r} ({type(e).__name__}); pass a local "
                            f"model folder or a hub id that is in the local cache") from None
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FinetuneError(f"--model {path!r} is a {cfg.model_type!r} model, which is not a causal language model "
                            f"family (AutoModelForCausalLM cannot load it); pick a decoder-only LM")
    if models.for_model_type(cfg.model_type) is None:
        raise FinetuneError(f"--model {path!r} is a {cfg.model_type!r} model; sloth finetune supports "
                            f"{models.supported()}")
    return cfg


def total_steps(config: FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps of the run: ``steps``, else ``epochs`` over the data, else the default."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        import math

        return max(1, math.ceil(config.epochs * n_examples / (config.batch_size * config.grad_accum)))
    return FinetuneConfig.DEFAULT_STEPS


def _sft_config(config: FinetuneConfig, out: str, steps: int, lr: float, dtype_name: str, device, has_eval: bool):
    from trl import SFTConfig

    save = config.save_steps is not None
    kw = dict(
        output_dir=os.path.join(out, "checkpoints"), max_steps=steps, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=min(config.warmup_steps, steps // 10),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=config.seed,
        data_seed=config.seed, logging_steps=1, logging_strategy="steps", report_to=config.report_to,
        save_strategy="steps" if save else "no", save_steps=config.save_steps or 500, save_total_limit=2 if save else None,
        eval_strategy="steps" if has_eval else "no", eval_steps=max(1, steps // 5) if has_eval else None,
        disable_tqdm=True, use_cpu=device.type == "cpu", bf16=dtype_name == "bf16", fp16=dtype_name == "fp16",
        gradient_checkpointing=config.gradient_checkpointing != "false",  # sloth's mode sticks (offloaded)
        max_length=config.max_seq_length, packing=config.packing, padding_free=config.padding_free,
        completion_only_loss=True, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        remove_unused_columns=True, optim="adamw_torch", save_only_model=False)
    if config.packing:
        kw["packing_strategy"] = "bfd"
    elif config.padding_free:
        kw["max_length"] = None  # TRL truncates padding-free batches only when packing
    return SFTConfig(**kw)


def _params(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def finetune(config: FinetuneConfig, log=None) -> FinetuneResult:
    """Run a fine-tune as ``config`` says and write its outputs to ``config.output_dir``; returns the result.
    Ctrl-C stops training, saves what was trained so far and returns (``summary["interrupted"]`` is True)."""
    log = log or default_log
    config.validate()
    quiet_libraries(config.verbose)
    device = resolve_device(config.device)
    compute_dtype, dtype_name = resolve_dtype(config.dtype, device)
    if config.method == "qlora" and device.type != "cuda":
        raise FinetuneError("--method qlora needs a CUDA GPU (and bitsandbytes); use --method lora on the CPU")
    out = config.output_dir
    template = read_chat_template(config.chat_template)
    prepare_output_dir(out, config.overwrite, config.resume is not None)

    if config.model is None:
        model_path = bundled_model_path_for(out)
        lr = config.lr or 2e-3
    else:
        model_path = config.model
        lr = config.lr or 2e-4
    model_config = _check_model(model_path)
    tokenizer = _load_tokenizer(model_path, template)
    if config.exports:
        from .export import check_exports

        check_exports(config.exports, model_config, tokenizer)  # before training, not after
    if config.padding_free and not config.packing:
        log("sloth finetune: --padding-free without --packing: examples are not truncated to --max-seq-length "
            "(TRL cuts rows only when packing)")
    dataset, skipped = prepare_dataset(config)
    if skipped:
        log(f"sloth finetune: skipped {skipped} of {skipped + len(dataset)} rows with no response (missing, null or "
            f"empty {config.output_column!r} / assistant turn)")
    eval_ds = None
    if config.eval_split:
        if len(dataset) < 2:
            raise FinetuneError("--eval-split needs at least 2 usable rows")
        split = dataset.train_test_split(test_size=config.eval_split, seed=config.seed)
        dataset, eval_ds = split["train"], split["test"]

    if config.overwrite and config.resume is None:
        clear_earlier_run(out)  # every check passed: the earlier run is replaced from here on

    import sloth
    from trl import SFTTrainer

    from ..integrations.checkpointing import set_gradient_checkpointing

    mode = {"sloth": "sloth", "true": True, "false": False}[config.gradient_checkpointing]
    try:
        model, _ = sloth.from_pretrained(
            model_path, max_seq_length=config.max_seq_length, load_in_4bit=config.method == "qlora",
            full_finetuning=config.method == "full", dtype=compute_dtype,
            **({"device_map": "cpu"} if device.type == "cpu" else {}))
    except (ValueError, OSError, ImportError) as e:
        raise FinetuneError(str(e).removeprefix("sloth.from_pretrained: ")) from None
    if config.method == "full":
        set_gradient_checkpointing(model, mode)
    else:
        model = sloth.get_peft_model(model, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                     use_gradient_checkpointing=mode, random_state=config.seed)
    n_trainable, n_total = _params(model)
    steps = total_steps(config, len(dataset))

    from .progress import ProgressCallback, peak_memory_bytes

    progress = ProgressCallback(device, enabled=config.progress)
    args = _sft_config(config, out, steps, lr, dtype_name, device, eval_ds is not None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[progress])
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgress)
    n_patched = len(sloth.patched_modules(trainer.model))
    log(f"sloth finetune: {config.model or 'bundled tiny Llama'} ({n_total / 1e6:.2f} M params, "
        f"{n_trainable / 1e6:.3f} M trainable, {config.method}, {n_patched} sloth kernels) on {len(dataset)} "
        f"examples, {steps} steps of {config.batch_size} x {config.grad_accum}, {device.type} {dtype_name}")

    interrupted = False
    resume = None if config.resume is None else (True if config.resume == "auto" else config.resume)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
        log(f"sloth finetune: interrupted after {trainer.state.global_step} of {steps} steps; saving what was "
            f"trained so far")
    except ValueError as e:
        if resume is not None and "checkpoint" in str(e).lower():
            raise FinetuneError(f"--resume: {str(e).splitlines()[0]}") from None
        raise
    wall = time.perf_counter() - t0
    ckpt = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt) and not os.path.islink(ckpt) and not os.listdir(ckpt):
        os.rmdir(ckpt)  # the Trainer creates its output folder even when it saves no checkpoint
    model = trainer.model
    model.eval()
    losses = [v for _, v in progress.losses]
    tail = losses[-max(1, len(losses) // 10):]
    summary = {
        "steps": int(trainer.state.global_step),
        "planned_steps": steps,
        "interrupted": interrupted,
        "initial_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean_last_10pct": sum(tail) / len(tail) if losses else None,
        "losses": losses,
        "eval_losses": [v for _, v in progress.eval_losses],
        "tokens": progress.tokens,
        "tokens_per_s": progress.tokens / wall if wall > 0 else 0.0,
        "wall_time_s": wall,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": dtype_name,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "examples": len(dataset),
        "skipped_rows": skipped,
        "lr": lr,
        "sloth_patched_modules": n_patched,
        "gradient_checkpointing": str(mode),
        "base_model": os.path.abspath(model_path) if config.model is None else model_path,
        "config": config.to_dict(),
    }
    title = f"{os.path.basename(os.path.normpath(config.model)) if config.model else 'bundled tiny Llama'}: " \
            f"{config.method}, r={config.r}" if config.method != "full" else \
            f"{config.model or 'bundled tiny Llama'}: full fine-tuning"
    with sigint_deferred(log):
        save_outputs(out, model, tokenizer, summary, progress, title, log)
    if config.exports and not interrupted:
        from .export import run_exports

        try:
            with sigint_deferred(log):
                summary["exports"] = run_exports(config.exports, model, tokenizer, out, log)
        except (ValueError, OSError) as e:
            raise FinetuneError(f"export failed ({e}); the adapter and summary are saved in {out}") from None
        atomic_write(inside(out, "summary.json"), (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return FinetuneResult(model=model, tokenizer=tokenizer, summary=summary, output_dir=out, trainer=trainer)


def bundled_model_path_for(out: str) -> str:
    """The bundled model's folder inside ``out`` (built on first use)."""
    from .model import bundled_model_path

    return bundled_model_path(inside(out, "bundled"), bundled_data_path(), BUNDLED_SEED)


def save_outputs(out: str, model, tokenizer, summary: dict, progress, title: str, log) -> None:
    """The adapter (the whole model for full fine-tuning) and tokenizer, ``loss.csv`` / ``loss.png`` and
    ``summary.json``, each written atomically into ``out``."""
    from .plot import write_loss_outputs

    def save(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_into(out, save)
    drawn = write_loss_outputs(inside(out, "loss.csv"), inside(out, "loss.png"), progress.losses, title,
                               progress.eval_losses)
    summary["loss_plot"] = "loss.png" if drawn else None
    if not drawn:
        log("sloth finetune: matplotlib is not installed, so no loss.png (the losses are in loss.csv); "
            "pip install matplotlib for the plot")
    atomic_write(inside(out, "summary.json"), (json.dumps(summary, indent=2, default=str) + "\n").encode())
