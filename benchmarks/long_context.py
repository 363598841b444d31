"""Longest sequence that trains: one QLoRA training step at batch 1, searched over the sequence length.

Issue 5's number: "Long context, same model (Llama-3.1-8B config), batch 1, QLoRA r = 32, H100 80 GB: report the
longest sequence that trains; goal at least 400,000 tokens."

Builds the model once (``e2e.build_qlora``: random weights of the real configuration on the device, every decoder
linear layer in bitsandbytes NF4 with double quantization, PEFT LoRA r = 32 / alpha = 32 on q, k, v, o, gate, up,
down), then for each side (``e2e.apply_side``: ``hf`` unpatched, ``sloth`` patched with Transformers'
checkpointing, ``sloth-offload`` patched with sloth's offloaded checkpointing; LoRA weights restored to the same
initialization and a fresh AdamW per side) runs trials of one full training step (forward, backward, AdamW step)
on a random ``[1, T]`` batch:

- search: T doubles from ``--start`` until a trial fails (CUDA OOM, or over its time limit) or ``--max-len`` is
  reached, then bisects between the longest success and the shortest failure down to ``--granularity`` tokens;
  ``--lengths`` runs a fixed list instead.
- every trial starts from freed memory (gradients dropped, ``gc.collect()``, ``torch.cuda.empty_cache()``, cached
  pinned host blocks released) and reports its status, step time, peak device memory
  (``torch.cuda.max_memory_allocated``) and peak pinned host memory (sloth-offload keeps each layer's input there).
- time: a trial is stopped once it runs over ``--max-step-seconds`` (checked before every attention / MLP call,
  recomputations in the backward included); a length predicted (from the trials so far) to need well over the
  time left is not tried; the whole run of a side stays within its share of ``--budget-seconds``. Long steps are
  slow (attention is O(T^2)): on an H100 a full-depth Llama-3.1-8B step at 400k tokens takes ~10 minutes, so
  ``--layers N`` builds the same model with N decoder layers (each layer's working set, which sets the peak, is
  the same) and adds an estimate of the full-depth peak (per-layer weights, LoRA state and, without offload, the
  per-layer checkpoints) to the table.

On the CPU nothing runs out of memory: the search just stops at ``--max-len``.

    python benchmarks/long_context.py --side sloth-offload                       # full depth, doubling from 16k
    python benchmarks/long_context.py --side sloth-offload --layers 4 --lengths 262144,409600
    python benchmarks/long_context.py --lengths 409600 --max-step-seconds 560 --progress 16   # full depth, one step
    python benchmarks/long_context.py --side hf,sloth --start 8192 --budget-seconds 400
    python benchmarks/long_context.py --device-memory-gib 79.2 ...       # an H100 80 GB's memory on a larger GPU
    python benchmarks/long_context.py --config tiny --device cpu --start 64 --max-len 512      # smoke test, no GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from e2e import CONFIGS, GIB, apply_side, build_qlora  # noqa: E402

SIDES = ("hf", "sloth", "sloth-offload")
FATAL = ("illegal memory access", "device-side assert", "CUDA error: an illegal", "CUBLAS_STATUS_EXECUTION_FAILED",
         "unspecified launch failure", "misaligned address")


OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class StepTimeout(Exception):
    """Raised inside the model when a trial runs over its time limit."""


class Watchdog:
    """Forward pre-hook on every attention and MLP module: raises :class:`StepTimeout` once the trial is past its
    deadline (and, for testing, a fake CUDA OOM above ``fake_oom_above`` tokens)."""

    def __init__(self, fake_oom_above=None, progress: int = 0):
        self.deadline = math.inf
        self.fired = False
        self.length = 0
        self.fake_oom_above = fake_oom_above
        self.progress, self.calls, self.start = progress, 0, 0.0  # progress: print every this many calls (0: never)

    def arm(self, seconds: float, length: int) -> None:
        self.deadline, self.fired, self.length = time.perf_counter() + seconds, False, length
        self.calls, self.start = 0, time.perf_counter()

    def disarm(self) -> None:
        self.deadline = math.inf

    def __call__(self, module, args):
        if self.fake_oom_above is not None and self.length > self.fake_oom_above:
            raise OOM(f"fake out of memory above {self.fake_oom_above} tokens (--fake-oom-above)")
        if time.perf_counter() > self.deadline:
            self.fired = True
            raise StepTimeout("over the trial's time limit")
        self.calls += 1
        if self.progress and self.calls % self.progress == 0:  # (a step cut off by a time limit still tells)
            peak = f", peak {_safe(lambda: torch.cuda.max_memory_allocated() / GIB):.2f} GiB" \
                if torch.cuda.is_available() else ""
            print(f"    {self.length} tokens: {self.calls} attention / MLP calls (forward and recompute) after "
                  f"{time.perf_counter() - self.start:.0f} s{peak}", flush=True)


def _free(cuda: bool) -> None:
    """Best effort (after a sticky CUDA error nothing more can run, and the results must still be printed)."""
    gc.collect()
    if cuda:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            host_empty = getattr(torch._C, "_host_emptyCache", None)
            if host_empty is not None:
                host_empty()
        except Exception:
            pass


def _safe(fn, default=float("nan")):
    try:
        return fn()
    except Exception:
        return default


def _arena():
    """sloth's pinned arena of offloaded checkpoints where ``SLOTH_PINNED_ARENA=1``, else None."""
    from sloth.runtime import pinned_arena

    return pinned_arena.arena()


def _host_pinned_peak() -> float:
    """Peak bytes of pinned host memory since the last reset: torch's pinned allocator's plus sloth's pinned arena's
    (``SLOTH_PINNED_ARENA=1``), NaN where torch does not report its own."""
    arena = _arena()
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        torch_peak = float(stats().get("allocated_bytes.peak", float("nan"))) if stats else float("nan")
    except Exception:
        torch_peak = float("nan")
    return torch_peak + (arena.peak_bytes if arena is not None else 0)


def _reset_host_peak() -> None:
    arena = _arena()
    if arena is not None:
        arena.reset_peak()
    reset = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if reset is not None:
        try:
            reset()
        except Exception:
            pass


def _one_step(pm, opt, length: int, vocab: int, device: str) -> float:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), generator=g).to(device)
    out = pm(input_ids=ids, labels=ids)
    loss = out.loss
    del out
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _classify(e: BaseException, watchdog: Watchdog) -> str:
    msg = str(e)
    if watchdog.fired or isinstance(e, StepTimeout):
        return "timeout"
    if isinstance(e, OOM) or "out of memory" in msg.lower() or "ALLOC_FAILED" in msg:
        return "oom"
    return "error"


def run_trial(pm, opt, length: int, limit_s: float, watchdog: Watchdog, device: str, vocab: int) -> dict:
    """One training step at ``length`` tokens, with memory freed before and after; never raises on OOM / timeout."""
    cuda = device.startswith("cuda")
    _free(cuda)
    if cuda:
        _safe(torch.cuda.reset_peak_memory_stats, None)
        _reset_host_peak()
    status, note, loss = "ok", "", float("nan")
    watchdog.arm(limit_s, length)
    t0 = time.perf_counter()
    try:
        loss = _one_step(pm, opt, length, vocab, device)
        if cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - classified below; the traceback (and the step's tensors) die here
        status = _classify(e, watchdog)
        note = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"
    finally:
        watchdog.disarm()
    if cuda:
        try:
            torch.cuda.synchronize()
        except Exception as e:  # a sticky CUDA error: nothing more can run
            status, note = "error", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"
    seconds = time.perf_counter() - t0
    peak = _safe(lambda: torch.cuda.max_memory_allocated() / GIB) if cuda else float("nan")
    reserved = _safe(lambda: torch.cuda.max_memory_reserved() / GIB) if cuda else float("nan")
    host = _host_pinned_peak() / GIB if cuda else float("nan")
    _safe(lambda: opt.zero_grad(set_to_none=True), None)
    _free(cuda)
    if status == "ok" and not math.isfinite(loss):
        note = "non-finite loss"
    return dict(length=length, status=status, seconds=seconds, peak_gib=peak, reserved_gib=reserved,
                host_pinned_gib=host, loss=loss, note=note)


def _fatal(r: dict) -> bool:
    return r["status"] == "error" and any(s in r["note"] for s in FATAL)


class Predictor:
    """Step time as a + b*T + c*T^2 fitted to the successful trials (c only: conservative with one point)."""

    def __init__(self):
        self.points = []  # (T, seconds)

    def add(self, length: int, seconds: float) -> None:
        if seconds > 0.5:  # shorter steps say little about long ones
            self.points.append((length, seconds))

    def __call__(self, length: int):
        below = sorted(p for p in self.points if p[0] < length)
        if not below:
            return None
        if len(below) == 1:
            t0, s0 = below[-1]
            return s0 * (length / t0) ** 2
        (t1, s1), (t2, s2) = below[-2], below[-1]
        # s = b*T + c*T^2 through the two longest points below (a folded into b)
        det = t1 * t2 * t2 - t2 * t1 * t1
        b = (s1 * t2 * t2 - s2 * t1 * t1) / det
        c = (t1 * s2 - t2 * s1) / det
        if c < 0 or b < 0:
            return s2 * (length / t2) ** 2
        return b * length + c * length * length


def search(trial, start: int, max_len: int, granularity: int, deadline: float, max_step_s: float,
           lengths=None, min_trial_s: float = 2.0, side: str = ""):
    """Run trials (``trial(length, limit_s) -> dict``) and return (rows, longest ok, shortest failure or None,
    why the search stopped)."""
    rows = []
    lo, hi = 0, None
    predict = Predictor()
    stopped = ""

    def attempt(length):
        nonlocal stopped
        left = deadline - time.perf_counter()
        if left < min_trial_s:
            stopped = "budget"
            return None
        limit = min(max_step_s, left)
        pred = predict(length)
        if pred is not None and pred > 1.25 * limit:
            rows.append(dict(length=length, status="too-slow", seconds=float("nan"), peak_gib=float("nan"),
                             reserved_gib=float("nan"), host_pinned_gib=float("nan"), loss=float("nan"),
                             note=f"predicted {pred:.1f} s > limit {limit:.1f} s; not run", side=side))
            print(_row(rows[-1]), flush=True)
            if sum(r["status"] == "too-slow" for r in rows[-2:]) == 2:
                stopped = "time (two lengths predicted too slow in a row)"
                return None
            return "too-slow"
        r = trial(length, limit)
        rows.append(r)
        print(_row(r), flush=True)
        if r["status"] == "ok":
            predict.add(length, r["seconds"])
        if _fatal(r):
            stopped = "fatal error"
            return None
        return r["status"]

    if lengths:
        for length in lengths:
            st = attempt(length)
            if st is None:
                break
            if st == "ok":
                lo = max(lo, length)
            elif hi is None or length < hi:
                hi = length
        return rows, lo, hi, stopped or "lengths done"

    length = start
    while True:  # doubling
        length = min(length, max_len)
        st = attempt(length)
        if st is None:
            return rows, lo, hi, stopped
        if st != "ok":
            hi = length
            break
        lo = length
        if length >= max_len:
            return rows, lo, hi, "max-len"
        length *= 2
    while hi - lo > granularity:  # bisection
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            mid = lo + granularity
        if mid >= hi:
            break
        st = attempt(mid)
        if st is None:
            return rows, lo, hi, stopped
        if st == "ok":
            lo = mid
        else:
            hi = mid
    return rows, lo, hi, f"granularity {granularity}"


HEADER = (f"{'side':14s} {'length':>9s} {'status':>9s} {'step s':>8s} {'peak GiB':>9s} {'reserved':>9s} "
          f"{'pinned GiB':>10s} {'loss':>8s}")
EST_HEADER = f" {'full est.':>9s}"


def _row(r: dict, side: str = "") -> str:
    est = f" {r['est_full_peak_gib']:9.2f}" if "est_full_peak_gib" in r else ""
    return (f"{side or r.get('side', ''):14s} {r['length']:9d} {r['status']:>9s} {r['seconds']:8.2f} "
            f"{r['peak_gib']:9.2f} {r['reserved_gib']:9.2f} {r['host_pinned_gib']:10.2f} {r['loss']:8.4f}{est}"
            f"  {r['note']}")


def _param_bytes(module, pred=lambda n: True) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if pred(n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the configuration's); fewer gives a fast memory probe with an "
                         "estimate of the full-depth peak")
    ap.add_argument("--side", "--sides", dest="sides", default="sloth-offload",
                    help=f"comma-separated, in order: {', '.join(SIDES)}")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--start", type=int, default=16384, help="first length of the doubling search")
    ap.add_argument("--max-len", type=int, default=1 << 20, help="longest length tried")
    ap.add_argument("--granularity", type=int, default=4096, help="bisection stops at this many tokens "
                    "(at most --start)")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths to run instead of the search")
    ap.add_argument("--max-step-seconds", type=float, default=300.0, help="a trial is stopped after this long")
    ap.add_argument("--budget-seconds", type=float, default=400.0,
                    help="all trials of the run (split evenly over the sides), model build not included")
    ap.add_argument("--expandable-segments", action="store_true",
                    help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation)")
    ap.add_argument("--device-memory-gib", type=float, default=None,
                    help="cap the device memory this process may allocate (set_per_process_memory_fraction), e.g. "
                         "79.2 to stand in for an H100 80 GB on a larger GPU")
    ap.add_argument("--fake-oom-above", type=int, default=None,
                    help="testing: lengths above this raise a CUDA OOM inside the model (exercises the search on "
                         "the CPU)")
    ap.add_argument("--progress", type=int, default=0, metavar="CALLS",
                    help="print the elapsed time and peak memory every CALLS attention / MLP calls of a trial")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown side(s) {unknown}; expected some of {', '.join(SIDES)}")
    lengths = [int(x) for x in args.lengths.split(",") if x] if args.lengths else None
    granularity = max(1, min(args.granularity, args.start))
    if args.expandable_segments:  # read when CUDA's allocator first starts, i.e. before anything below
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(x for x in (conf, "expandable_segments:True") if x)

    import warnings

    import peft
    import transformers

    import sloth

    warnings.filterwarnings("ignore", category=FutureWarning)  # Transformers' checkpointing renames
    cuda = args.device.startswith("cuda")
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: OpenMP threads on shared cores only stall each other
    full_layers = CONFIGS[args.config]["num_hidden_layers"]
    layers = args.layers or full_layers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"sloth {sloth.__version__}")
    try:
        host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        host_gib = float("nan")
    dev_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else float("nan")
    dev_name = torch.cuda.get_device_name() if cuda else args.device
    if cuda and args.device_memory_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.device_memory_gib / dev_gib))
    if cuda:
        conf = {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if k in os.environ}
        print(f"device: {dev_name} ({dev_gib:.1f} GiB"
              f"{f', capped at {args.device_memory_gib:.1f} GiB' if args.device_memory_gib else ''}), "
              f"host memory {host_gib:.0f} GiB, allocator config {conf}")

    t_build = time.perf_counter()
    dtype = torch.bfloat16
    overrides = {"num_hidden_layers": layers} if args.layers else {}
    pm = build_qlora(args.config, args.device, dtype, args.rank, args.alpha, **overrides)
    lm = pm.get_base_model()
    vocab = pm.config.vocab_size
    hidden = pm.config.hidden_size
    if cuda:
        _free(cuda)
        static = torch.cuda.memory_allocated()
    else:
        static = 0
    outer = _param_bytes(lm, lambda n: ".layers." not in n)  # embeddings, final norm, lm_head
    lora_layer = _param_bytes(lm.model.layers[0], lambda n: "lora_" in n)
    per_layer_static = (static - outer) / layers if cuda else float("nan")  # NF4 weights + stats + LoRA
    print(f"model: {args.config}, {layers} of {full_layers} layers, QLoRA r={args.rank}, built in "
          f"{time.perf_counter() - t_build:.0f} s; {static / GIB:.2f} GiB allocated "
          f"({per_layer_static / 2**20:.0f} MiB per layer)", flush=True)
    init = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

    watchdog = Watchdog(args.fake_oom_above, args.progress)
    hooks = []
    for layer in lm.model.layers:
        hooks.append(layer.self_attn.register_forward_pre_hook(watchdog))
        hooks.append(layer.mlp.register_forward_pre_hook(watchdog))

    results, live = {}, []
    run_start = time.perf_counter()
    header = HEADER + (EST_HEADER if layers < full_layers else "")
    print(header, flush=True)
    for i, side in enumerate(sides):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n in init:
                    p.copy_(init[n])
        apply_side(pm, side)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
        left = args.budget_seconds - (time.perf_counter() - run_start)
        deadline = time.perf_counter() + left / (len(sides) - i)
        # warm-up (CUDA / cuBLAS / kernel initialization), not part of the search
        warm = run_trial(pm, opt, min(args.start, 1024), max(args.max_step_seconds, 60.0), watchdog, args.device,
                         vocab)
        print(_row(warm, side) + "  (warm-up)", flush=True)

        def trial(length, limit_s):
            r = run_trial(pm, opt, length, limit_s, watchdog, args.device, vocab)
            r["side"] = side
            if layers < full_layers:  # (NaN on the CPU)
                ckpt = 0 if side == "sloth-offload" else length * hidden * dtype.itemsize
                extra = (full_layers - layers) * (per_layer_static + 3 * lora_layer + ckpt)
                r["est_full_peak_gib"] = r["peak_gib"] + extra / GIB
                if side == "sloth-offload":
                    block = length * hidden * dtype.itemsize  # exact size in the pinned arena, else a power of 2
                    block = block if _arena() is not None else 1 << max(0, math.ceil(math.log2(block)))
                    r["est_full_host_pinned_gib"] = r["host_pinned_gib"] + (full_layers - layers) * block / GIB
            live.append(r)
            if args.json:  # after every trial: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(partial_trials=live, workload=vars(args)), f, indent=1, default=str)
            return r

        if _fatal(warm):
            rows, lo, hi, stopped = [warm], 0, None, "fatal error"
        else:
            rows, lo, hi, stopped = search(trial, args.start, args.max_len, granularity, deadline,
                                           args.max_step_seconds, lengths, side=side)
        ok = [r for r in rows if r["status"] == "ok" and r["length"] == lo]
        results[side] = dict(longest_ok=lo, shortest_failure=hi,
                             failure=next((r["status"] for r in rows if r["length"] == hi), None),
                             stopped_by=stopped, trials=rows, warmup=warm,
                             longest_ok_trial=ok[0] if ok else None)
        del opt
        _free(cuda)
        if stopped == "fatal error":
            print(f"{side}: fatal CUDA error, stopping the run: {rows[-1]['note']}")
            break

    for h in hooks:
        h.remove()

    print("\n" + header)
    for side, res in results.items():
        for r in res["trials"]:
            print(_row(r, side))
    print()
    for side, res in results.items():
        best = res["longest_ok_trial"]
        line = f"{side}: longest sequence that trains: {res['longest_ok']} tokens"
        if best is not None:
            line += f" ({best['seconds']:.1f} s/step, {best['peak_gib']:.2f} GiB peak"
            if "est_full_peak_gib" in best:
                line += f", est. {best['est_full_peak_gib']:.1f} GiB at {full_layers} layers"
            if "est_full_host_pinned_gib" in best:
                line += f", est. {best['est_full_host_pinned_gib']:.0f} GiB pinned host memory at {full_layers} layers"
            line += ")"
        if res["shortest_failure"] is not None:
            line += f"; {res['shortest_failure']} tokens: {res['failure']}"
        line += f"; search stopped by {res['stopped_by']}"
        if res["failure"] != "oom":
            line += " (no OOM bounds it: longer sequences may fit)"
        print(line)
    if layers < full_layers:
        print(f"note: {layers} of {full_layers} layers; est. full-depth peaks add the other layers' NF4 weights, "
              "LoRA weights / grads / AdamW state and (without offload) their checkpoints; host memory "
              f"{host_gib:.0f} GiB, device {dev_gib:.0f} GiB")
    results["workload"] = dict(vars(args), layers=layers, full_layers=full_layers, granularity=granularity)
    results["env"] = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                          sloth=sloth.__version__, device=dev_name,
                          device_gib=dev_gib, host_gib=host_gib,
                          alloc_conf={k: os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF",
                                                                         "PYTORCH_ALLOC_CONF")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
