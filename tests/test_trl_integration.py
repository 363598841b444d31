"""TRL on sloth (CPU, fp32, tiny random Llama + the bundled BPE tokenizer): sloth's fused LM head gives TRL's
log-probs / entropies / metrics and gradients; SFT (padded, padding-free, response-only, exact gradient
accumulation), DPO and GRPO run on a sloth-patched PeftModel."""

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import sloth  # noqa: E402
from sloth.finetune.model import build_tiny_llama  # noqa: E402
from sloth.integrations import fused_head  # noqa: E402
from sloth.integrations import trl as strl  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QA = [("What is 2 + 2?", "4"), ("What is the capital of Peru?", "Lima"), ("Reverse the word star.", "rats"),
      ("Name a primary color.", "Blue")]


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(tok, seed=0, patch=True):
    """A PeftModel over the tiny Llama with a live LoRA branch (B != 0), sloth-patched unless patch=False."""
    base = build_tiny_llama(tok, seed=1)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return sloth.patch(model) if patch else model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def batch(tok, n=3, t=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok), (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt
    return ids, mask, labels


def sft_args(tmp_path, **kw):
    d = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
             logging_steps=1, max_length=64, seed=0, bf16=False)
    d.update(kw)
    return trl.SFTConfig(**d)


def chat_rows(k=1):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * k


# ------------------------------------------------------------------------------------ log-probs and the head

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_matches_trl(tok, temperature):
    """sloth's head vs TRL's on the same PeftModel: every per-token output, the loss and the LoRA gradients."""
    outputs = fused_head.HEAD_OUTPUTS
    ref = lora_model(tok, patch=False)
    ours = copy.deepcopy(ref)
    trl_add_fused_lm_head(ref.get_base_model(), temperature=temperature, outputs=outputs)
    sloth.patch(ours)
    fused_head.add_fused_lm_head(ours.get_base_model(), temperature=temperature, outputs=outputs)
    ids, mask, labels = batch(tok)
    res = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=11)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        res.append((out, lora_grads(m)))
    (a, ga), (b, gb) = res
    assert b.label_mask.equal(a.label_mask) and b.is_top1.equal(a.is_top1)
    for k in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), rtol=1e-5, atol=1e-5, msg=k)
    assert (b.log_probs[~b.label_mask] == 0).all() and (b.entropy[~b.label_mask] == 0).all()
    assert ga.keys() == gb.keys() and len(ga) == 4 * len(TARGETS) * 2  # 4 layers, A and B
    for n in ga:
        assert rel_err(gb[n], ga[n]) <= 1e-4, n
    # without fused_lm_head: sloth's own forward (the loss through sloth.causal_lm_loss, no logits)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and torch.isfinite(out.loss)


def test_selective_logprobs_matches_trl(tok):
    from trl.trainer.utils import selective_log_softmax

    model = lora_model(tok)
    ids, mask, _ = batch(tok)
    k = 6
    comp = torch.ones(ids.shape[0], k, dtype=torch.long)
    comp[0, -2:] = 0
    sloth.unpatch(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        want = selective_log_softmax(logits[:, -k - 1:-1] / 0.9, ids[:, -k:])
        with model.disable_adapter():
            ref_logits = model(input_ids=ids, attention_mask=mask).logits
        want_ref = selective_log_softmax(ref_logits[:, :-1], ids[:, 1:])
    sloth.patch(model)
    with torch.no_grad():
        got, ent = strl.selective_logprobs(model, ids, mask, logits_to_keep=k, completion_mask=comp, temperature=0.9,
                                           return_entropy=True)
        got_ref = strl.selective_logprobs(model, ids, mask, reference=True)
    keep = comp.bool() & mask[:, -k:].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert (got[~keep] == 0).all() and (ent[~keep] == 0).all() and (ent[keep] > 0).all()
    m = mask[:, 1:].bool()
    torch.testing.assert_close(got_ref[m], want_ref[m], rtol=1e-5, atol=1e-5)
    assert (got_ref[m] - strl.selective_logprobs(model, ids, mask)[m]).abs().max() > 1e-4  # the adapter matters
    # differentiable: the policy log-probs of an RL loss
    lp = strl.selective_logprobs(model, ids, mask, logits_to_keep=k)
    lp.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_padding_free_rows_do_not_attend_across_examples(tok):
    """TRL's padding-free collator packs examples into one row with restarting position_ids and no attention
    mask; Transformers then builds a block-diagonal causal mask (SDPA / eager), so each example's log-probs
    through sloth's head equal those of the example alone."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = lora_model(tok)
    fused_head.add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(10, len(tok), (n,), generator=g).tolist()} for n in (9, 5, 12)]
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, 26)
    with torch.no_grad():
        row = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                    fused_lm_head=True).log_probs[0]  # [25]
        start = 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            alone = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs[0]  # [n - 1]
            n = ids.shape[1]
            torch.testing.assert_close(row[start:start + n - 1], alone, rtol=1e-5, atol=1e-5)
            if start + n - 1 < row.shape[0]:
                assert row[start + n - 1] == 0  # the first token of the next example is not predicted
            start += n


# ----------------------------------------------------------------------------------------------------- SFT

@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_decreases(tok, tmp_path, packing):
    """A memorizable dataset: padded batches, or packed rows (BFD packing: padding-free, position_ids restart)."""
    model = lora_model(tok)
    ds = datasets.Dataset.from_list(chat_rows(2))
    bs = 1 if packing else 4  # one packed row holds all 8 conversations
    trainer = trl.SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=16, per_device_train_batch_size=bs,
                                                       learning_rate=5e-3, packing=packing, max_length=256),
                             train_dataset=ds, processing_class=tok)
    if packing:
        b = trainer.data_collator([trainer.train_dataset[0]])
        assert "attention_mask" not in b and int((b["position_ids"] == 0).sum()) > 1  # several examples in a row
    st = trainer.model.get_base_model().__dict__.get("_sloth_fused_head")
    assert st is not None and st.outputs == ("log_probs", "entropy", "is_top1")  # the hook gave sloth's head
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 2.0, losses
    assert trainer.state.log_history[-2]["mean_token_accuracy"] > 0.5


def _one_sgd_step(tok, tmp_path, **kw):
    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ds = datasets.Dataset.from_list(chat_rows(1))  # 4 conversations of different lengths
    args = sft_args(tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                    lr_scheduler_type="constant", **kw)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}  # = the gradient


def test_sft_gradient_accumulation_is_exact(tok, tmp_path):
    """One SGD step on the same 4 examples: one padded batch of 4 == 4 micro-batches of 1 (TRL divides the summed
    token log-probs by num_items_in_batch, the label count of the whole step) == one padding-free row of 4."""
    full = _one_sgd_step(tok, tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    accum = _one_sgd_step(tok, tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=4)
    packed = _one_sgd_step(tok, tmp_path / "c", per_device_train_batch_size=4, padding_free=True, max_length=None)
    assert full.keys() == accum.keys() and any(v.abs().max() > 0 for v in full.values())
    for n in full:
        torch.testing.assert_close(accum[n], full[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(packed[n], full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_transformers_trainer_accumulation_through_sloth_loss(tok, tmp_path, monkeypatch):
    """A plain Transformers Trainer on a sloth-patched model: the loss is sloth.causal_lm_loss with the
    num_items_in_batch the Trainer counts over the whole step, so 4 micro-batches of 1 == one batch of 4."""
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{"input_ids": tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]}
            for r in chat_rows(1)]
    seen = []
    real = sloth.integrations.transformers.causal_lm_loss

    def spy(*a, **k):
        seen.append(int(k["num_items_in_batch"]))
        return real(*a, **k)

    monkeypatch.setattr(sloth.integrations.transformers, "causal_lm_loss", spy)
    deltas = []
    for bs, ga in ((4, 1), (1, 4)):
        model = lora_model(tok)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"{bs}"), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
            max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd",
            learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                       data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad})
    n_items = sum(len(r["input_ids"]) - 1 for r in rows)
    assert seen == [n_items] * 5  # one batch of 4, then 4 micro-batches: each divided by the step's label count
    for n in deltas[0]:
        torch.testing.assert_close(deltas[1][n], deltas[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_train_on_responses_only(tok, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4"}]
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    ids2 = tok.apply_chat_template(conv[:2], tokenize=True, return_dict=True)["input_ids"]
    for padding_free in (False, True):
        base = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=padding_free)
        coll = sloth.train_on_responses_only(base, instruction_part="<|user|>\n", response_part="<|assistant|>\n",
                                             tokenizer=tok)
        b = coll([{"input_ids": ids}, {"input_ids": ids2}])
        rows = [b["labels"][0]] if padding_free else list(b["labels"])
        kept = [tok.decode([t for t in r.tolist() if t != -100]) for r in rows]
        eos = tok.eos_token
        want = f"Hello{eos}\nIt is 4{eos}\n" + f"Hello{eos}\n"
        assert "".join(kept) == want, kept
    # on a trainer: its collator is wrapped, and training runs on the masked labels
    trainer = trl.SFTTrainer(model=lora_model(tok), args=sft_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                             train_dataset=datasets.Dataset.from_list(chat_rows(1)), processing_class=tok)
    assert sloth.train_on_responses_only(trainer, "<|user|>\n", "<|assistant|>\n") is trainer
    assert isinstance(trainer.data_collator, strl.ResponseOnlyCollator)
    b = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for r, i in zip(b["labels"], b["input_ids"]):
        text = tok.decode([t for t in r.tolist() if t != -100])
        assert "<|assistant|>" not in text and "<|user|>" not in text and text.endswith(tok.eos_token + "\n")
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_patch_trainer_on_a_built_trainer(tok, tmp_path):
    """A trainer that wrapped the model itself (peft_config=): patch_trainer swaps TRL's head for sloth's with the
    settings TRL chose; sloth.unpatch gives TRL's head back."""
    fused_head.uninstall()
    try:
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = trl.SFTTrainer(model=build_tiny_llama(tok, seed=1), peft_config=cfg,
                                 args=sft_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                                 train_dataset=datasets.Dataset.from_list(chat_rows(1)), processing_class=tok)
        lm = trainer.model.get_base_model()
        assert fused_head.trl_head_settings(lm) is not None and "_sloth_fused_head" not in lm.__dict__
        strl.patch_trainer(trainer)
        assert lm.__dict__["_sloth_fused_head"].outputs == ("log_probs", "entropy", "is_top1")
        assert sloth.integrations.transformers.patched_modules(trainer.model)
        trainer.train()
        assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
        sloth.unpatch(trainer.model)
        assert "_sloth_fused_head" not in lm.__dict__ and fused_head.trl_head_settings(lm) is not None
    finally:
        fused_head.install()


def test_hook_and_unpatch(tok):
    """TRL's add_fused_lm_head (as a trainer calls it) gives a sloth-patched model sloth's head and an unpatched one
    TRL's; sloth.unpatch then leaves TRL's head with the same settings, so a built trainer keeps working."""
    import trl.trainer.utils as tu

    assert fused_head.install() and tu.add_fused_lm_head is fused_head._hooked_add_fused_lm_head
    plain = lora_model(tok, patch=False)
    tu.add_fused_lm_head(plain.get_base_model(), temperature=0.5)
    assert fused_head.trl_head_settings(plain.get_base_model())["temperature"] == 0.5
    model = lora_model(tok)
    lm = model.get_base_model()
    tu.add_fused_lm_head(lm, temperature=0.5, outputs=("log_probs", "entropy"))
    assert lm.__dict__["_sloth_fused_head"].temperature == 0.5
    ids, mask, labels = batch(tok)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        sloth.unpatch(model)
        trl_head = fused_head.trl_head_settings(lm)
        assert "_sloth_fused_head" not in lm.__dict__ and trl_head["temperature"] == 0.5
        assert trl_head["outputs"] == ("log_probs", "entropy")
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None  # sloth's loss path is gone
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DPO, GRPO

def test_dpo_runs(tok, tmp_path):
    rows = [{"prompt": f"<|user|>\n{q}\n<|assistant|>\n", "chosen": a, "rejected": a[::-1] + " no"} for q, a in QA]
    model = lora_model(tok)
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, logging_steps=1, max_steps=3, per_device_train_batch_size=2,
                         learning_rate=5e-3, max_length=48, beta=0.1, seed=0, bf16=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    assert trainer.ref_model is None  # the reference is the same weights with the adapter disabled
    assert "_sloth_fused_head" in model.get_base_model().__dict__
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert abs(logs[0]["loss"] - math.log(2)) < 0.05  # policy == reference before the first update
    assert all(math.isfinite(h["rewards/margins"]) for h in logs)


def test_grpo_runs(tok, tmp_path):
    rows = [{"prompt": f"<|user|>\n{q}\n<|assistant|>\n"} for q, _ in QA]
    model = lora_model(tok)

    def reward_len(completions, **kw):
        return [float(len(c)) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                          disable_tqdm=True, logging_steps=1, max_steps=2, per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=4, learning_rate=5e-3, beta=0.1,
                          temperature=0.9, seed=0, bf16=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_len, args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    assert trainer.ref_model is None
    st = model.get_base_model().__dict__["_sloth_fused_head"]
    assert st.temperature == 0.9 and st.outputs == ("log_probs", "entropy")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(math.isfinite(h["kl"]) for h in logs)
