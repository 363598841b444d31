"""Export: merged 16-bit safetensors (LoRA and NF4 QLoRA) give the adapter model's logits; GGUF files read back with
gguf.GGUFReader carry the same tensors and metadata, and a plain NumPy Llama forward over the GGUF tensors (GGML's
conventions: adjacent-pair RoPE, Llama 3 rope factors) gives the model's logits; the Ollama Modelfile's template
reproduces the chat template."""

import copy
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

import sloth  # noqa: E402
from sloth.export.gguf import interleaved_to_rope, rope_to_interleaved  # noqa: E402
from sloth.export.merge import merged_state_dict  # noqa: E402
from sloth.export.modelfile import chat_wrappers  # noqa: E402
from sloth.export.q8_0 import dequantize_q8_0, quantize_q8_0  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tok, rope="default", tie=False, seed=0):
    torch.manual_seed(seed)
    rp = {"rope_type": "default", "rope_theta": 10000.0}
    if rope == "llama3":
        rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rp,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def with_lora(model, seed=1):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights=False))
    return pm.eval()


def ids_of(tok, n=2, t=11):
    return torch.randint(10, len(tok), (n, t), generator=torch.Generator().manual_seed(5))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------------- merged

def test_save_merged_fp32_gives_adapter_logits(tok, tmp_path):
    """fp32: merged weights W + s B A differ from the two-GEMM LoRA path only by fp32 rounding (1e-5)."""
    model = sloth.patch(with_lora(tiny_llama(tok)))
    out = sloth.save_merged(model, str(tmp_path / "m"), tokenizer=tok, dtype="fp32")
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= files
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_of(tok)
    want, got = logits(model, ids), logits(merged, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.chat_template == tok.chat_template
    assert any("lora" in n for n, _ in model.named_parameters())  # the model itself was not merged
    # sharded: written shard by shard as the merged tensors stream in, with the index Transformers reads
    sharded = sloth.save_merged(model, str(tmp_path / "s"), tokenizer=tok, dtype="fp32", max_shard_size=200_000)
    files = sorted(os.listdir(sharded))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and not any(f.endswith(".tmp") for f in files)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    again = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again, ids), got, rtol=0, atol=0)


def test_save_merged_bf16_is_merge_then_one_cast(tok, tmp_path):
    """bf16: each tensor is (W + s B A in fp32) rounded once, i.e. PEFT's fp32 merge cast to bf16 (within one bf16
    ulp for the rare rounding ties of differently ordered fp32 sums); logits within bf16's ~3 significant
    digits compounded over 2 layers (2e-2 of the logit scale)."""
    model = with_lora(tiny_llama(tok, tie=True))
    out = sloth.save_merged(model, str(tmp_path / "m"), tokenizer=tok)  # bf16 default
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out, "model.safetensors"))
    ref = copy.deepcopy(model).merge_and_unload().state_dict()
    assert "lm_head.weight" not in saved  # tied to the embedding, as save_pretrained does
    assert set(saved) == {k for k in ref if k != "lm_head.weight"}
    for k, v in saved.items():
        assert v.dtype == torch.bfloat16, k
        torch.testing.assert_close(v.float(), ref[k].to(torch.bfloat16).float(), rtol=2 ** -7, atol=0, msg=k)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_of(tok)
    want, got = logits(model, ids), logits(merged, ids)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_merge_nf4_base(tok):
    """QLoRA: NF4 base weights are dequantized (sloth.nf4_dequantize, bit-exact with bitsandbytes) before the
    LoRA delta is added; the merged fp32 model gives the adapter model's logits."""
    bnb = pytest.importorskip("bitsandbytes")
    base = tiny_llama(tok)
    for layer in base.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                lin = getattr(parent, n)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(parent, n, q.to("cpu"))
    base.is_loaded_in_4bit = True
    model = with_lora(base)
    from peft.tuners.lora.bnb import Linear4bit

    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, Linear4bit)
    state = merged_state_dict(model, torch.float32)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w4 = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], w4 + delta, rtol=1e-6, atol=1e-6)
    merged = tiny_llama(tok)
    merged.load_state_dict(state)
    ids = ids_of(tok)
    sloth.patch(model)  # NF4 LoRA layers on sloth.lora_linear (bitsandbytes' CPU kernel repacks only some shapes)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ GGUF

def _fields(reader):
    return {name: f.contents() for name, f in reader.fields.items()}


def _tensor(reader_tensor):
    """fp32 values [rows, cols] (GGUF shapes list the fastest dimension first)."""
    t = reader_tensor
    qt = gguf.GGMLQuantizationType
    if t.tensor_type == qt.Q8_0:
        return dequantize_q8_0(t.data)
    if t.tensor_type == qt.BF16:
        raw = np.ascontiguousarray(t.data)
        raw = raw.view(np.uint16) if raw.dtype == np.uint8 else raw  # the reader may give the raw bytes
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(t.data, dtype=np.float32)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _gguf_forward(path, ids):
    """A Llama forward in NumPy over a GGUF file, as llama.cpp runs the llama architecture: q / k rotated in
    adjacent pairs, frequencies divided by rope_freqs when present, GQA, SwiGLU, output tied to token_embd when
    there is no output tensor."""
    r = gguf.GGUFReader(path)
    f = _fields(r)
    T = {t.name: _tensor(t) for t in r.tensors}
    n_layer, n_head, n_kv = f["llama.block_count"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, base = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"]
    d = f["llama.rope.dimension_count"]
    freqs = 1.0 / base ** (np.arange(0, d, 2) / d)
    if "rope_freqs.weight" in T:
        freqs = freqs / T["rope_freqs.weight"]
    pos = np.arange(ids.shape[1])
    ang = pos[:, None] * freqs[None]  # [T, d/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # [T, h, d], pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    outs = []
    for row in ids:
        x = T["token_embd.weight"][row].astype(np.float64)  # [T, H]
        n = x.shape[0]
        for i in range(n_layer):
            b = f"blk.{i}."
            h = _rms(x, T[b + "attn_norm.weight"], eps)
            q = rope((h @ T[b + "attn_q.weight"].T).reshape(n, n_head, d))
            k = rope((h @ T[b + "attn_k.weight"].T).reshape(n, n_kv, d))
            v = (h @ T[b + "attn_v.weight"].T).reshape(n, n_kv, d)
            rep = n_head // n_kv
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
            s = s + np.triu(np.full((n, n), -np.inf), 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", p, v).reshape(n, n_head * d)
            x = x + a @ T[b + "attn_output.weight"].T
            h = _rms(x, T[b + "ffn_norm.weight"], eps)
            g = h @ T[b + "ffn_gate.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ T[b + "ffn_up.weight"].T)) @ T[b + "ffn_down.weight"].T
        x = _rms(x, T["output_norm.weight"], eps)
        outs.append(x @ T.get("output.weight", T["token_embd.weight"]).T)
    return np.stack(outs), r, f, T


@pytest.mark.parametrize("quant, rope, tie, tol", [
    ("f16", "llama3", False, 5e-3),  # fp16 weights: ~2^-11 relative per weight
    ("bf16", "default", True, 3e-2),  # bf16: ~2^-8
    ("q8_0", "default", False, 3e-2),  # 8-bit blocks: |err| <= d/2 = max|w| / 254 per block
])
def test_gguf_round_trip(tok, tmp_path, quant, rope, tie, tol):
    model = with_lora(tiny_llama(tok, rope=rope, tie=tie))
    path = sloth.save_gguf(model, str(tmp_path / f"model-{quant}.gguf"), quant=quant, tokenizer=tok)
    ids = ids_of(tok)
    want = logits(model, ids).numpy()
    got, reader, f, T = _gguf_forward(path, ids.numpy())
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()

    # metadata
    cfg = model.get_base_model().config
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 96
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.context_length"] == 128 and f["llama.rope.dimension_count"] == 16
    assert f["llama.vocab_size"] == len(tok)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    assert f["general.file_type"] == ftype
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == len(tok)
    assert f["tokenizer.ggml.tokens"][tok.eos_token_id] == tok.eos_token
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert len(f["tokenizer.ggml.merges"]) > 100 and f["tokenizer.chat_template"] == tok.chat_template
    assert ("output.weight" in T) != tie and ("rope_freqs.weight" in T) == (rope == "llama3")

    # tensors: every merged weight, in GGML's layout, within the format's rounding
    state = merged_state_dict(model, torch.float32)
    names = sloth.export.gguf.gguf_tensor_names(cfg)
    by_name = {t.name: t for t in reader.tensors}
    for hf, w in state.items():
        t = by_name[names[hf]]
        assert tuple(int(x) for x in t.shape) == tuple(reversed(w.shape)), hf  # GGUF lists ne0 (columns) first
        v = torch.from_numpy(_tensor(t).reshape(w.shape).copy())
        if "q_proj" in hf:
            v = interleaved_to_rope(v, 4)
        elif "k_proj" in hf:
            v = interleaved_to_rope(v, 2)
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(v, w), hf
        elif quant == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and torch.equal(v, w.half().float()), hf
        elif quant == "bf16":
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16 and torch.equal(v, w.bfloat16().float()), hf
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            # |x - d16 q| <= |x - d q| + |d - d16| |q| <= d / 2 + 127 d 2^-11 (d = max|x| / 127 rounded to fp16;
            # plus fp16's subnormal spacing 2^-24 / 2 for tiny scales)
            d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            bound = d * (0.5 + 127 * 2 ** -11) + 127 * 2 ** -25
            assert ((v - w).reshape(-1, 32).abs() <= bound).all(), hf
    mf = open(tmp_path / "Modelfile").read()
    assert mf.startswith(f"FROM ./model-{quant}.gguf") and 'TEMPLATE """' in mf
    assert f'PARAMETER stop "{tok.eos_token}"' in mf


def test_q8_0_matches_gguf_package():
    x = torch.randn(5, 128) * torch.logspace(-3, 2, 5)[:, None]
    x[0, :32] = 0
    x[1, :32] = torch.arange(32) - 15.5  # exact halves: ties round away from zero
    ours = quantize_q8_0(x)
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == (5, 4 * 34) and np.array_equal(ours, theirs)
    np.testing.assert_array_equal(dequantize_q8_0(ours), gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0))


def test_rope_permutation_is_a_row_permutation():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    p = rope_to_interleaved(w, 4)
    assert torch.equal(interleaved_to_rope(p, 4), w)
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[4]) and torch.equal(p[2], w[1]) and torch.equal(p[9], w[12])


def test_save_gguf_from_merged_directory(tok, tmp_path):
    model = with_lora(tiny_llama(tok))
    d = sloth.save_merged(model, str(tmp_path / "merged"), tokenizer=tok, dtype="fp32", max_shard_size=300_000)
    a = sloth.save_gguf(d, str(tmp_path / "a" / "m.gguf"), quant="f16")  # tokenizer loaded from the directory
    b = sloth.save_gguf(model, str(tmp_path / "b" / "m.gguf"), quant="f16", tokenizer=tok)
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_gguf_rejects_other_families(tok, tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, head_dim=16)
    with pytest.raises(ValueError, match="llama architecture"):
        sloth.save_gguf(transformers.Qwen3ForCausalLM(cfg), str(tmp_path / "q.gguf"), tokenizer=tok)
    with pytest.raises(ValueError, match="quant"):
        sloth.save_gguf(tiny_llama(tok), str(tmp_path / "q.gguf"), quant="q4_k", tokenizer=tok)


def test_modelfile_template_reproduces_chat_template(tok):
    w = chat_wrappers(tok)
    assert w is not None
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert w.render(conv, True) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    from sloth.export.modelfile import go_template

    t = go_template(w)
    assert t.startswith(tok.bos_token) and '{{ if eq .Role "system" }}' in t and "{{ .Content }}" in t
    assert "<|assistant|>\n" in t and '(ne .Role "assistant")' in t and "{{-" not in t and "-}}" not in t
    assert render_go(t, conv) == w.render(conv, True) and render_go(t, conv[:3]) == w.render(conv[:3])


def render_go(t, messages):
    """The subset of Go templates go_template writes, interpreted: literal text, one range over .Messages, the role
    if / else-if chain, and the generation prompt after the last non-assistant message."""
    import re

    head, rest = t.split("{{ range $i, $_ := .Messages }}", 1)
    body = rest[rest.index("}}") + 2: rest.rindex("{{ end }}")]  # after the $last line, before the range's end
    roles = dict(re.findall(r'if eq \.Role "(\w+)" }}(.*?){{ (?:else|end)', body, flags=re.S))
    gen = re.search(r'\(ne \.Role "assistant"\) }}(.*?){{ end }}', body, flags=re.S).group(1)
    out = head
    for i, m in enumerate(messages):
        out += roles[m["role"]].replace("{{ .Content }}", m["content"])
        if i == len(messages) - 1 and m["role"] != "assistant":
            out += gen
    return out
