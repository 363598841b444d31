"""The fine-tuning loop of `sloth finetune`: LoRA / QLoRA / full, sloth's fused loss, AdamW, exact gradient
accumulation, a progress bar, and outputs saved at the end or on Ctrl-C."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import List, Optional

import torch

from .config import FinetuneConfig
from .data import bundled_data_path, prepare_data
from .export import check_exports, run_exports
from .loading import check_causal_lm, load_model, load_tokenizer, make_trainable, read_chat_template
from .loss import count_items, sloth_loss
from .model import bundled_model_path
from .outputs import save_outputs
from .precision import resolve_device, resolve_dtype
from .progress import Progress, peak_memory_bytes
from .tokenizer import bundled_tokenizer

BUNDLED_SEED = 0  # the bundled model's weights do not depend on --seed


@dataclasses.dataclass
class FinetuneResult:
    """What a run leaves: the trained model (in memory), its tokenizer, the summary written to summary.json."""

    model: torch.nn.Module
    tokenizer: object
    summary: dict
    output_dir: str


def _lr_lambda(warmup: int, total: int):
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10% at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def total_steps(config: FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps of the run: ``steps``, else ``epochs`` over the data, else the default."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * n_examples / (config.batch_size * config.grad_accum)))
    return FinetuneConfig.DEFAULT_STEPS


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, micro_batches: List[dict], compute_dtype: torch.dtype, scaler=None) -> float:
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate in .grad);
    each micro-batch's loss is divided by the unmasked tokens of all of them, so the accumulated gradient is
    that of one batch of all the micro-batches. Returns the step's loss (mean over its tokens)."""
    n_items = sum(count_items(b["labels"]) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = sloth_loss(model, b, n_items, compute_dtype)  # 0-d fp32
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    return total


def quiet_libraries() -> None:
    """Silence the progress bars and advisory warnings of transformers / peft / datasets (ours is the only bar)."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")


def finetune(config: FinetuneConfig, log=None) -> FinetuneResult:
    """Run a fine-tune as ``config`` says and write its outputs to ``config.output_dir``; returns the result.
    Ctrl-C stops training, saves what was trained so far and returns (``summary["interrupted"]`` is True)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config.validate()
    quiet_libraries()
    device = resolve_device(config.device)
    compute_dtype, dtype_name = resolve_dtype(config.dtype, device)
    if config.method == "qlora" and device.type != "cuda":
        from .errors import FinetuneError

        raise FinetuneError("--method qlora needs a CUDA GPU (and bitsandbytes); use --method lora on the CPU")
    out = config.output_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        from .errors import FinetuneError

        raise FinetuneError(f"cannot create --output-dir {out!r} ({e.strerror}); pick a writable directory") from None
    template = read_chat_template(config.chat_template)

    if config.model is None:
        tokenizer = bundled_tokenizer(os.path.join(out, "bundled", "tokenizer"), bundled_data_path())
        if template is not None:
            tokenizer.chat_template = template
        model_path = bundled_model_path(os.path.join(out, "bundled", "model"), tokenizer, BUNDLED_SEED)
        lr = config.lr or 2e-3
    else:
        check_causal_lm(config.model)
        tokenizer = load_tokenizer(config.model, template)
        model_path = config.model
        lr = config.lr or 2e-4
    if config.exports:
        check_exports(config.exports, model_path)  # before training, not after

    torch.manual_seed(config.seed)
    data = prepare_data(tokenizer, config)
    model = load_model(model_path, config.method, compute_dtype, device)
    model = make_trainable(model, config.method, config.r, config.lora_alpha, config.lora_dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    steps = total_steps(config, len(data))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(config.warmup_steps, steps // 10), steps))
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"sloth finetune: {config.model or 'bundled tiny Llama'} ({n_total / 1e6:.2f} M params, "
        f"{n_trainable / 1e6:.3f} M trainable, {config.method}) on {len(data)} examples, {steps} steps of "
        f"{config.batch_size} x {config.grad_accum}, {device.type} {dtype_name}")

    batches = data.batches(config.batch_size, config.seed, tokenizer.pad_token_id)
    progress = Progress(steps, device, enabled=config.progress)
    losses: List[float] = []
    tokens = 0
    interrupted = False
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            ts = time.perf_counter()
            micro = [_to(next(batches), device) for _ in range(config.grad_accum)]
            step_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            loss = train_step(model, micro, compute_dtype, scaler)
            if scaler is not None:
                scaler.unscale_(opt)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens += step_tokens
            progress.update(step + 1, loss, step_tokens / max(time.perf_counter() - ts, 1e-9))
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
        opt.zero_grad(set_to_none=True)
        log(f"sloth finetune: interrupted after {len(losses)} of {steps} steps; saving what was trained so far")
    wall = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    summary = {
        "steps": len(losses),
        "planned_steps": steps,
        "interrupted": interrupted,
        "initial_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean_last_10pct": sum(tail) / len(tail) if losses else None,
        "losses": losses,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "wall_time_s": wall,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": dtype_name,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "examples": len(data),
        "lr": lr,
        "base_model": os.path.abspath(model_path) if config.model is None else model_path,
        "config": config.to_dict(),
    }
    if config.exports:
        try:
            summary["exports"] = run_exports(config.exports, model, tokenizer, out, log)
        except (ValueError, OSError) as e:
            from .errors import FinetuneError

            save_outputs(out, model, tokenizer, summary)
            raise FinetuneError(f"export failed ({e}); the adapter and summary are saved in {out}") from None
    save_outputs(out, model, tokenizer, summary)
    return FinetuneResult(model=model, tokenizer=tokenizer, summary=summary, output_dir=out)
