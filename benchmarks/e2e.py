"""End-to-end QLoRA training steps: HF + PEFT + bitsandbytes vs the same model patched by sloth, in one run.

Builds a random-weight model of the real configuration on the device (no download), quantizes every decoder
linear layer to bitsandbytes NF4 with double quantization, adds LoRA (r = 32, alpha = 32 on q, k, v, o, gate,
up, down) with PEFT, and times full optimizer steps (forward, backward with gradient checkpointing, AdamW on
the LoRA weights, fused on CUDA as the Trainer's default) on the same random token batch: first unpatched, then
with ``sloth.patch`` applied to the same model, restarted from the same LoRA initialization and optimizer state.
Reports the median step time after warm-up, the peak memory of the steps (``torch.cuda.max_memory_allocated``,
and ``max_memory_reserved``, which includes the CUDA graph pools) and the per-step losses of both.

    python benchmarks/e2e.py                                  # Llama-3.1-8B config, seq 2048, batch 2
    python benchmarks/e2e.py --config qwen3-8b
    python benchmarks/e2e.py --config gemma-3-12b
    python benchmarks/e2e.py --seq 8192 --batch 1
    python benchmarks/e2e.py --sides sloth-offload,sloth-offload-graphs,sloth-offload-save,sloth-offload-eager  # A/B
    python benchmarks/e2e.py --config tiny --device cpu --steps 2 --warmup 1 --seq 64   # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

CONFIGS = {
    "llama-3.1-8b": dict(
        family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    "qwen3-8b": dict(
        family="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False),
    "gemma-3-12b": dict(
        family="gemma3", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=1024, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0), hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True),
    "tiny": dict(
        family="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def build_model(name, device: str, dtype: torch.dtype, **overrides):
    """A random-weight *ForCausalLM of configuration ``name`` (a key of ``CONFIGS``, or a dict of the same form) on
    ``device`` in ``dtype``; ``overrides`` replace config fields (e.g. ``num_hidden_layers=4``, token ids)."""
    import transformers

    cfg = dict(CONFIGS[name] if isinstance(name, str) else name)
    cfg.update(overrides)
    family = cfg.pop("family")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    config = config_cls(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model


def quantize_nf4(model, dtype: torch.dtype) -> None:
    """Replace every decoder linear layer by a bitsandbytes Linear4bit (NF4, double quantization, blocksize 64),
    as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
    produces; embeddings, norms and lm_head stay in ``dtype``."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                device = lin.weight.device
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(device)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_lora(model, r: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                          bias="none", task_type="CAUSAL_LM"))
    dtype = model.get_input_embeddings().weight.dtype
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)  # LoRA weights in the compute dtype, as Unsloth / TRL recipes run them
    return pm


def build_qlora(name, device: str, dtype: torch.dtype, rank: int, alpha: int, **overrides):
    """``build_model`` + ``quantize_nf4`` + ``add_lora``, ready to train: the embeddings' output requires grad,
    no KV cache, train mode."""
    model = build_model(name, device, dtype, **overrides)
    quantize_nf4(model, dtype)
    pm = add_lora(model, rank, alpha)
    pm.enable_input_require_grads()
    pm.config.use_cache = False
    pm.train()
    return pm


_SAVE_ATTENTION_DEFAULT = []  # [saved_attention.ENABLED as the environment set it]


def apply_side(pm, side: str) -> None:
    """Put ``pm`` on ``side``: ``hf`` (unpatched, Transformers' checkpointing), ``sloth`` (``sloth.patch``,
    Transformers' checkpointing), ``sloth-offload`` (``sloth.patch``, offloaded checkpointing),
    ``sloth-offload-eager`` (the same without the layers' CUDA graphs or saved attention, for A/B),
    ``sloth-offload-graphs`` (graphs without saved attention) or ``sloth-offload-save`` (saved attention,
    :mod:`sloth.runtime.saved_attention`, without graphs)."""
    import sloth
    from sloth.runtime import layer_graphs, saved_attention

    if not _SAVE_ATTENTION_DEFAULT:
        _SAVE_ATTENTION_DEFAULT.append(saved_attention.ENABLED)
    layer_graphs.clear()
    layer_graphs.ENABLED = side not in ("sloth-offload-eager", "sloth-offload-save")
    saved_attention.ENABLED = side == "sloth-offload-save" or (
        _SAVE_ATTENTION_DEFAULT[0] and side not in ("sloth-offload-eager", "sloth-offload-graphs"))
    if side.startswith("sloth"):
        sloth.patch(pm)
    else:
        sloth.unpatch(pm)  # nothing to undo unless a sloth side ran before
    sloth.set_gradient_checkpointing(pm, "sloth" if side.startswith("sloth-offload") else True)


def make_optimizer(pm, device: str, lr: float = 0.0):
    """AdamW on the trainable (LoRA) parameters; fused on CUDA, as the Transformers Trainer's default optimizer
    (``adamw_torch_fused`` with torch >= 2.8): the foreach version costs ~11 ms of launches per 8B step."""
    params = [p for p in pm.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.startswith("cuda"))


def run_steps(pm, batch, steps: int, warmup: int, device: str, lr: float = 2e-4):
    """(losses, step times in s, peak GiB allocated, peak GiB reserved) of warmup + steps AdamW steps on ``batch``.
    Reserved includes memory the caching allocator holds but has not handed out, such as CUDA graph pools."""
    opt = make_optimizer(pm, device, lr)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = pm(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        del out
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / GIB if cuda else float("nan")
    del opt
    return losses, times[warmup:], peak, reserved


def print_phases(pm, batch, device, steps: int, side: str) -> None:
    """``steps`` more training steps timed phase by phase: for the forward (with the loss), the backward and the
    optimizer step, the host time to issue the work and the wall time until the GPU has finished it. Where the two
    are about equal the phase is CPU-bound (the GPU waits for launches); where the wall time is larger, GPU-bound."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = make_optimizer(pm, device)
    rows = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = pm(input_ids=batch, labels=batch).loss
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        sync()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        sync()
        t6 = time.perf_counter()
        rows.append((t1 - t0, t2 - t0, t3 - t2, t4 - t2, t5 - t4, t6 - t4))
    med = [statistics.median(r[i] for r in rows) * 1e3 for i in range(6)]
    print(f"--- phases of {side} (median of {steps} steps, ms: host issue / wall): forward {med[0]:.1f} / {med[1]:.1f}, "
          f"backward {med[2]:.1f} / {med[3]:.1f}, optimizer {med[4]:.1f} / {med[5]:.1f}")


def print_profile(pm, batch, device, rows: int, side: str) -> None:
    """One more training step under torch.profiler: the ``rows`` ops with the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    opt = make_optimizer(pm, device)
    with profile(activities=acts, record_shapes=True) as prof:
        pm(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"--- profile of one {side} step (by {key})")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
    print("--- the same step by op and input shapes")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40,
                                                             max_shapes_column_width=70))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sides", default="hf,sloth,sloth-offload",
                    help="comma-separated: hf (unpatched), sloth (patched, Transformers' checkpointing), "
                         "sloth-offload (patched, use_gradient_checkpointing='sloth'), sloth-offload-eager (the same "
                         "without the layers' CUDA graphs or saved attention), sloth-offload-graphs (graphs only), "
                         "sloth-offload-save (saved attention only)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after each side's timed steps, profile one more step and print its ROWS costliest ops")
    ap.add_argument("--phases", type=int, default=0, metavar="STEPS",
                    help="after each side's timed steps, time STEPS more phase by phase (host issue vs wall time)")
    args = ap.parse_args(argv)

    import sloth
    import sloth.runtime.allocator

    dtype = torch.bfloat16
    pm = build_qlora(args.config, args.device, dtype, args.rank, args.alpha)
    init = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    g = torch.Generator(device="cpu").manual_seed(2)
    batch = torch.randint(0, pm.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    ntok = args.batch * args.seq
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        print(f"device: {torch.cuda.get_device_name()}; model memory {torch.cuda.memory_allocated() / GIB:.2f} GiB")

    results = {}
    for side in args.sides.split(","):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n in init:
                    p.copy_(init[n])
        apply_side(pm, side)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # reserved memory of the previous side does not count for this one
        losses, times, peak, reserved = run_steps(pm, batch, args.steps, args.warmup, args.device)
        if args.phases:
            print_phases(pm, batch, args.device, args.phases, side)
        if args.profile:
            print_profile(pm, batch, args.device, args.profile, side)
        med = statistics.median(times)
        expandable = bool(sloth.runtime.allocator._applied)  # (sloth's checkpointing turns it on; it stays on for later sides)
        if side.startswith("sloth-offload"):
            from sloth.runtime import layer_graphs

            print(f"{side}: {layer_graphs.graph_count()} layer forward graphs, "
                  f"{layer_graphs.graph_count(backward=True)} backward graphs, expandable segments {expandable}")
        results[side] = dict(s_per_step=med, peak_gib=peak, reserved_gib=reserved, tokens_per_s=ntok / med,
                             losses=losses, expandable_segments=expandable)
        print(f"{side:14s} {med:8.3f} s/step  {peak:7.2f} GiB peak ({reserved:.2f} reserved)  {ntok / med:9.0f} tok/s  "
              f"losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
    for side in [x for x in results if x != "hf"]:
        if "hf" not in results:
            break
        h, s = results["hf"], results[side]
        diff = max(abs(a - b) for a, b in zip(h["losses"], s["losses"]))
        print(f"{side} vs hf: {h['s_per_step'] / s['s_per_step']:.2f}x speed, "
              f"{s['peak_gib'] - h['peak_gib']:+.2f} GiB, max |loss diff| {diff:.4f}")
        s["max_loss_diff_vs_hf"] = diff
    results["workload"] = vars(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
