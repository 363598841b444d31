"""GRPO steps with TRL's GRPOTrainer: plain PEFT + bitsandbytes QLoRA vs the same model on sloth, in one run.

Issue 6's RL number: peak memory and step time of a GRPO step (Qwen3-4B configuration, 8 generations of 256 tokens
per prompt, QLoRA) with sloth against TRL on plain PEFT + bitsandbytes; goal: at least 50% less peak memory and 2x
the step speed.

Each side builds its own random-weight model of the real configuration on the device (no download; the same seed,
so the same weights), quantizes every decoder linear layer to bitsandbytes NF4 with double quantization
(``e2e.quantize_nf4``), adds LoRA (r = 16, alpha = 16 on q, k, v, o, gate, up, down; the same initialization on
every side) and trains it with ``trl.GRPOTrainer`` (TRL's own generation through ``model.generate``, no vLLM; on the
sloth sides ``sloth.patch`` makes that graph-captured decoding, ``sloth.integrations.generation``;
bf16; gradient checkpointing; beta = 0, TRL's default, so no reference model) on the same prompts:

- ``hf``: the plain PeftModel, TRL's code paths as they are.
- ``sloth``: ``sloth.patch(peft_model)`` before building the trainer (README, "TRL"): sloth's norms, LoRA kernels
  and fused log-prob head; Transformers' checkpointing.
- ``sloth-offload``: ``sloth.get_peft_model(model, ...)`` (README, "Fine-tuning from Python"): the same, with
  sloth's offloaded checkpointing (its default).

One optimizer step = ``--prompts-per-step`` prompts x ``--num-generations`` completions of exactly
``--completion-length`` tokens (EOS is suppressed with ``min_new_tokens``; checked), generated in one batch and
trained in micro-batches of ``--batch-size``. Timed from the trainer's ``on_step_begin`` to ``on_step_end``
(generation, scoring, forward + backward of every micro-batch, optimizer step), CUDA synchronized; the first
``--warmup`` steps are not timed. Peak memory: ``torch.cuda.max_memory_allocated`` over all steps of a side, above
what was allocated before that side built its model (weights included); sides are separated by deleting the
trainer and model, ``gc.collect()`` and ``torch.cuda.empty_cache()``.

The tokenizer is built on the fly (no download): one word-level token per model id (``t<id>``, ids 0-2 are
pad / bos / eos), so every id the model can sample decodes, and prompts of ``--prompt-length`` random tokens
tokenize to exactly that many ids.

    python benchmarks/grpo.py                                   # Qwen3-4B config, 2 prompts x 8 x 256 tokens
    python benchmarks/grpo.py --sides hf,sloth --json grpo.json
    python benchmarks/grpo.py --config tiny --device cpu --steps 1 --completion-length 8 --num-generations 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from e2e import GIB, TARGETS, add_lora, quantize_nf4  # noqa: E402
from e2e import build_model as _build_model  # noqa: E402

CONFIGS = {
    # Qwen/Qwen3-4B config.json
    "qwen3-4b": dict(
        family="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(
        family="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True),
}
SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
SIDES = ("hf", "sloth", "sloth-offload")
LORA_SEED = 1


def build_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids: the specials, then ``t<id>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2])
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def prompt_dataset(tok, n: int, length: int, seed: int = 0):
    """``n`` plain-text prompts of ``length`` random non-special tokens each."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), len(tok), (n, length), generator=g)
    rows = [{"prompt": " ".join(f"t{i}" for i in row.tolist())} for row in ids]
    assert len(tok(rows[0]["prompt"])["input_ids"]) == length
    return Dataset.from_list(rows)


def reward_len(completions, **kwargs):
    """A trivial reward: the length of the decoded completion."""
    return [float(len(c)) for c in completions]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _clock_callback(cuda: bool):
    """A TrainerCallback recording the wall time and the peak memory of each optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.peaks, self.reserved = [], [], []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(cuda)
            self.times.append(time.perf_counter() - self._t0)
            if cuda:
                self.peaks.append(torch.cuda.max_memory_allocated())
                self.reserved.append(torch.cuda.max_memory_reserved())

    return StepClock()


def _time_generation(trainer, cuda: bool, gen_times: list, lengths: list) -> None:
    """Wrap the trainer's ``_generate`` (on the instance; behaviour unchanged) to time it and record the completion
    lengths. Skipped where TRL has no such method."""
    orig = getattr(trainer, "_generate", None)
    if orig is None:
        return

    def timed(*a, **kw):
        _sync(cuda)
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        _sync(cuda)
        gen_times.append(time.perf_counter() - t0)
        try:
            lengths.extend(len(c) for c in out[1])  # (prompt_ids, completion_ids, ...)
        except (TypeError, IndexError):
            pass
        return out

    trainer._generate = timed


def make_policy(side: str, args, dtype: torch.dtype, tok):
    """The PeftModel of ``side`` on a freshly built, NF4-quantized model."""
    import sloth

    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = _build_model(CONFIGS[args.config], args.device, dtype, **ids)
    quantize_nf4(model, dtype)
    if side == "sloth-offload":
        pm = sloth.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, target_modules=list(TARGETS),
                                  random_state=LORA_SEED, use_gradient_checkpointing="sloth")
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)  # as add_lora (TRL casts them to bf16 for a 4-bit model anyway)
    else:
        pm = add_lora(model, args.rank, args.alpha)  # torch.manual_seed(LORA_SEED) inside: same init
        if side == "sloth":
            sloth.patch(pm)
    return pm


def run_side(side: str, args, tok, dataset) -> dict:
    import trl
    from transformers import PrinterCallback

    import sloth

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    _sync(cuda)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda and base > 0.1 * GIB:
        print(f"  warning: {base / GIB:.2f} GiB still allocated before {side} builds its model "
              "(peaks below are measured above it)")
    t_build = time.perf_counter()
    pm = make_policy(side, args, dtype, tok)
    lora_sum = sum(float(p.detach().float().abs().sum()) for n, p in pm.named_parameters() if "lora_A" in n)
    out_dir = tempfile.mkdtemp(prefix=f"grpo-bench-{side}-")
    total = args.prompts_per_step * args.num_generations
    config = trl.GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=total // args.batch_size, num_generations=args.num_generations,
        max_completion_length=args.completion_length, generation_kwargs={"min_new_tokens": args.completion_length},
        temperature=1.0, beta=args.beta, learning_rate=args.lr, bf16=args.dtype == "bf16",
        gradient_checkpointing=True, seed=0, use_cpu=not cuda, dataloader_num_workers=0)
    clock = _clock_callback(cuda)
    trainer = trl.GRPOTrainer(model=pm, reward_funcs=reward_len, args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts (kept in state.log_history)
    lm = pm.get_base_model()
    head = "sloth" if "_sloth_fused_head" in lm.__dict__ else "trl"
    n_patched = len(sloth.patched_modules(pm))
    expected_head = "trl" if side == "hf" else "sloth"
    if head != expected_head:
        print(f"  WARNING: side {side} runs with {head}'s fused LM head (expected {expected_head})")
    gen_times, lengths = [], []
    _time_generation(trainer, cuda, gen_times, lengths)
    _sync(cuda)
    model_gib = ((torch.cuda.memory_allocated() - base) / GIB) if cuda else float("nan")
    build_s = time.perf_counter() - t_build
    trainer.train()
    _sync(cuda)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    grad_norms = [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    n_steps = args.warmup + args.steps
    times = clock.times[args.warmup:]
    gen = gen_times[args.warmup:] if len(gen_times) == n_steps else gen_times
    res = dict(
        s_per_step=statistics.median(times) if times else float("nan"),
        step_times=clock.times,
        gen_s_per_step=statistics.median(gen) if gen else float("nan"),
        gen_times=gen_times,
        peak_gib=(max(clock.peaks) - base) / GIB if clock.peaks else float("nan"),
        peak_reserved_gib=max(clock.reserved) / GIB if clock.reserved else float("nan"),  # absolute
        step_peaks_gib=[(p - base) / GIB for p in clock.peaks],
        model_gib=model_gib,
        completion_len_min=min(lengths) if lengths else None,
        completion_len_max=max(lengths) if lengths else None,
        completions=len(lengths),
        losses=losses,
        grad_norms=grad_norms,
        head=head,
        sloth_replacements=n_patched,
        lora_A_abs_sum=lora_sum,
        build_s=build_s,
    )
    if lengths and (res["completion_len_min"] != args.completion_length or
                    res["completion_len_max"] != args.completion_length):
        print(f"  WARNING: completion lengths {res['completion_len_min']}..{res['completion_len_max']}, "
              f"expected {args.completion_length}")

    # nothing of this side may stay alive into the next one
    trainer.accelerator.free_memory()
    del trainer, pm, lm, clock, config
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="qwen3-4b", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="model / compute dtype (bf16 = TRL's bf16 mixed precision)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, in order: {', '.join(SIDES)}")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--prompts-per-step", type=int, default=2,
                    help="prompts per optimizer step (each with --num-generations completions)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="per_device_train_batch_size (micro-batch); default --num-generations, i.e. "
                         "--prompts-per-step micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's default 0: no reference)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = args.num_generations
    total = args.prompts_per_step * args.num_generations
    if total % args.batch_size:
        ap.error(f"--batch-size {args.batch_size} must divide --prompts-per-step x --num-generations = {total}")
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown side(s) {unknown}; expected some of {', '.join(SIDES)}")
    if args.num_generations < 2:
        ap.error("GRPO needs --num-generations >= 2")

    import peft
    import transformers
    import trl

    import sloth

    cuda = args.device.startswith("cuda")
    warnings.filterwarnings("ignore", category=FutureWarning)  # Transformers' checkpointing renames
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: OpenMP threads on shared cores only stall each other
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"peft {peft.__version__}, bitsandbytes {_version('bitsandbytes')}, sloth {sloth.__version__}")
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}")
    cfg = CONFIGS[args.config]
    tok = build_tokenizer(cfg["vocab_size"])
    n_prompts = args.prompts_per_step * (args.warmup + args.steps)
    dataset = prompt_dataset(tok, n_prompts, args.prompt_length)
    print(f"workload: {args.config}, {args.prompts_per_step} prompts x {args.num_generations} generations x "
          f"{args.completion_length} tokens per step (prompts {args.prompt_length} tokens), micro-batch "
          f"{args.batch_size} x {total // args.batch_size}, LoRA r={args.rank} alpha={args.alpha}, {args.dtype}, "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)

    results = {}
    for side in sides:
        print(f"{side}: building the model and the trainer ...", flush=True)
        try:
            r = run_side(side, args, tok, dataset)
        except Exception as e:  # noqa: BLE001 - report it and go on with the next side
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        if "error" in r:  # the failed side's model and trainer died with the traceback
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            results[side] = r
            print(f"{side:14s} FAILED: {r['error']}", flush=True)
            continue
        results[side] = r
        if args.json:  # after every side: a run cut short keeps what it measured
            _dump(args.json, results, args)
        print(f"{side:14s} {r['s_per_step']:8.3f} s/step (generation {r['gen_s_per_step']:7.3f} s)  "
              f"{r['peak_gib']:7.2f} GiB peak ({r['model_gib']:.2f} GiB model)  head {r['head']:5s}  "
              f"completions {r['completions']} x {r['completion_len_min']}..{r['completion_len_max']} tokens  "
              f"grad norms {' '.join(f'{x:.4f}' for x in r['grad_norms'])}", flush=True)
    if "error" not in results.get("hf", {"error": None}):
        h = results["hf"]
        for side in [s for s in results if s != "hf" and "error" not in results[s]]:
            s = results[side]
            speed = h["s_per_step"] / s["s_per_step"]
            mem = (1 - s["peak_gib"] / h["peak_gib"]) * 100 if cuda else float("nan")
            s["speedup_vs_hf"], s["peak_reduction_pct_vs_hf"] = speed, mem
            print(f"{side} vs hf: {speed:.2f}x step speed (goal >= 2x), {mem:.0f}% less peak memory (goal >= 50%), "
                  f"generation {h['gen_s_per_step'] / s['gen_s_per_step']:.2f}x")
    if args.json:
        _dump(args.json, results, args)
    return results


def _dump(path: str, results: dict, args) -> None:
    import peft
    import transformers
    import trl

    import sloth

    out = dict(results, workload=vars(args), versions=dict(
        torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__,
        bitsandbytes=_version("bitsandbytes"), sloth=sloth.__version__,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return "?"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
