"""The common Unsloth notebook (Llama 3.1 conversational: ShareGPT data, chat template, SFTTrainer with the pre-1.0
argument names, responses-only loss, inference, saving LoRA / merged / GGUF, reloading the saved adapter, pushing
to the hub) run cell by cell with ``unsloth`` replaced by ``sloth`` in the imports, on a tiny random Llama on the
CPU. What changes besides the imports: the model name (a local tiny checkpoint), the data (four ShareGPT rows in
place of FineTome), max_steps, dataset_num_proc, the optimizer (8-bit AdamW needs a GPU), use_cpu (Transformers'
bf16 on the CPU), the device of the inputs ("cuda" -> the model's device), Transformers 5's return_dict for the
generation inputs, and the hub upload (huggingface_hub's HfApi mocked: no network)."""

import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
gguf = pytest.importorskip("gguf")
pytest.importorskip("bitsandbytes")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "2 + 2 is 4."}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"},
                       {"from": "gpt", "value": "Lima."}]},
    {"conversations": [{"from": "human", "value": "Reverse 'abc'."}, {"from": "gpt", "value": "cba"},
                       {"from": "human", "value": "And 'xy'?"}, {"from": "gpt", "value": "yx"}]},
    {"conversations": [{"from": "human", "value": "Opposite of early?"}, {"from": "gpt", "value": "late"}]},
]


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    """A tiny random Llama whose byte-level BPE tokenizer has Llama 3's special tokens."""
    from sloth.finetune.tokenizer import train_tokenizer

    texts = [t["value"] for r in SHAREGPT for t in r["conversations"]] * 20 + ["user assistant system"] * 5
    tok = train_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIALS[1:]})
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama3"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class FakeHfApi:
    """huggingface_hub.HfApi without the network: records create_repo / upload_folder and the files uploaded."""

    calls = []

    def __init__(self, token=None, **kw):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kw):
        FakeHfApi.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))


def test_notebook_cells(tiny_llama3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls.clear()

    # ---- cell: load (the notebook's own arguments)
    from sloth import FastLanguageModel
    import torch  # noqa: F811,F401
    max_seq_length = 2048
    dtype = None
    load_in_4bit = True

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=tiny_llama3,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    # ---- cell: LoRA
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    import sloth

    assert len(sloth.patched_modules(model)) > 0

    # ---- cell: data
    from sloth.chat_templates import get_chat_template

    tokenizer = get_chat_template(
        tokenizer,
        chat_template="llama-3.1",
    )

    def formatting_prompts_func(examples):
        convos = examples["conversations"]
        texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
        return {"text": texts, }

    from datasets import Dataset

    dataset = Dataset.from_list(SHAREGPT * 4)  # the notebook: load_dataset("mlabonne/FineTome-100k", split="train")
    from sloth.chat_templates import standardize_sharegpt

    dataset = standardize_sharegpt(dataset)
    dataset = dataset.map(formatting_prompts_func, batched=True, )
    assert dataset[0]["text"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is")
    assert tokenizer.eos_token == "<|eot_id|>"

    # ---- cell: trainer (TRL's pre-1.0 argument names, as the notebook passes them)
    from transformers import DataCollatorForSeq2Seq, TrainingArguments
    from trl import SFTTrainer

    from sloth import is_bfloat16_supported

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=dataset,
            dataset_text_field="text",
            max_seq_length=max_seq_length,
            data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
            dataset_num_proc=1,  # the notebook: 2 (worker processes; one keeps the 2-core CI quick)
            packing=False,
            args=TrainingArguments(
                per_device_train_batch_size=2,
                gradient_accumulation_steps=4,
                warmup_steps=5,
                max_steps=3,  # the notebook: 60
                learning_rate=2e-4,
                fp16=not is_bfloat16_supported(),
                bf16=is_bfloat16_supported(),
                logging_steps=1,
                optim="adamw_torch",  # the notebook: adamw_8bit (bitsandbytes' 8-bit AdamW needs a GPU)
                weight_decay=0.01,
                lr_scheduler_type="linear",
                seed=3407,
                output_dir="outputs",
                report_to="none",
                use_cpu=not torch.cuda.is_available(),  # not in the notebook (a GPU one); Transformers needs it here
            ),
        )
    old = [w for w in caught if "pre-1.0 argument names" in str(w.message)]
    assert len(old) == 1 and "tokenizer" in str(old[0].message) and "max_seq_length" in str(old[0].message)
    assert trainer.args.max_length == max_seq_length and trainer.args.dataset_text_field == "text"

    from sloth.chat_templates import train_on_responses_only

    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    row = {k: v for k, v in trainer.train_dataset[2].items() if k in ("input_ids", "attention_mask", "labels")}
    batch = trainer.data_collator([row])  # what the Trainer's dataloader passes (unused columns removed)
    labelled = tokenizer.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert labelled.replace(" ", "") == "cba<|eot_id|>yx<|eot_id|>", labelled  # the responses only

    trainer_stats = trainer.train()
    assert trainer_stats.global_step == 3 and torch.isfinite(torch.tensor(trainer_stats.training_loss))

    # ---- cell: inference
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)  # the notebook: .to("cuda")
    outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True, temperature=1.5, min_p=0.1)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]
    tokenizer.batch_decode(outputs)

    # ---- cell: save the LoRA adapter, reload it
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    want = model(**inputs).logits
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name="lora_model",
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    FastLanguageModel.for_inference(model)
    assert tokenizer.eos_token == "<|eot_id|>" and "<|start_header_id|>" in tokenizer.chat_template
    with torch.no_grad():
        got = model(**inputs).logits
    import safetensors.torch
    from peft import get_peft_model_state_dict

    saved = safetensors.torch.load_file("lora_model/adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)
    # `want` came out of the trained model's forward, which accelerate wrapped in bf16 autocast: bf16 logits
    torch.testing.assert_close(got, want.float(), rtol=0.03, atol=0.03 * float(want.abs().max()))
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    text_streamer_out = model.generate(**inputs, max_new_tokens=4, use_cache=True)  # the notebook streams it
    assert text_streamer_out.shape[1] == inputs["input_ids"].shape[1] + 4

    # ---- cell: saving to float16 / LoRA / GGUF
    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    stored = safetensors.torch.load_file("model/model.safetensors")
    assert {t.dtype for t in stored.values()} <= {torch.float16, torch.bfloat16}
    merged = transformers.AutoModelForCausalLM.from_pretrained("model", dtype=torch.float32)
    with torch.no_grad():
        ml = merged(**inputs).logits
    assert (ml - want).abs().max() < 0.05 * want.abs().max() + 0.05  # merged in fp32, stored 16-bit
    assert merged.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4
    model.save_pretrained_merged("model", tokenizer, save_method="lora")  # the same folder again: replaced
    assert os.path.isfile("model/adapter_config.json")
    paths = model.save_pretrained_gguf("model", tokenizer, quantization_method="q4_k_m")
    r = gguf.GGUFReader(paths[0])
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert os.path.isfile("model/Modelfile")
    model.push_to_hub_merged("hf/model", tokenizer, save_method="merged_16bit", token="")
    model.push_to_hub_gguf("hf/model", tokenizer, quantization_method=["q4_k_m", "q8_0"], token="")
    ups = [c for c in FakeHfApi.calls if c[0] == "upload_folder"]
    assert ("create_repo", "hf/model", None, True) in FakeHfApi.calls and len(ups) == 2
    assert "model.safetensors" in ups[0][2] and "config.json" in ups[0][2] and "tokenizer.json" in ups[0][2]
    assert ups[1][2] == ["Modelfile", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]


def test_fast_model_and_bf16_switch(tiny_llama3):
    from sloth import FastModel, is_bfloat16_supported

    model, tok = FastModel.from_pretrained(tiny_llama3, max_seq_length=64, load_in_4bit=False)
    assert hasattr(model, "save_pretrained_gguf") and tok is not None
    assert is_bfloat16_supported() is (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True)
    with pytest.raises(NotImplementedError, match="fp8"):
        FastModel.from_pretrained(tiny_llama3, load_in_fp8=True)
    with pytest.raises(ValueError, match="merged_4bit"):
        model.save_pretrained_merged("x", tok, save_method="merged_4bit_forced")
    with pytest.raises(ValueError, match="q2_k"):
        model.save_pretrained_gguf("x", tok, quantization_method="q2_k")


@pytest.mark.parametrize("name, turn_start, stop", [
    ("llama-3.1", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "<|eot_id|>"),
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n", "<|im_end|>"),
    ("qwen-2.5", "<|im_start|>system\nYou are Qwen", "<|im_end|>"),
    ("qwen3", "<|im_start|>user\nHi<|im_end|>\n", "<|im_end|>"),
    ("gemma-3", "<start_of_turn>user\nHi<end_of_turn>\n", "<end_of_turn>"),
    ("mistral", "[INST] Hi [/INST]", None),
    ("phi-4", "<|im_start|>user<|im_sep|>Hi<|im_end|>", "<|im_end|>"),
    ("gpt-oss", "<|start|>user<|message|>Hi<|end|>", "<|return|>"),
])
def test_chat_templates(tok, name, turn_start, stop):
    """Each template renders a conversation the way its model family writes it, ends with its generation prompt,
    and is what train_on_responses_only's default parts match."""
    import copy

    from sloth.chat_templates import TEMPLATES, _guess_parts, get_chat_template

    t = get_chat_template(copy.deepcopy(tok), chat_template=name)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    text = t.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert turn_start in text and "Yo" in text
    instruction, response = _guess_parts(t)
    assert (instruction, response) == TEMPLATES[name][2] and instruction in text
    assert text.rstrip().endswith(response.rstrip()) or name == "mistral"
    assert TEMPLATES[name][1] == stop
    if name == "qwen3":
        t2 = t.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert t2.endswith("<think>\n\n</think>\n\n")


def test_mapping_and_standardize(tok):
    import copy

    from datasets import Dataset

    from sloth.chat_templates import get_chat_template, standardize_data_formats, standardize_sharegpt

    t = get_chat_template(copy.deepcopy(tok), chat_template="chatml",
                          mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"})
    sharegpt = SHAREGPT[1]["conversations"]
    text = t.apply_chat_template(sharegpt, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>\n" \
                   "<|im_start|>assistant\nLima.<|im_end|>\n"
    ds = standardize_sharegpt(Dataset.from_list(SHAREGPT))
    assert ds[1]["conversations"][1] == {"role": "user", "content": "Capital of Peru?"}
    ds2 = standardize_data_formats(Dataset.from_list([{"msgs": [{"role": "human", "content": "a"},
                                                                {"role": "model", "content": "b"}]}]))
    assert ds2[0]["msgs"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="unknown chat_template"):
        get_chat_template(copy.deepcopy(tok), chat_template="llama-9")


def test_sft_config_old_name(tmp_path):
    from sloth.integrations.trl import install_pre_1_0_names

    assert install_pre_1_0_names()
    import trl

    with pytest.warns(FutureWarning, match="pre-1.0 argument names"):
        cfg = trl.SFTConfig(output_dir=str(tmp_path), max_seq_length=77, report_to="none", use_cpu=True)
    assert cfg.max_length == 77
    with pytest.raises(TypeError, match="not both"):
        trl.SFTConfig(output_dir=str(tmp_path), max_seq_length=77, max_length=5, use_cpu=True)
    json.dumps(cfg.to_dict())  # still a plain SFTConfig
