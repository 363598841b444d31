"""The model registry (sloth.models): every family's spec names real Transformers classes, every family-specific
table reads it, a new family is one spec, and an unsupported family gets one message listing the supported ones."""

import dataclasses
import warnings

import pytest
import torch

import sloth
from sloth import models

transformers = pytest.importorskip("transformers")


def test_every_spec_names_real_transformers_classes():
    for spec in models.specs():
        mod = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        assert mod[spec.model_type] == spec.causal_lm, spec.name
        # the module of the causal LM class holds the family's other classes too
        modeling = __import__(getattr(transformers, spec.causal_lm).__module__, fromlist=["x"])
        for name in filter(None, (spec.decoder_layer, spec.attention, spec.mlp, spec.experts, spec.norm.cls)):
            assert hasattr(modeling, name), f"{spec.name}: {name} not in {modeling.__name__}"


def test_lookups():
    assert models.for_model_type("llama").name == "Llama"
    assert models.for_model_type("gemma3_text").norm.offset == 1.0
    assert models.for_model_type("gpt2") is None and models.for_model_type(None) is None
    assert set(models.causal_lms()) == {"LlamaForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                                        "Gemma3ForCausalLM", "GptOssForCausalLM", "Qwen3MoeForCausalLM"}
    assert "GptOssAttention" in models.attentions() and "GptOssAttention" not in models.rope_attentions()
    assert "Gemma3RMSNorm" in models.norms() and not models.norms()["Gemma3RMSNorm"].cast_before_weight
    assert not models.for_model_type("gemma3_text").mlp_output_feeds_residual
    assert "multimodal" in models.unsupported_hint("gemma3")
    assert models.unsupported_hint("gpt2") == ""
    assert models.unsupported_hint("gemma") == ""  # Gemma 1 is no near miss of Gemma 3
    text = models.supported()
    assert all(s.model_type in text for s in models.specs())


def test_a_model_type_cannot_be_registered_twice():
    spec = dataclasses.replace(models.for_model_type("llama"), name="Other Llama")
    with pytest.raises(ValueError, match="already registered"):
        models.register(spec)


def test_a_new_family_is_one_spec(monkeypatch):
    """Registering a spec is all it takes for sloth.patch to swap a family's modules: here GraniteForCausalLM-like
    Llama subclasses stand in for a new family (the same layout under other class names)."""
    L = transformers.models.llama.modeling_llama

    class NewNorm(L.LlamaRMSNorm):
        pass

    class NewMLP(L.LlamaMLP):
        pass

    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    layer = model.model.layers[0]
    layer.input_layernorm.__class__ = NewNorm
    layer.mlp.__class__ = NewMLP
    spec = models.FamilySpec(model_type="new_family_test", name="New", causal_lm="NoSuchForCausalLM",
                             decoder_layer="NoSuchLayer", attention="NoSuchAttention", mlp="NewMLP",
                             norm=models.NormSpec("NewNorm"))
    monkeypatch.setitem(models.FAMILIES, "new_family_test", spec)
    sloth.patch(model)
    try:
        whats = "\n".join(sloth.patched_modules(model))
        assert "NewNorm.forward -> sloth.rms_norm" in whats and "NewMLP.forward -> sloth.lora_mlp" in whats
    finally:
        sloth.unpatch(model)


def test_unsupported_family_patches_lora_only_and_says_so_once():
    peft = pytest.importorskip("peft")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg),
                                peft.LoraConfig(r=4, target_modules=["c_fc"], fan_in_fan_out=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sloth.patch(model)
    ours = [str(w.message) for w in caught if "sloth.patch" in str(w.message)]
    assert len(ours) == 1, ours
    assert "'gpt2'" in ours[0] and "supported: Llama (llama)" in ours[0]
    n_lora = sum(": " in w and "sloth.lora_linear" in w for w in sloth.patched_modules(model))
    assert ("LoRA layers only" in ours[0]) == (n_lora > 0)
    sloth.unpatch(model)


def test_from_pretrained_names_the_supported_families(tmp_path):
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' model, which sloth does not support; supported families: Llama"):
        sloth.from_pretrained(str(tmp_path))


def test_config_switches_match_the_readme_table(monkeypatch):
    import pathlib
    import re

    from sloth import config

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Runtime switches", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"^\| `(SLOTH_[A-Z0-9_]+)` \|", section, flags=re.M))
    assert in_table == {s.env for s in config.SWITCHES.values()}
    monkeypatch.setenv("SLOTH_CUDA_GRAPHS", "off")
    assert config.CUDA_GRAPHS is False
    monkeypatch.setenv("SLOTH_OFFLOAD_HOST_GB", "1.5")
    assert config.OFFLOAD_HOST_GB == int(1.5 * 2**30)
    monkeypatch.setenv("SLOTH_MLP_CHUNK_TOKENS", "many")
    with pytest.raises(ValueError, match="SLOTH_MLP_CHUNK_TOKENS='many' is not an integer"):
        config.MLP_CHUNK_TOKENS
    monkeypatch.delenv("SLOTH_MLP_CHUNK_TOKENS")
    assert config.MLP_CHUNK_TOKENS is None


def test_no_module_reads_sloth_switches_outside_config():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "python" / "sloth"
    offenders = [str(p) for p in root.rglob("*.py") if p.name != "config.py" and
                 re.search(r"environ(\.get)?\(?\[?[\"']SLOTH_|getenv\([\"']SLOTH_", p.read_text())]
    assert offenders == []
