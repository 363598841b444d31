"""gpt-oss and Qwen3-MoE under sloth.patch (CPU, fp32, tiny random-weight models of the real Transformers classes):
the patched model (sloth's norms, loss, attention "sloth" with sinks and windows for gpt-oss, experts "sloth") gives
the unpatched model's loss (router load-balancing loss included) and gradients, and unpatch restores it exactly."""

import copy

import pytest
import torch

import sloth
import sloth.integrations.attention
import sloth.integrations.moe

transformers = pytest.importorskip("transformers")


def _gpt_oss():
    cfg = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=128, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, router_aux_loss_coef=0.02)
    return transformers.GptOssForCausalLM, cfg


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, vocab_size=128,
        max_position_embeddings=64, mlp_only_layers=[1], norm_topk_prob=True, router_aux_loss_coef=0.02)
    return transformers.Qwen3MoeForCausalLM, cfg


FAMILIES = {"gpt_oss": _gpt_oss, "qwen3_moe": _qwen3_moe}


@pytest.fixture(autouse=True)
def moe_kernels(monkeypatch):
    """sloth's experts are opt-in (SLOTH_MOE_EXPERTS=1): these tests opt in."""
    monkeypatch.setenv("SLOTH_MOE_EXPERTS", "1")


def _model(family, router_loss):
    cls, cfg = FAMILIES[family]()
    cfg.output_router_logits = router_loss
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    return model


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router_loss", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_matches_unpatched(family, router_loss, monkeypatch):
    model = _model(family, router_loss)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    ref_loss, ref_grads = _step(model, ids, labels)
    patched = sloth.patch(copy.deepcopy(model))
    whats = "\n".join(sloth.patched_modules(patched))
    assert "experts" in whats and "'sloth'" in whats
    if family == "gpt_oss":
        assert "attention 'eager' -> 'sloth'" in whats
        assert "RoPE" not in whats  # gpt-oss's half-split RoPE stays the model's own
    calls = {"experts": 0, "attention": 0}
    for mod, name in ((sloth.integrations.moe, "moe_experts"), (sloth.integrations.attention, "attention")):
        def counted(*a, _f=getattr(mod, name), _k="experts" if name == "moe_experts" else "attention", **k):
            calls[_k] += 1
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    loss, grads = _step(patched, ids, labels)
    # every MoE layer ran on sloth's experts; gpt-oss's every attention on sloth's kernel
    assert calls["experts"] == (2 if family == "gpt_oss" else 1)
    assert calls["attention"] == (2 if family == "gpt_oss" else 0)
    # fp32 throughout; the kernels sum in another order than the eager model (online softmax, grouped experts)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    sloth.unpatch(patched)
    assert patched.config._attn_implementation == "eager"
    assert not sloth.patched_modules(patched)
    loss2, _ = _step(patched, ids, labels)
    torch.testing.assert_close(loss2, ref_loss, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_get_peft_model_puts_lora_on_attention_and_experts(family, caplog):
    """sloth.get_peft_model on an MoE family: LoRA on the attention projections and, through PEFT's
    target_parameters, on the expert stacks (said in one log line); the experts run on sloth's kernels and every
    LoRA matrix, the experts' included, gets a gradient."""
    pytest.importorskip("peft")
    model = _model(family, router_loss=False)
    with caplog.at_level("INFO", logger="sloth"):
        pm = sloth.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert any("experts' mlp.experts.down_proj, mlp.experts.gate_up_proj" in r.message for r in caplog.records)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora_A" in n for n in names) and any("q_proj.lora_A" in n for n in names)
    assert "-> 'sloth' (sloth's MoE kernels" in "\n".join(sloth.patched_modules(pm))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    pm(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in pm.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_experts_stay_transformers_own_unless_asked(monkeypatch):
    monkeypatch.setenv("SLOTH_MOE_EXPERTS", "0")
    model = sloth.patch(_model("qwen3_moe", router_loss=False))
    assert "experts" not in "\n".join(sloth.patched_modules(model))
    assert getattr(model.config, "_experts_implementation", None) != "sloth"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_to_saved_adapter(family, tmp_path):
    """The user's path for an MoE family on the CPU: a saved checkpoint through sloth.from_pretrained (16-bit),
    sloth.get_peft_model (attention + expert LoRA), one training step, the adapter saved and loaded onto a fresh
    base: the same loss (no LoRA matrix lost, the experts' included)."""
    peft = pytest.importorskip("peft")
    from tiny_checkpoints import tokenizer

    tok = tokenizer()  # (its vocabulary is larger than the model's: only ids < 128 are fed)
    model = _model(family, router_loss=False)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lm, _ = sloth.from_pretrained(str(tmp_path / "base"), load_in_4bit=False, max_seq_length=64)
    pm = sloth.get_peft_model(lm, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        want = pm(input_ids=ids, labels=ids).loss
    pm.save_pretrained(tmp_path / "adapter")
    fresh, _ = sloth.from_pretrained(str(tmp_path / "base"), load_in_4bit=False, max_seq_length=64)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = loaded(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
