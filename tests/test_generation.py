"""Graph-captured decoding (sloth.integrations.generation) against Transformers' generate: the same tokens for
greedy decoding and, from the same seed, for sampling (the same multinomial draws on the same probabilities), end
tokens, padding and min_new_tokens, Gemma 3's sliding-window layers; the calls it must leave to generate; on CUDA, graph replay against the eager
static-cache step and against generate, for a 16-bit model and a QLoRA PeftModel."""

import pytest
import torch

import sloth
from sloth.integrations import generation

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def make_model(family, device="cpu", dtype=torch.float32, attn="eager", seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(**COMMON, head_dim=16), transformers.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(**COMMON, sliding_window=None), transformers.MistralForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    cfg._attn_implementation = attn
    model = cls(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # larger weights: peaked distributions, so that greedy tokens are far from ties
        for p in model.parameters():
            p.mul_(3.0)
    return model


def prompts(device="cpu", lengths=(7, 4, 9), seed=1):
    """Left-padded prompts ``[B, max(lengths)]`` and their padding mask."""
    g = torch.Generator().manual_seed(seed)
    b, p = len(lengths), max(lengths)
    ids = torch.randint(3, 256, (b, p), generator=g)
    mask = torch.zeros(b, p, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, p - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def ours(model, ids, mask, use_graph=False, **kw):
    pl = generation.plan(model, (ids,), dict(attention_mask=mask, **kw), require_cuda=False)
    assert pl is not None, "the graphed path should take this call"
    return generation.decode(model, pl, use_graph=use_graph)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_matches_generate(family, attn):
    model = make_model(family, attn=attn)
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=None)
    got = ours(model, ids, mask, do_sample=False, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(got, want)


def test_sampling_matches_generate_from_the_same_seed():
    model = make_model("qwen3")
    ids, mask = prompts()
    kw = dict(do_sample=True, max_new_tokens=16, temperature=0.7, top_k=40, top_p=0.9, eos_token_id=None)
    torch.manual_seed(123)
    want = model.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(123)
    got = ours(model, ids, mask, **kw)
    assert torch.equal(got, want)
    torch.manual_seed(124)
    other = ours(model, ids, mask, **kw)
    assert not torch.equal(other, got)  # the seed matters: tokens are really sampled


def test_end_tokens_padding_and_min_new_tokens():
    model = make_model("llama")
    ids, mask = prompts()
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=None)
    p = ids.shape[1]
    eos = [int(free[0, p + 3]), int(free[1, p + 5])]  # rows 0 and 1 end early, row 2 probably later
    for kw in (dict(), dict(min_new_tokens=6), dict(max_new_tokens=4)):
        args = dict(do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
        args.update(kw)
        want = model.generate(ids, attention_mask=mask, **args)
        got = ours(model, ids, mask, **args)
        assert torch.equal(got, want), kw
    # every row ends: decoding stops where generate stops (fewer than max_new_tokens)
    eos_all = sorted({int(free[r, p + 2]) for r in range(3)})
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos_all,
                          pad_token_id=0)
    got = ours(model, ids, mask, do_sample=False, max_new_tokens=12, eos_token_id=eos_all, pad_token_id=0)
    assert got.shape[1] < p + 12 and torch.equal(got, want)


def test_generation_config_object_and_max_length():
    model = make_model("llama")
    ids, mask = prompts()
    gc = transformers.GenerationConfig(do_sample=False, max_length=ids.shape[1] + 5, eos_token_id=None,
                                       pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, generation_config=gc)
    got = ours(model, ids, mask, generation_config=gc)
    assert got.shape[1] == ids.shape[1] + 5 and torch.equal(got, want)


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(repetition_penalty=1.2), dict(no_repeat_ngram_size=2),
                                dict(return_dict_in_generate=True), dict(output_scores=True),
                                dict(num_return_sequences=2, do_sample=True), dict(streamer=object()),
                                dict(token_type_ids=torch.zeros(3, 9, dtype=torch.long))])
def test_unsupported_calls_are_left_to_generate(kw):
    model = make_model("llama")
    ids, mask = prompts()
    kw = dict(dict(max_new_tokens=4), **kw)
    assert generation.plan(model, (ids,), dict(attention_mask=mask, **kw), require_cuda=False) is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_sliding_window_matches_generate(attn):
    """Gemma 3's interleaved sliding-window layers (window 4, 12 new tokens: the window slides past the prompt)."""
    model = make_model("gemma3", attn=attn)
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=None)
    got = ours(model, ids, mask, do_sample=False, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(got, want)


def test_windows_it_cannot_mask_and_cpu_are_left_to_generate(monkeypatch):
    ids, mask = prompts()
    mistral = make_model("mistral")
    mistral.config.sliding_window = 8  # a window without per-layer types, shorter than 9 + 4 positions
    assert generation.plan(mistral, (ids,), dict(attention_mask=mask, max_new_tokens=4), require_cuda=False) is None
    mistral.config.sliding_window = 64  # covers the sequence: plain causal attention
    assert generation.plan(mistral, (ids,), dict(attention_mask=mask, max_new_tokens=4), require_cuda=False)
    llama = make_model("llama")
    assert generation.plan(llama, (ids,), dict(attention_mask=mask, max_new_tokens=4)) is None  # CPU tensors
    monkeypatch.setenv("SLOTH_GRAPHED_GENERATE", "0")
    assert generation.plan(llama, (ids,), dict(attention_mask=mask, max_new_tokens=4), require_cuda=False) is None


def test_patch_installs_and_unpatch_removes_generate():
    model = make_model("llama")
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    sloth.patch(model)
    assert "generate" in model.__dict__
    assert any(".generate -> CUDA-graph decoding" in w for w in sloth.patched_modules(model))
    assert torch.equal(model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6), want)  # CPU
    sloth.unpatch(model)
    assert "generate" not in model.__dict__ and "_sloth_orig_generate" not in model.__dict__


# ----------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_cuda_graph_replay_matches(family):
    """bf16 SDPA: the replayed graph gives bit-identical tokens to the eager static-cache step (the same kernels);
    fp32: the same tokens as Transformers' generate; a patched model's generate takes the graphed path."""
    ids, mask = prompts("cuda", lengths=(7, 4, 9, 9, 1))
    bf16 = make_model(family, "cuda", torch.bfloat16, attn="sdpa")
    kw = dict(do_sample=False, max_new_tokens=24, eos_token_id=None)
    eager = ours(bf16, ids, mask, use_graph=False, **kw)
    graph = ours(bf16, ids, mask, use_graph=True, **kw)
    assert torch.equal(graph, eager)
    torch.manual_seed(5)
    s_eager = ours(bf16, ids, mask, use_graph=False, do_sample=True, max_new_tokens=24, top_p=0.95)
    torch.manual_seed(5)
    s_graph = ours(bf16, ids, mask, use_graph=True, do_sample=True, max_new_tokens=24, top_p=0.95)
    assert torch.equal(s_graph, s_eager)

    fp32 = make_model(family, "cuda", torch.float32, attn="sdpa")
    want = fp32.generate(ids, attention_mask=mask, **kw)
    sloth.patch(fp32)
    calls = []
    real = generation.decode
    try:
        generation.decode = lambda *a, **k: calls.append(1) or real(*a, **k)
        got = fp32.generate(ids, attention_mask=mask, **kw)
    finally:
        generation.decode = real
    assert calls and torch.equal(got, want)


@pytest.mark.cuda
def test_cuda_graph_qlora_peft_model():
    """A QLoRA PeftModel (bitsandbytes NF4, LoRA on every linear; the small-M fused GEMV inside the graph):
    PeftModel.generate reaches the graphed path and matches the eager static-cache step bit for bit."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import bitsandbytes as bnb

    model = make_model("qwen3", "cuda", torch.bfloat16, attn="sdpa")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64).to("cuda")
                    setattr(parent, name, q)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero adapter
    sloth.patch(pm)
    ids, mask = prompts("cuda", lengths=(7, 4, 9, 9, 1, 3, 8, 2))
    kw = dict(do_sample=False, max_new_tokens=20, eos_token_id=None)
    lm = pm.get_base_model()
    eager = ours(lm, ids, mask, use_graph=False, **kw)
    got = pm.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not getattr(lm, "_sloth_generate_broken", False)
    assert torch.equal(got, eager)
