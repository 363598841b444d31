"""Export: merged 16-bit safetensors (LoRA and NF4 QLoRA) give the adapter model's logits; save_merged never
replaces the base model and refuses a non-empty folder; GGUF files (f16 / bf16 / q8_0 / q4_0 / q4_k_m / q5_k_m /
q6_k; Llama, Qwen3, Gemma 3) read back with gguf.GGUFReader and dequantized by gguf's own dequantizers carry the
merged weights and llama.cpp's metadata, and a plain NumPy Llama forward over them (GGML's conventions: adjacent-pair
RoPE, Llama 3 rope factors) gives the model's logits; sloth's k-quant quantizers match a line-by-line transcription
of llama.cpp's reference algorithm; the Ollama Modelfile's template reproduces the chat template and cannot be broken
out of; no write follows a symbolic link."""

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
from sloth.export.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tok, rope="default", tie=False, seed=0, wide=False):
    """A 2-layer Llama (hidden 64; ``wide``: hidden 256 and MLP 512, so that rows fit the k-quants' 256 blocks)."""
    torch.manual_seed(seed)
    rp = {"rope_type": "default", "rope_theta": 10000.0}
    if rope == "llama3":
        rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256 if wide else 64, num_hidden_layers=2,
                                   num_attention_heads=4 if wide else 4, num_key_value_heads=2,
                                   intermediate_size=512 if wide else 96, max_position_embeddings=128,
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
    if t.tensor_type in (qt.F32, qt.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(np.ascontiguousarray(t.data).view(np.uint8), t.tensor_type)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _gguf_forward(path, ids):
    """The forward llama.cpp runs over a GGUF file, in NumPy (fp64): for ``llama``, q / k rotated in adjacent pairs,
    frequencies divided by rope_freqs when present, GQA, SwiGLU; for ``qwen3``, NeoX rotation (halves) after the
    per-head q / k norms; for ``gemma3``, NeoX rotation, embeddings scaled by sqrt(hidden), q / k norms, a norm after
    attention and around the MLP, GELU (tanh), queries scaled by 1 / sqrt(head_dim), every sixth layer global
    (rope base from the file) and the others local (base 10000, sliding window); the output tied to token_embd
    when there is no output tensor."""
    r = gguf.GGUFReader(path)
    f = _fields(r)
    T = {t.name: _tensor(t) for t in r.tensors}
    arch = f["general.architecture"]
    n_layer, n_head, n_kv = f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"], \
        f[f"{arch}.attention.head_count_kv"]
    eps, base = f[f"{arch}.attention.layer_norm_rms_epsilon"], f[f"{arch}.rope.freq_base"]
    d = f[f"{arch}.rope.dimension_count"]
    window = f.get(f"{arch}.attention.sliding_window")

    def rope_tables(theta):
        freqs = 1.0 / theta ** (np.arange(0, d, 2) / d)
        if "rope_freqs.weight" in T:
            freqs = freqs / T["rope_freqs.weight"]
        ang = np.arange(ids.shape[1])[:, None] * freqs[None]  # [T, d/2]
        return np.cos(ang), np.sin(ang)

    def rope(x, tables):  # [T, h, d]
        cos, sin = tables
        if arch == "llama":  # pairs (2i, 2i+1)
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
            out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
            return out
        a, b = x[..., : d // 2], x[..., d // 2:]  # NeoX: (i, i + d/2)
        return np.concatenate([a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]], -1)

    glob, local = rope_tables(base), rope_tables(10000.0)
    outs = []
    for row in ids:
        x = T["token_embd.weight"][row].astype(np.float64)  # [T, H]
        n = x.shape[0]
        if arch == "gemma3":
            x = x * np.sqrt(x.shape[1])
        for i in range(n_layer):
            b = f"blk.{i}."
            is_local = arch == "gemma3" and (i + 1) % 6 != 0
            h = _rms(x, T[b + "attn_norm.weight"], eps)
            q = (h @ T[b + "attn_q.weight"].T).reshape(n, n_head, d)
            k = (h @ T[b + "attn_k.weight"].T).reshape(n, n_kv, d)
            if b + "attn_q_norm.weight" in T:
                q, k = _rms(q, T[b + "attn_q_norm.weight"], eps), _rms(k, T[b + "attn_k_norm.weight"], eps)
            q, k = rope(q, local if is_local else glob), rope(k, local if is_local else glob)
            v = (h @ T[b + "attn_v.weight"].T).reshape(n, n_kv, d)
            rep = n_head // n_kv
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
            mask = np.triu(np.full((n, n), -np.inf), 1)
            if is_local and window:
                mask = mask + np.tril(np.full((n, n), -np.inf), -window)
            s = s + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", p, v).reshape(n, n_head * d) @ T[b + "attn_output.weight"].T
            if arch == "gemma3":
                a = _rms(a, T[b + "post_attention_norm.weight"], eps)
            x = x + a
            h = _rms(x, T[b + "ffn_norm.weight"], eps)
            g = h @ T[b + "ffn_gate.weight"].T
            if arch == "gemma3":
                act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            else:
                act = g / (1 + np.exp(-g))
            m = (act * (h @ T[b + "ffn_up.weight"].T)) @ T[b + "ffn_down.weight"].T
            if arch == "gemma3":
                m = _rms(m, T[b + "post_ffw_norm.weight"], eps)
            x = x + m
        x = _rms(x, T["output_norm.weight"], eps)
        outs.append(x @ T.get("output.weight", T["token_embd.weight"]).T)
    return np.stack(outs), r, f, T


#: relative RMS error of a dequantized weight per GGML type (Gaussian-like weights): bounds a few times above what
#: the formats reach (Q4 ~ 0.09, Q5 ~ 0.045, Q6_K ~ 0.02, Q8_0 ~ 0.005), far below what a wrong layout gives (~1)
REL_RMS = {"Q4_0": 0.15, "Q4_K": 0.12, "Q5_0": 0.08, "Q5_1": 0.08, "Q5_K": 0.06, "Q6_K": 0.04, "Q8_0": 0.01}


@pytest.mark.parametrize("quant, rope, tie, wide, tol", [
    ("f16", "llama3", False, False, 5e-3),  # fp16 weights: ~2^-11 relative per weight
    ("bf16", "default", True, False, 3e-2),  # bf16: ~2^-8
    ("q8_0", "default", False, False, 3e-2),  # 8-bit blocks: |err| <= d/2 = max|w| / 254 per block
    # the random model amplifies per-weight error about 6x into its logits (q8_0: 0.5 % -> 3 %), so 4-bit weights
    # (~9 % each) give ~40 %, 5-bit ~20 %, 6-bit ~11 %; the per-tensor checks below are the tight ones
    ("q4_k_m", "llama3", False, True, 0.6),
    ("q5_k_m", "default", True, True, 0.35),
    ("q6_k", "default", False, True, 0.2),
    ("q4_0", "default", False, False, 0.6),
])
def test_gguf_round_trip(tok, tmp_path, quant, rope, tie, wide, tol):
    model = with_lora(tiny_llama(tok, rope=rope, tie=tie, wide=wide))
    path = sloth.save_gguf(model, str(tmp_path / f"model-{quant}.gguf"), quant=quant, tokenizer=tok)
    ids = ids_of(tok)
    want = logits(model, ids).numpy()
    got, reader, f, T = _gguf_forward(path, ids.numpy())
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()

    # metadata
    cfg = model.get_base_model().config
    hidden, ffn = (256, 512) if wide else (64, 96)
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == hidden and \
        f["llama.feed_forward_length"] == ffn
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.context_length"] == 128 and f["llama.rope.dimension_count"] == hidden // 4
    assert f["llama.vocab_size"] == len(tok)
    ftype = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M",
             "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K", "q4_0": "MOSTLY_Q4_0"}[quant]
    assert f["general.file_type"] == getattr(gguf.LlamaFileType, ftype)
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == len(tok)
    assert f["tokenizer.ggml.tokens"][tok.eos_token_id] == tok.eos_token
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert len(f["tokenizer.ggml.merges"]) > 100 and f["tokenizer.chat_template"] == tok.chat_template
    assert ("output.weight" in T) != tie and ("rope_freqs.weight" in T) == (rope == "llama3")

    # tensors: every merged weight, in GGML's layout, within the format's rounding, in llama-quantize's type
    state = merged_state_dict(model, torch.float32)
    names = sloth.export.gguf.gguf_tensor_names(cfg)
    by_name = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    for hf, w in state.items():
        t = by_name[names[hf]]
        assert tuple(int(x) for x in t.shape) == tuple(reversed(w.shape)), hf  # GGUF lists ne0 (columns) first
        v = torch.from_numpy(_tensor(t).reshape(w.shape).copy())
        if "q_proj" in hf:
            v = interleaved_to_rope(v, 4)
        elif "k_proj" in hf:
            v = interleaved_to_rope(v, 2)
        if w.dim() == 1:
            assert t.tensor_type == Q.F32 and torch.equal(v, w), hf
        elif quant == "f16":
            assert t.tensor_type == Q.F16 and torch.equal(v, w.half().float()), hf
        elif quant == "bf16":
            assert t.tensor_type == Q.BF16 and torch.equal(v, w.bfloat16().float()), hf
        elif quant == "q8_0":
            assert t.tensor_type == Q.Q8_0
            # |x - d16 q| <= |x - d q| + |d - d16| |q| <= d / 2 + 127 d 2^-11 (d = max|x| / 127 rounded to fp16;
            # plus fp16's subnormal spacing 2^-24 / 2 for tiny scales)
            d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            bound = d * (0.5 + 127 * 2 ** -11) + 127 * 2 ** -25
            assert ((v - w).reshape(-1, 32).abs() <= bound).all(), hf
        else:
            rel = float((v - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
            assert rel < REL_RMS[t.tensor_type.name], (hf, t.tensor_type.name, rel)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if quant == "q4_k_m":  # llama-quantize's Q4_K_M mix (2 layers: layer 1 is in the last eighth)
        assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q4_K"
        assert types["blk.1.attn_v.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    if quant == "q5_k_m":  # tied: the embedding takes the output's Q6_K
        assert types["token_embd.weight"] == "Q6_K" and types["blk.0.ffn_up.weight"] == "Q5_K"
    if quant == "q4_0":  # hidden 64: rows fit Q4_0's blocks of 32; the head's rows do not fit Q6_K's 256: Q8_0
        assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    mf = open(tmp_path / "Modelfile").read()
    assert mf.startswith(f"FROM ./model-{quant}.gguf") and 'TEMPLATE """' in mf
    assert f'PARAMETER stop "{tok.eos_token}"' in mf


def test_tensor_type_rules():
    """llama-quantize's choices: use_more_bits layers, the head, fallbacks for rows that do not fit 256 / 32."""
    from sloth.export.gguf import tensor_type, use_more_bits

    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.6.attn_v.weight", (1024, 4096), "q4_k_m", 32) == "Q6_K"
    assert tensor_type("blk.7.attn_v.weight", (1024, 4096), "q4_k_m", 32) == "Q4_K"
    assert tensor_type("blk.7.attn_v.weight", (1024, 4096), "q6_k", 32) == "Q6_K"
    assert tensor_type("blk.7.ffn_down.weight", (4096, 14336), "q5_k_m", 32) == "Q5_K"
    assert tensor_type("blk.0.ffn_down.weight", (4096, 14336), "q5_k_m", 32) == "Q6_K"
    assert tensor_type("output.weight", (128256, 4096), "q4_0", 32) == "Q6_K"
    assert tensor_type("output.weight", (128256, 4096), "q8_0", 32) == "Q8_0"
    assert tensor_type("token_embd.weight", (128256, 4096), "q4_k_m", 32, tied=True) == "Q6_K"
    assert tensor_type("blk.7.attn_q.weight", (4096, 4160), "q4_k_m", 32) == "Q5_0"  # 4160 % 256 != 0
    assert tensor_type("blk.7.attn_q.weight", (64, 48), "q4_k_m", 32) == "F16"  # not even a multiple of 32
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", 32) == "F32"


# ------------------------------------------------------------------------- k-quants against llama.cpp's reference

def _nearest_int(v):
    return int(np.rint(np.float32(v)))  # round half to even, as llama.cpp's nearest_int


def _ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """llama.cpp's make_qkx2_quants, line by line in fp32 (sequential sums)."""
    f = np.float32
    n = len(x)
    mn, mx = f(x[0]), f(x[0])
    sum_w, sum_x = f(w[0]), f(w[0] * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = f(sum_w + w[i])
        sum_x = f(sum_x + f(w[i] * x[i]))
    mn = min(mn, f(0))
    if mx == mn:
        return f(0), f(-mn), [0] * n
    iscale = f(f(nmax) / f(mx - mn))
    scale = f(f(1) / iscale)
    L = [max(0, min(nmax, _nearest_int(f(iscale * f(x[i] - mn))))) for i in range(n)]
    best = f(0)
    for i in range(n):
        diff = f(f(f(scale * L[i]) + mn) - x[i])
        best = f(best + f(w[i] * f(diff * diff)))
    for s in range(nstep + 1):
        iscale = f(f(f(rmin + f(f(rdelta) * s)) + nmax) / f(mx - mn))
        la, sl, sl2, sxl = [], f(0), f(0), f(0)
        for i in range(n):
            q = max(0, min(nmax, _nearest_int(f(iscale * f(x[i] - mn)))))
            la.append(q)
            sl = f(sl + f(w[i] * q))
            sl2 = f(sl2 + f(f(w[i] * q) * q))
            sxl = f(sxl + f(f(w[i] * q) * x[i]))
        det = f(f(sum_w * sl2) - f(sl * sl))
        if det > 0:
            this_scale = f(f(f(sum_w * sxl) - f(sum_x * sl)) / det)
            this_min = f(f(f(sl2 * sum_x) - f(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = f(0), f(sxl / sl2)
            err = f(0)
            for i in range(n):
                diff = f(f(f(this_scale * la[i]) + this_min) - x[i])
                err = f(err + f(w[i] * f(diff * diff)))
            if err < best:
                L, best, scale, mn = la, err, this_scale, this_min
    return scale, f(-mn), L


def _ref_q45_k(block, bits):
    """llama.cpp's quantize_row_q4_K_ref / q5_K_ref for one block of 256: the block's bytes."""
    f = np.float32
    nmax = (1 << bits) - 1
    scales, mins, L = [], [], []
    for j in range(8):
        x = block[32 * j: 32 * j + 32]
        sum_x2 = f(0)
        for v in x:
            sum_x2 = f(sum_x2 + f(v * v))
        av = np.sqrt(f(sum_x2 / f(32)), dtype=np.float32)
        w = [f(av + abs(v)) for v in x]
        sc, m, q = _ref_make_qkx2(x, w, nmax, f(-1.0) if bits == 4 else f(-0.5), f(0.1), 20 if bits == 4 else 15)
        scales.append(sc), mins.append(m), L.extend(q)
    max_scale, max_min = max(scales), max(mins)
    inv_s = f(f(63) / max_scale) if max_scale > 0 else f(0)
    inv_m = f(f(63) / max_min) if max_min > 0 else f(0)
    ls = [min(63, _nearest_int(f(inv_s * s))) for s in scales]
    lm = [min(63, _nearest_int(f(inv_m * m))) for m in mins]
    sc = [0] * 12
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    d16, dmin16 = np.float16(max_scale / f(63)), np.float16(max_min / f(63))
    for j in range(8):
        d = f(f(d16) * ls[j])
        if d == 0:
            continue
        dm = f(f(dmin16) * lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _nearest_int(f(f(block[32 * j + i] + dm) / d))))
    out = bytearray(np.array([d16, dmin16], dtype=np.float16).tobytes()) + bytes(sc)
    if bits == 5:
        qh = [0] * 32
        for c in range(4):
            for i in range(32):
                qh[i] |= (L[64 * c + i] >> 4) << (2 * c) | (L[64 * c + 32 + i] >> 4) << (2 * c + 1)
        out += bytes(qh)
    for c in range(4):
        out += bytes(((L[64 * c + i] & 0xF) | ((L[64 * c + 32 + i] & 0xF) << 4)) for i in range(32))
    return bytes(out)


def _ref_make_qx(x, nmax):
    """llama.cpp's make_qx_quants with rmse_type 1 (weights x^2), line by line in fp32."""
    f = np.float32
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < 1e-15:
        return f(0), [0] * len(x)
    iscale = f(f(-nmax) / mx)

    def grid(isc):
        ls, slx, sl2 = [], f(0), f(0)
        for v in x:
            q = max(-nmax, min(nmax - 1, _nearest_int(f(isc * v))))
            ls.append(q)
            w = f(v * v)
            slx = f(slx + f(f(w * v) * q))
            sl2 = f(sl2 + f(f(w * q) * q))
        return ls, slx, sl2

    ls, slx, sl2 = grid(iscale)
    scale = f(slx / sl2) if sl2 else f(0)
    best = f(scale * slx)
    L = [q + nmax for q in ls]
    for s in range(-9, 10):
        if s == 0:
            continue
        ls, slx, sl2 = grid(f(-f(f(nmax) + f(f(0.1) * s)) / mx))
        if sl2 > 0 and f(slx * slx) > f(best * sl2):
            L = [q + nmax for q in ls]
            scale = f(slx / sl2)
            best = f(scale * slx)
    return scale, L


def _ref_q6_k(block):
    """llama.cpp's quantize_row_q6_K_ref for one block of 256: the block's bytes."""
    f = np.float32
    scales, L = [], []
    for j in range(16):
        sc, q = _ref_make_qx(block[16 * j: 16 * j + 16], 32)
        scales.append(sc), L.extend(q)
    max_scale, max_abs = f(0), f(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < 1e-15:
        return bytes(210)
    iscale = f(f(-128) / max_scale)
    d16 = np.float16(f(1) / iscale)
    sq = [min(127, _nearest_int(f(iscale * s))) for s in scales]
    for j in range(16):
        d = f(f(d16) * sq[j])
        if d == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(f(block[16 * j + i] / d)))) + 32
    ql, qh = [], []
    for h in range(2):
        base = 128 * h
        ql += [(L[base + i] & 0xF) | ((L[base + 64 + i] & 0xF) << 4) for i in range(32)]
        ql += [(L[base + 32 + i] & 0xF) | ((L[base + 96 + i] & 0xF) << 4) for i in range(32)]
        qh += [(L[base + i] >> 4) | ((L[base + 32 + i] >> 4) << 2) | ((L[base + 64 + i] >> 4) << 4) |
               ((L[base + 96 + i] >> 4) << 6) for i in range(32)]
    return bytes(ql) + bytes(qh) + np.array(sq, dtype=np.int8).tobytes() + np.float16(d16).tobytes()


def _kquant_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 30.0, 0.02, 0.02])[:, None]
    x[4] = x[4].abs() + 0.01  # all positive: the min clamps to 0
    x[5, :64] = 0  # zero sub-blocks
    x[5, 100] = 5.0  # an outlier
    return x


@pytest.mark.parametrize("name, quantize, ref, qtype", [
    ("q4_k", quantize_q4_k, lambda b: _ref_q45_k(b, 4), "Q4_K"),
    ("q5_k", quantize_q5_k, lambda b: _ref_q45_k(b, 5), "Q5_K"),
    ("q6_k", quantize_q6_k, _ref_q6_k, "Q6_K"),
])
def test_kquants_match_llama_cpp_reference(name, quantize, ref, qtype):
    """sloth's vectorized k-quants give the bytes of llama.cpp's reference quantizer (transcribed above: fp32,
    sequential sums), except where the reference's fp32 least-squares determinant cancels (sloth sums in fp64) and
    the grid search takes another path: there, by gguf's own dequantizer, sloth's weighted error (what the search
    minimizes) is within 1 % of the reference's (the search picks before the scales are rounded to 6 bits, so its
    better pick can end a few tenths of a percent worse; seen: +0.25 % on one row of six)."""
    x = _kquant_inputs()
    ours = quantize(x)
    Q = gguf.GGMLQuantizationType[qtype]
    assert ours.shape == (6, gguf.GGML_QUANT_SIZES[Q][1])
    same = 0
    for r in range(6):
        want = np.frombuffer(ref(x[r].numpy()), dtype=np.uint8)
        if np.array_equal(ours[r], want):
            same += 1
            continue
        v = x[r].numpy().astype(np.float64)
        if qtype == "Q6_K":  # the weights each search minimizes: x^2 (Q6_K), sqrt(mean x^2) + |x| per 32 (Q4/5_K)
            w = v * v
        else:
            w = (np.sqrt((v.reshape(8, 32) ** 2).mean(1, keepdims=True)) + np.abs(v.reshape(8, 32))).reshape(-1)
        err_ours = (w * np.square(gguf.quants.dequantize(ours[r], Q) - v)).sum()
        err_ref = (w * np.square(gguf.quants.dequantize(want, Q) - v)).sum()
        assert err_ours <= 1.01 * err_ref, (r, err_ours, err_ref)
    assert same >= 4, same  # of six rows (seen: all six for q6_k, five for q5_k, four for q4_k)
    deq = gguf.quants.dequantize(ours, Q)
    rel = np.sqrt(np.square(deq - x.numpy()).mean(1) / np.square(x.numpy()).mean(1))
    assert (rel[:4] < REL_RMS[qtype] * 0.8).all(), rel  # gaussian rows at four magnitudes
    assert (deq[5, :64] == 0).all()


def test_kquants_reject_bad_rows():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(torch.randn(2, 128))
    x = torch.randn(1, 256)
    x[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_q6_k(x)


def test_gguf_package_quants_used_for_q8_0_and_q4_0():
    from sloth.export.gguf import encode

    x = torch.randn(5, 128) * torch.logspace(-3, 2, 5)[:, None]
    for t in ("Q8_0", "Q4_0"):
        data, raw = encode(x, t)
        assert raw == gguf.GGMLQuantizationType[t]
        assert np.array_equal(data, gguf.quants.quantize(x.numpy(), raw))


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


def test_gguf_rejects_what_it_cannot_write(tok, tmp_path):
    """Every exporter limit is a one-line ValueError from check_exportable, before anything is written."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GGUF export supports Llama, Qwen3, Mistral, Gemma 3"):
        sloth.save_gguf(gpt2, str(tmp_path / "g.gguf"), tokenizer=tok)
    for kw, words in ((dict(attention_bias=True), "attention biases"), (dict(mlp_bias=True), "MLP biases")):
        cfg = tiny_llama(tok).config
        for k, v in kw.items():
            setattr(cfg, k, v)
        with pytest.raises(ValueError, match=words):
            sloth.export.gguf.check_exportable(cfg)
    cfg = tiny_llama(tok).config
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        sloth.export.gguf.check_exportable(cfg)
    with pytest.raises(ValueError, match="quant"):
        sloth.save_gguf(tiny_llama(tok), str(tmp_path / "q.gguf"), quant="q4_k", tokenizer=tok)
    assert not list(tmp_path.iterdir())


def small_family(family, tok, seed=0):
    """A 2-layer Qwen3 or 12-layer Gemma 3 text model as llama.cpp's architectures expect them (hidden 256)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(num_hidden_layers=2, tie_word_embeddings=False, **common)
    else:  # llama.cpp's Gemma 3: every sixth layer global, queries scaled by 1 / sqrt(head_dim)
        cfg = transformers.Gemma3TextConfig(num_hidden_layers=6, sliding_window=16, query_pre_attn_scalar=64,
                                            final_logit_softcapping=None, **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.1 if "norm" in name else 0.05) * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_gguf_qwen3_and_gemma3(tok, tmp_path, family):
    """Qwen3 / Gemma 3 in their own llama.cpp architectures: tensor names (q / k norms, Gemma's four norms), NeoX
    RoPE (no row reordering), Gemma's norms stored as 1 + w, head dimension, rope base, sliding window; a NumPy
    forward of the architecture over the f16 file gives the model's logits; the f16 file carries the merged
    weights exactly (fp16 rounding), the q4_k_m file within 4-bit error."""
    model = with_lora(small_family(family, tok))
    lm = model.get_base_model()
    arch = "qwen3" if family == "qwen3" else "gemma3"
    a = sloth.save_gguf(model, str(tmp_path / "f16" / "m.gguf"), quant="f16", tokenizer=tok)
    ids = ids_of(tok)
    want = logits(model, ids).numpy()
    got = _gguf_forward(a, ids.numpy())[0]  # llama.cpp's view of the file gives the model's logits (fp16 weights)
    assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
    b = sloth.save_gguf(model, str(tmp_path / "q4" / "m.gguf"), quant="q4_k_m", tokenizer=tok)
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    f = _fields(ra)
    assert f["general.architecture"] == arch
    assert f[f"{arch}.attention.key_length"] == 64 and f[f"{arch}.attention.value_length"] == 64
    assert f[f"{arch}.block_count"] == lm.config.num_hidden_layers and f[f"{arch}.embedding_length"] == 256
    assert f[f"{arch}.attention.head_count"] == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    theta = sloth.export.gguf._rope(lm.config)[0]
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    if family == "gemma3":
        assert f["gemma3.attention.sliding_window"] == 16 and theta == 1e6
    names = {t.name for t in ra.tensors}
    want = {"token_embd.weight", "output_norm.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight",
            "blk.1.ffn_down.weight"}
    if family == "gemma3":  # tied head; sandwich norms
        want |= {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"}
        assert "output.weight" not in names
    else:
        want |= {"output.weight", "blk.0.ffn_norm.weight"}
    assert want <= names, want - names
    state = merged_state_dict(model, torch.float32)
    gnames = sloth.export.gguf.gguf_tensor_names(lm.config)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    for hf, w in state.items():
        va = torch.from_numpy(_tensor(ta[gnames[hf]]).reshape(w.shape).copy())
        vb = torch.from_numpy(_tensor(tb[gnames[hf]]).reshape(w.shape).copy())
        shift = 1.0 if family == "gemma3" and hf.endswith("norm.weight") else 0.0
        if w.dim() == 1:
            assert torch.equal(va, w + shift) and torch.equal(vb, w + shift), hf
        else:
            assert torch.equal(va, w.half().float()), hf  # no row reordering: NeoX RoPE
            rel = float((vb - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
            assert rel < REL_RMS[tb[gnames[hf]].tensor_type.name], (hf, rel)


def test_gemma3_layout_llama_cpp_cannot_run_is_refused(tok):
    cfg = small_family("gemma3", tok).config
    cfg.layer_types = ["sliding_attention", "full_attention"] * 3
    with pytest.raises(ValueError, match="every 6th layer global"):
        sloth.export.gguf.check_exportable(cfg)
    cfg = small_family("gemma3", tok).config
    cfg.query_pre_attn_scalar = 256
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        sloth.export.gguf.check_exportable(cfg)


# ------------------------------------------------------------------------------------- hardening of the writers

def test_save_merged_never_replaces_the_base_model(tok, tmp_path):
    """The folder the model was loaded from is refused even with overwrite=True, and its weights stay; a folder
    with other files needs overwrite=True."""
    base_dir = tmp_path / "base"
    tiny_llama(tok).save_pretrained(base_dir)
    before = (base_dir / "model.safetensors").read_bytes()
    model = with_lora(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="base weights"):
            sloth.save_merged(model, str(base_dir), tokenizer=tok, overwrite=overwrite)
    assert (base_dir / "model.safetensors").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        sloth.save_merged(model, str(other))
    sloth.save_merged(model, str(other), overwrite=True, dtype="fp32")
    assert (other / "notes.txt").read_text() == "mine" and (other / "model.safetensors").is_file()


def test_writes_replace_symlinks_instead_of_following_them(tok, tmp_path):
    """A symbolic link planted where save_merged / save_gguf / the Modelfile write is replaced by the new file; the
    file it pointed at is untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    model = with_lora(tiny_llama(tok))
    out = tmp_path / "m"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(outside, out / name)
    sloth.save_merged(model, str(out), tokenizer=tok, overwrite=True)
    g = tmp_path / "g"
    g.mkdir()
    for name in ("m.gguf", "Modelfile"):
        os.symlink(outside, g / name)
    sloth.save_gguf(model, str(g / "m.gguf"), quant="f16", tokenizer=tok)
    assert outside.read_text() == "precious"
    for p in (out / "config.json", out / "model.safetensors", out / "tokenizer.json", g / "m.gguf", g / "Modelfile"):
        assert p.is_file() and not p.is_symlink(), p


def test_modelfile_template_with_triple_quotes_cannot_break_out(tok, tmp_path):
    """A chat template whose text holds \"\"\" would end the Modelfile's TEMPLATE string and let the rest inject
    Modelfile lines; the quotes are written as Go actions instead, and the template still renders the same."""
    from sloth.export.modelfile import chat_wrappers, go_template, write_modelfile

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\"\"\"\\nFROM /etc/passwd\\n' + m['content'] + "
                       "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\"\"\"\\n"
                       "FROM /etc/passwd\\n' }}{% endif %}")
    path = write_modelfile(str(tmp_path / "m.gguf"), t)
    text = open(path).read()
    assert text.count('"""') == 2, text  # the opening and the closing of TEMPLATE, nothing else
    before, inside, after = text.split('"""')
    assert "FROM /etc" not in before + after and "FROM /etc" in inside  # the injected line stays template text
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    w = chat_wrappers(t)
    rendered = render_go(go_template(w), conv).replace('{{ "\\x22" }}', '"').replace('{{ "{{" }}', "{{")
    assert rendered == t.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


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


def test_modelfile_stop_with_a_line_break_is_left_out(tmp_path):
    """A stop text holding a line break would start a new Modelfile instruction; it is not written."""
    from types import SimpleNamespace

    from sloth.export.modelfile import write_modelfile

    tok = SimpleNamespace(chat_template=None, eos_token='</s>\nSYSTEM "you are pwned"')
    text = open(write_modelfile(str(tmp_path / "m.gguf"), tok)).read()
    assert not any(line.startswith("SYSTEM") for line in text.splitlines()) and "PARAMETER stop" not in text
    tok.eos_token = '<end "quoted">'
    assert 'PARAMETER stop "<end \\"quoted\\">"' in open(write_modelfile(str(tmp_path / "m.gguf"), tok)).read()


# ------------------------------------------------------------- SentencePiece-style tokenizers (Gemma 3, Llama 2)

def _llama_cpp_spm_tokenize(text, tokens, scores, types, add_space_prefix):
    """llama.cpp's SentencePiece tokenizer over a GGUF vocabulary: characters as symbols, the adjacent pair whose
    concatenation is a token with the highest score merged first (the leftmost on ties), then every symbol that is
    not a token written as its UTF-8 bytes' <0xXX> tokens."""
    import heapq

    ids = {t: i for i, t in enumerate(tokens)}
    text = ("\u2581" if add_space_prefix else "") + text.replace(" ", "\u2581")
    sym = list(text)
    alive = [True] * len(sym)
    nxt = list(range(1, len(sym))) + [-1]
    prv = [-1] + list(range(len(sym) - 1))
    heap = []

    def push(left):
        right = nxt[left] if left >= 0 else -1
        if left < 0 or right < 0:
            return
        t = ids.get(sym[left] + sym[right])
        if t is not None and types[t] == gguf.TokenType.NORMAL:
            heapq.heappush(heap, (-scores[t], left, sym[left], sym[right]))

    for i in range(len(sym) - 1):
        push(i)
    while heap:
        _, left, ltext, rtext = heapq.heappop(heap)
        right = nxt[left]
        if not alive[left] or right < 0 or sym[left] != ltext or sym[right] != rtext:
            continue
        sym[left] += sym[right]
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left])
        push(left)
    out, i = [], 0
    while i >= 0:
        if sym[i] in ids:
            out.append(ids[sym[i]])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8"))
        i = nxt[i]
    return out


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A SentencePiece BPE model (byte fallback, no dummy prefix: Gemma's settings) trained on the bundled data,
    and the Hugging Face fast tokenizer of it (tokenizer.json: BPE with byte fallback, spaces as ``▁``), built as
    Transformers' converter does (merges from the pieces, ranked by score)."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer, decoders, models, normalizers

    from sloth.finetune.data import bundled_data_path

    d = tmp_path_factory.mktemp("spm")
    texts = [v for line in open(bundled_data_path()) for v in json.loads(line).values() if isinstance(v, str) and v]
    (d / "corpus.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "m.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        merges += sorted(((piece[:k], piece[k:]) for k in range(1, len(piece))
                          if piece[:k] in vocab and piece[k:] in vocab), key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return sp, tok


def test_sentencepiece_style_vocab_tokenizes_like_sentencepiece(spm_tokenizer, tmp_path):
    """A SentencePiece-style tokenizer goes into the GGUF as llama.cpp's ``llama`` model: pieces, scores (minus the
    id for normal pieces), types (byte, control, unknown); llama.cpp's merge-by-score over them gives the ids
    SentencePiece itself gives (texts with words, digits, punctuation, and characters outside the vocabulary)."""
    sp, tok = spm_tokenizer
    model = small_family("gemma3", tok)
    path = sloth.save_gguf(model, str(tmp_path / "g.gguf"), quant="f16", tokenizer=tok)
    f = _fields(gguf.GGUFReader(path))
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is False
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE and types[3] == gguf.TokenType.UNKNOWN
    assert types[1] == gguf.TokenType.CONTROL and "tokenizer.ggml.merges" not in f
    for text in ("The capital of Peru is Lima.", "Convert 30 kilograms to grams, then add 12.",
                 "Reverse the string: lantern", "naïve café — 東京 ✓"):
        want = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == want, text  # the HF form is faithful
        assert _llama_cpp_spm_tokenize(text, tokens, scores, types, False) == want, text


# ------------------------------------------------------------------ llama.cpp itself (opt-in: llama-cpp-python)

@pytest.mark.slow
@pytest.mark.parametrize("family, quant", [("llama", "f16"), ("llama", "q4_k_m"), ("llama", "q5_k_m"),
                                           ("llama", "q6_k"), ("qwen3", "f16"), ("qwen3", "q4_k_m"),
                                           ("gemma3", "f16"), ("gemma3", "q4_k_m"), ("gemma3-spm", "q8_0")])
def test_llama_cpp_reads_the_files_as_written(tok, request, tmp_path, family, quant):
    """llama.cpp (llama-cpp-python; not in CI) loads each file, tokenizes text as the Hugging Face tokenizer does,
    and its logits equal the NumPy forward of the architecture over the dequantized tensors. llama.cpp rounds the
    activations to fp16 for f16 matmuls (1 % of the largest logit here) and to 8 bits per block for quantized ones,
    which these random models amplify about 6x into the logits (measured: 2-4 %; bound 6 %); a wrong layout,
    norm or rotation gives errors of the order of the logits themselves."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if family == "llama":
        model, t = with_lora(tiny_llama(tok, rope="llama3", wide=True)), tok
    elif family == "gemma3-spm":
        t = request.getfixturevalue("spm_tokenizer")[1]
        model = small_family("gemma3", t)
    else:
        model, t = with_lora(small_family(family, tok)), tok
    path = sloth.save_gguf(model, str(tmp_path / f"m-{quant}.gguf"), quant=quant, tokenizer=t)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    text = "The capital of Peru is Lima. Convert 30 kilograms to grams."
    want_ids = t(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want_ids
    ids = want_ids[:12]
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # [T, V]
    want = _gguf_forward(path, np.asarray([ids]))[0][0]
    tol = 0.01 if quant == "f16" else 0.06
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
