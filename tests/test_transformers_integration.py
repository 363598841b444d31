"""sloth.patch / sloth.unpatch on tiny random-weight Llama 3, Qwen3, Mistral and Gemma 3 models (CPU, fp32):
patched vs unpatched loss and gradients (full fine-tuning and LoRA), optimizer steps, gradient accumulation."""

import copy

import pytest
import torch

import sloth

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "qwen3", "mistral", "gemma3"]
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False)


def make_model(family, seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        cls = transformers.LlamaForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(**COMMON, head_dim=16), transformers.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(**COMMON, sliding_window=None), transformers.MistralForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=256, sliding_window=4, final_logit_softcapping=30.0,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).float()
    with torch.no_grad():  # norms start at 0 (Gemma) / 1 (Llama): randomize every parameter a little
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


LENGTHS = [12, 9, 6, 3]


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(ga, gb, tol):
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert rel_err(ga[n], gb[n]) <= tol, n


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_loss_and_grads(family):
    ref = make_model(family)
    model = sloth.patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out_ref.logits is not None  # logits are never materialized with labels
    assert rel_err(out.loss, out_ref.loss) <= 1e-5
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(grads(model), grads(ref), 1e-4)
    # without labels: the model's own forward, logits as usual (norms through sloth)
    with torch.no_grad():
        lg, lg_ref = model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    assert rel_err(lg, lg_ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_grads(family, monkeypatch):
    peft = pytest.importorskip("peft")
    from sloth.integrations import qkv

    groups = []  # q, k, v of each layer go through one lora_linear_group call (shared-input LoRA A GEMM)
    monkeypatch.setattr(qkv, "lora_linear_group", lambda x, projs, *a: groups.append(len(projs)) or
                        sloth.nn.lora_group.lora_linear_group(x, projs, *a))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def lora(m):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        return peft.get_peft_model(m, cfg)

    base = make_model(family)
    ref = lora(copy.deepcopy(base))
    torch.manual_seed(5)
    model = lora(copy.deepcopy(base))
    model.load_state_dict(ref.state_dict())
    sloth.patch(model)
    assert sloth.integrations.transformers.patched_modules(model)
    ids, mask, labels = make_batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert groups == [3] * base.config.num_hidden_layers
    assert out.logits is None
    assert rel_err(out.loss, out_ref.loss) <= 1e-5
    out_ref.loss.backward()
    out.loss.backward()
    g, g_ref = grads(model), grads(ref)
    assert all("lora_" in n for n in g) and len(g) == 2 * len(targets) * 2
    assert_grads_close(g, g_ref, 1e-4)
    sloth.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_steps(family):
    ref = make_model(family)
    model = sloth.patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    for step in range(3):
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), (step, losses)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation(family):
    """4 micro-batches of 1 (unpadded) with num_items_in_batch = all target tokens == one padded batch of 4."""
    ref = make_model(family)
    model = sloth.patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    n_items = int((labels[:, 1:] != -100).sum())
    model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss.backward()
    g_full = grads(model)
    ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss.backward()
    assert_grads_close(g_full, grads(ref), 1e-4)
    model.zero_grad()
    total = 0.0
    for b, n in enumerate(LENGTHS):
        loss = model(input_ids=ids[b:b + 1, :n], labels=labels[b:b + 1, :n], num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    assert_grads_close(grads(model), g_full, 1e-4)
    full = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss.item()
    assert abs(total - full) <= 1e-5 * abs(full)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores(family, capsys):
    ref = make_model(family)
    model = copy.deepcopy(ref)
    ids, mask, labels = make_batch()
    sloth.patch(model, verbose=True)
    printed = capsys.readouterr().out
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) >= 2 * 2 + 1
    for n in norms:
        assert f"{n}: " in printed and "sloth.rms_norm" in printed
    assert "ForCausalLM.forward -> loss by sloth.causal_lm_loss" in printed
    assert "ForCausalLM.generate -> CUDA-graph decoding" in printed
    mlps = [n for n, m in model.named_modules() if type(m).__name__.endswith("MLP")]
    assert len(mlps) == 2 and all(f"{n}: " in printed for n in mlps) and "sloth.lora_mlp" in printed
    attns = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    assert len(attns) == 2 and all(f"{n}: " in printed for n in attns) and "sloth.rope" in printed
    assert sloth.patch(model) is model  # idempotent
    n = len(norms) + len(mlps) + len(attns) + 2  # + the causal LM's forward and generate
    assert len(sloth.integrations.transformers.patched_modules(model)) == n
    assert sloth.unpatch(model) == n
    assert all(a not in m.__dict__ for m in model.modules()
               for a in ("forward", "_sloth_orig_forward", "generate", "_sloth_orig_generate",
                         sloth.integrations.mlp.OUTPUT_FEEDS_RESIDUAL))
    out, out_ref = model(input_ids=ids, attention_mask=mask, labels=labels), ref(input_ids=ids, attention_mask=mask,
                                                                                 labels=labels)
    assert torch.equal(out.logits, out_ref.logits) and torch.equal(out.loss, out_ref.loss)
    assert sloth.unpatch(model) == 0


def test_return_dict_false_and_logits_to_keep():
    ref = make_model("llama")
    model = sloth.patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and rel_err(out[0], ref(input_ids=ids, attention_mask=mask, labels=labels).loss) <= 1e-5
    with torch.no_grad():
        lg = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert lg.shape == (4, 1, 256)


def _lora(model, dropout=0.0):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # SwiGLU and GeGLU-tanh
def test_mlp_token_chunks_match(family, monkeypatch):
    """Forced MLP token chunks (each under its own checkpoint) give the unpatched model's loss and LoRA grads."""
    base = make_model(family)
    ref = _lora(copy.deepcopy(base))
    model = _lora(copy.deepcopy(base))
    model.load_state_dict(ref.state_dict())
    sloth.patch(model)
    calls = []
    import sloth.integrations.mlp as mlp

    real = mlp.lora_mlp
    monkeypatch.setattr(mlp, "lora_mlp", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    monkeypatch.setenv("SLOTH_MLP_CHUNK_TOKENS", "5")
    ids, mask, labels = make_batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.loss, out_ref.loss) <= 1e-5
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(grads(model), grads(ref), 1e-4)
    tokens = ids.numel()  # 4 x 12 = 48 tokens -> chunks of 5 (and 3), per layer, forward + recompute in backward
    per_pass = [5] * (tokens // 5) + [tokens % 5]
    assert sorted(calls) == sorted(per_pass * 2 * 2)  # 2 layers, then (in backward order) their chunk recomputes


def test_mlp_falls_back_off_the_fast_path(monkeypatch):
    """LoRA dropout in training: the MLP runs the model's own forward (sloth.lora_mlp is not called)."""
    import sloth.integrations.mlp as mlp

    model = sloth.patch(_lora(make_model("llama"), dropout=0.1))
    monkeypatch.setattr(mlp, "lora_mlp", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fused path used")))
    ids, mask, labels = make_batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model.eval()  # dropout off in eval: back on the fused path
    with pytest.raises(AssertionError, match="fused path used"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_runs_in_patched_attention_only(family, monkeypatch):
    """Patched attention rotates q and k with sloth's kernel (2 calls per layer); an unpatched model of the same
    family in the same process keeps Transformers' own function."""
    import sloth.integrations.rope as rope_mod

    calls = []
    real = rope_mod.RopeFunction

    class Spy:
        @staticmethod
        def apply(*a):
            calls.append(a[0].shape)
            return real.apply(*a)

    monkeypatch.setattr(rope_mod, "RopeFunction", Spy)
    ref = make_model(family)
    model = sloth.patch(copy.deepcopy(ref))
    ids, mask, labels = make_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    n = len(calls)
    assert n >= 2 * 2  # q and k of both layers (per batch row when the layout needs it)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(calls) == n and rel_err(out.loss, out_ref.loss) <= 1e-5
    out.loss.backward()
    out_ref.loss.backward()
    assert_grads_close(grads(model), grads(ref), 1e-4)


@pytest.mark.parametrize("layout", ["projection", "head_major", "per_row"])
def test_rope_layouts_match_transformers(layout):
    """The three q / k layouts sloth's RoPE addresses give Transformers' apply_rotary_pos_emb, values and grads."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sloth.integrations.rope import _sloth_rotary

    g = torch.Generator().manual_seed(3)
    B, H, T, D = 3, 4, 5, 8
    pos = torch.arange(T)[None].expand(B, -1) + (torch.arange(B)[:, None] if layout == "per_row" else 0)
    ang = pos[..., None].float() * (0.1 * torch.arange(1, D // 2 + 1).float())  # [B, T, D / 2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [B, T, D]
    if layout == "head_major":
        cos, sin = cos[:1], sin[:1]

    def make():
        if layout == "projection":  # [B, T, H, D] buffer, transposed view
            return torch.randn(B, T, H, D, generator=g).transpose(1, 2)
        return torch.randn(B, H, T, D, generator=g)  # contiguous [B, H, T, D] (e.g. normed after the transpose)

    q0, k0 = make(), make()
    w = torch.randn(B, H, T, D, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q0, k0, q0, k0)]
    qr, kr = apply_rotary_pos_emb(leaves[0], leaves[1], cos, sin)
    q, k = leaves[2] * 1.0, leaves[3] * 1.0  # non-leaf buffers (in place is done on them)
    if layout == "projection":
        q, k = (leaves[2].transpose(1, 2) * 1.0).transpose(1, 2), (leaves[3].transpose(1, 2) * 1.0).transpose(1, 2)
    out = _sloth_rotary(q, k, cos, sin)
    assert out is not None
    torch.testing.assert_close(out[0], qr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], kr, rtol=1e-5, atol=1e-6)
    ((qr * w).sum() + (kr * w).sum()).backward()
    ((out[0] * w).sum() + (out[1] * w).sum()).backward()
    for a, b in zip(leaves[2:], leaves[:2]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_rope_fp32_cos_sin_made_once_per_forward():
    """The fp32 cos / sin (and their [B * T, D] layout) are made by the first layer and reused by the next ones
    while the rotary embedding's tensors are the same and unmodified; an in-place change makes new ones."""
    from sloth.integrations.rope import _fp32_cos_sin, _sloth_rotary

    g = torch.Generator().manual_seed(5)
    B, H, T, D = 2, 3, 4, 8
    ang = torch.rand(1, T, D // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos().bfloat16(), torch.cat([ang, ang], -1).sin().bfloat16()  # [1, T, D]
    c1, s1, memo = _fp32_cos_sin(cos, sin)
    c2, s2, memo2 = _fp32_cos_sin(cos, sin)
    assert c1 is c2 and s1 is s2 and memo is memo2 and c1.dtype == torch.float32
    outs = []
    for _ in range(2):  # two "layers" with the same cos / sin: same answer as fresh copies
        q = torch.randn(B, T, H, D, generator=g, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(B, T, H, D, generator=g, dtype=torch.bfloat16).transpose(1, 2)
        q_ref, k_ref = q.clone(), k.clone()
        _sloth_rotary(q, k, cos, sin)
        _sloth_rotary(q_ref, k_ref, cos.clone(), sin.clone())  # other tensors: no cache hit
        outs.append((q, k, q_ref, k_ref))
    for q, k, q_ref, k_ref in outs:
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    cos.mul_(0.5)
    c3, _, memo3 = _fp32_cos_sin(cos, sin)
    assert c3 is not c1 and memo3 is not memo and torch.equal(c3, cos.float())
    leaf = cos.clone().requires_grad_()  # bf16, requires grad: fresh copies every call (never cached)
    assert _fp32_cos_sin(leaf, sin)[0] is not _fp32_cos_sin(leaf, sin)[0]


def test_merge_and_unload_of_a_patched_peft_model_can_be_unpatched():
    """merge_and_unload() returns the Transformers model inside the PeftModel, whose modules sloth patched: it
    holds the patch record too, so sloth.unpatch restores it (it returned 0 and left the model patched); the
    PeftModel's own unpatch then has nothing left to restore."""
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    ref = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    sloth.patch(model)
    merged = model.merge_and_unload()  # adapters still at B = 0: merged weights equal the base weights
    assert sloth.integrations.transformers.patched_modules(merged)
    assert sloth.unpatch(merged) > 0
    assert not any("_sloth_orig_forward" in m.__dict__ for m in merged.modules())
    assert not sloth.integrations.transformers.patched_modules(merged) and sloth.unpatch(model) == 0
    ids, mask, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
