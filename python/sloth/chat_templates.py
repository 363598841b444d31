"""Chat templates and dataset helpers with the names notebooks written for Unsloth import from
``unsloth.chat_templates``: :func:`get_chat_template`, :func:`standardize_sharegpt`,
:func:`standardize_data_formats` and :func:`train_on_responses_only` (``from sloth.chat_templates import ...``).

The templates are written here from the models' published chat formats: Llama 3 / 3.1, ChatML (Qwen 2.5 with its
default system prompt, Qwen3 with ``enable_thinking``), Gemma 3, Mistral, Phi-4 and gpt-oss's harmony format (the
final channel). Each comes with its end-of-turn text, which becomes the tokenizer's EOS when the vocabulary has it
(``map_eos_token``), so that generation stops at the end of an assistant turn.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + _CHATML
)

_QWEN3 = (
    _CHATML[: -len("{% endif %}")]
    + "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

_GEMMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

_PHI4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

_HARMONY = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|return|>' }}"
    "{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant<|channel|>final<|message|>' }}{% endif %}"
)

#: name -> (Jinja template, end-of-turn text, (instruction part, response part) for train_on_responses_only)
TEMPLATES: Dict[str, Tuple[str, Optional[str], Tuple[str, str]]] = {
    "llama-3.1": (_LLAMA3, "<|eot_id|>", ("<|start_header_id|>user<|end_header_id|>\n\n",
                                          "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    "chatml": (_CHATML, "<|im_end|>", ("<|im_start|>user\n", "<|im_start|>assistant\n")),
    "qwen-2.5": (_QWEN25, "<|im_end|>", ("<|im_start|>user\n", "<|im_start|>assistant\n")),
    "qwen3": (_QWEN3, "<|im_end|>", ("<|im_start|>user\n", "<|im_start|>assistant\n")),
    "gemma-3": (_GEMMA3, "<end_of_turn>", ("<start_of_turn>user\n", "<start_of_turn>model\n")),
    "mistral": (_MISTRAL, None, ("[INST] ", " [/INST]")),
    "phi-4": (_PHI4, "<|im_end|>", ("<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>")),
    "gpt-oss": (_HARMONY, "<|return|>", ("<|start|>user<|message|>", "<|start|>assistant<|channel|>final<|message|>")),
}
_ALIASES = {"llama-3": "llama-3.1", "llama3": "llama-3.1", "llama-31": "llama-3.1", "llama-3.2": "llama-3.1",
            "llama-3.3": "llama-3.1", "qwen2.5": "qwen-2.5", "qwen25": "qwen-2.5", "qwen-3": "qwen3",
            "gemma3": "gemma-3", "gemma-3n": "gemma-3", "phi4": "phi-4", "gptoss": "gpt-oss", "harmony": "gpt-oss",
            "unsloth": "chatml"}

_DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _canonical(name: str) -> str:
    key = name.lower().strip()
    key = _ALIASES.get(key, key)
    if key not in TEMPLATES:
        raise ValueError(f"sloth.chat_templates.get_chat_template: unknown chat_template {name!r}; use one of "
                         f"{', '.join(TEMPLATES)} (or pass your own Jinja template string)")
    return key


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _with_mapping(template: str, mapping: Dict[str, str]) -> str:
    """``template`` preceded by a remap of each message's keys and role names (ShareGPT's ``from`` / ``value`` /
    ``human`` / ``gpt``, or any other) to ``role`` / ``content`` / ``user`` / ``assistant``."""
    m = dict(_DEFAULT_MAPPING, **mapping)
    roles = "{" + ", ".join(f"{_jinja_str(v)}: {_jinja_str(k)}" for k, v in
                            (("user", m["user"]), ("assistant", m["assistant"]), ("system", m.get("system", "system"))))
    roles += "}"
    prelude = (
        "{% set _sloth = namespace(messages=[]) %}"
        "{% for _m in messages %}"
        f"{{% set _role = _m[{_jinja_str(m['role'])}] %}}"
        f"{{% set _sloth.messages = _sloth.messages + [{{'role': {roles}.get(_role, _role), "
        f"'content': _m[{_jinja_str(m['content'])}]}}] %}}"
        "{% endfor %}"
        "{% set messages = _sloth.messages %}"
    )
    return prelude + template


def get_chat_template(tokenizer, chat_template: Union[str, Tuple[str, str]] = "chatml",
                      mapping: Optional[Dict[str, str]] = None, map_eos_token: bool = True,
                      system_message: Optional[str] = None):
    """Give ``tokenizer`` a chat template by name (``"llama-3.1"``, ``"chatml"``, ``"qwen-2.5"``, ``"qwen3"``,
    ``"gemma-3"``, ``"mistral"``, ``"phi-4"``, ``"gpt-oss"`` and their common spellings), a ``(template,
    end-of-turn)`` pair, or a Jinja string; returns the tokenizer. ``mapping`` renames message keys and roles for
    data in another shape, e.g. ShareGPT's ``{"role": "from", "content": "value", "user": "human", "assistant":
    "gpt"}``. With ``map_eos_token`` the template's end-of-turn token becomes the EOS when the vocabulary has it.
    ``system_message`` is not supported (a ValueError; put a system turn in the conversations instead)."""
    if system_message is not None:
        raise ValueError("sloth.chat_templates.get_chat_template: system_message is not supported; add a "
                         "{'role': 'system', ...} turn to the conversations")
    stop = None
    if isinstance(chat_template, (tuple, list)):
        template, stop = chat_template[0], chat_template[1]
    elif isinstance(chat_template, str) and ("{%" in chat_template or "{{" in chat_template):
        template = chat_template
    else:
        template, stop, _ = TEMPLATES[_canonical(str(chat_template))]
    if mapping and any(mapping.get(k, v) != v for k, v in _DEFAULT_MAPPING.items()):
        template = _with_mapping(template, mapping)
    tokenizer.chat_template = template
    tokenizer._sloth_chat_template_name = chat_template if isinstance(chat_template, str) else None
    if map_eos_token and stop is not None:
        vocab = tokenizer.get_vocab()
        if stop in vocab and tokenizer.eos_token != stop:
            tokenizer.eos_token = stop
    return tokenizer


_SYSTEM, _USER, _ASSISTANT = ("system",), ("user", "human", "input"), ("gpt", "assistant", "output", "model",
                                                                          "bot", "chatgpt")


def _standardize_turns(turns, system=_SYSTEM, user=_USER, assistant=_ASSISTANT):
    out = []
    for t in turns or []:
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value", t.get("text")))
        r = str(role).lower() if role is not None else role
        if r in system:
            role = "system"
        elif r in user:
            role = "user"
        elif r in assistant:
            role = "assistant"
        else:
            raise ValueError(f"sloth.chat_templates: unknown role {role!r} in a conversation; pass its alias in "
                             f"aliases_for_user / aliases_for_assistant / aliases_for_system")
        out.append({"role": role, "content": content})
    return out


def standardize_sharegpt(dataset, aliases_for_system: Sequence[str] = _SYSTEM, aliases_for_user: Sequence[str] = _USER,
                         aliases_for_assistant: Sequence[str] = _ASSISTANT, num_proc: Optional[int] = None):
    """A ``datasets.Dataset`` with a ShareGPT ``conversations`` column (turns ``{"from": "human" | "gpt" | "system",
    "value": ...}``) turned into the ``{"role", "content"}`` turns chat templates read (same column)."""
    column = "conversations" if "conversations" in dataset.column_names else None
    if column is None:
        raise ValueError(f"sloth.chat_templates.standardize_sharegpt: the dataset has no 'conversations' column "
                         f"(columns: {', '.join(dataset.column_names)}); use standardize_data_formats")
    a = (tuple(x.lower() for x in aliases_for_system), tuple(x.lower() for x in aliases_for_user),
         tuple(x.lower() for x in aliases_for_assistant))
    return dataset.map(lambda b: {column: [_standardize_turns(c, *a) for c in b[column]]}, batched=True,
                       num_proc=num_proc)


def standardize_data_formats(dataset, tokenizer=None, aliases_for_system: Sequence[str] = _SYSTEM,
                             aliases_for_user: Sequence[str] = _USER,
                             aliases_for_assistant: Sequence[str] = _ASSISTANT, num_proc: Optional[int] = None):
    """Like :func:`standardize_sharegpt` for any column of conversations (ShareGPT's from / value or OpenAI's
    role / content turns, role aliases such as human / gpt / model): the first column holding lists of turns is
    rewritten to ``{"role", "content"}`` turns; a dataset without one is returned as it is."""
    column = None
    if len(dataset):
        row = dataset[0]
        for name in dataset.column_names:
            v = row[name]
            if isinstance(v, list) and v and isinstance(v[0], dict) and \
                    ({"role", "content"} <= set(v[0]) or {"from", "value"} <= set(v[0])):
                column = name
                break
    if column is None:
        return dataset
    a = (tuple(x.lower() for x in aliases_for_system), tuple(x.lower() for x in aliases_for_user),
         tuple(x.lower() for x in aliases_for_assistant))
    return dataset.map(lambda b: {column: [_standardize_turns(c, *a) for c in b[column]]}, batched=True,
                       num_proc=num_proc)


def _guess_parts(tokenizer) -> Tuple[str, str]:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    name = getattr(tokenizer, "_sloth_chat_template_name", None)
    if isinstance(name, str):
        try:
            return TEMPLATES[_canonical(name)][2]
        except ValueError:
            pass
    for marker, key in (("<|start_header_id|>", "llama-3.1"), ("<|im_sep|>", "phi-4"), ("<|im_start|>", "chatml"),
                        ("<start_of_turn>", "gemma-3"), ("<|channel|>", "gpt-oss"), ("[INST]", "mistral")):
        if marker in tpl:
            return TEMPLATES[key][2]
    raise ValueError("sloth.chat_templates.train_on_responses_only: cannot tell the instruction and response parts "
                     "of this chat template; pass instruction_part= and response_part=")


class _PaddingMasked:
    """Wraps a collator: labels on padding (attention_mask 0) become -100."""

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples, *args, **kwargs):
        batch = self.collator(examples, *args, **kwargs)
        mask = batch.get("attention_mask")
        if mask is not None and "labels" in batch and mask.shape == batch["labels"].shape:
            batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
        return batch


def train_on_responses_only(trainer, instruction_part: Optional[str] = None, response_part: Optional[str] = None,
                            force_match: bool = True, tokenizer=None, return_function: bool = False,
                            num_proc: Optional[int] = None):
    """Train ``trainer`` (a TRL / Transformers trainer) on the assistant responses only: labels become -100 on
    everything but the text after each ``response_part`` up to the next ``instruction_part`` (and on padding).
    The parts default to the chat template's (Llama 3, ChatML / Qwen, Gemma 3, Mistral, Phi-4, gpt-oss). Returns
    the trainer. Built on :func:`sloth.train_on_responses_only` (which wraps the trainer's data collator);
    ``force_match`` and ``num_proc`` are accepted for compatibility (matching is always on token ids)."""
    from .integrations.trl import train_on_responses_only as _wrap

    if return_function:
        raise ValueError("sloth.chat_templates.train_on_responses_only: return_function=True is not supported; pass "
                         "the trainer")
    tok = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)
    if instruction_part is None or response_part is None:
        if tok is None:
            raise ValueError("sloth.chat_templates.train_on_responses_only: pass tokenizer= or the parts")
        guess = _guess_parts(tok)
        instruction_part = guess[0] if instruction_part is None else instruction_part
        response_part = guess[1] if response_part is None else response_part
    if isinstance(getattr(trainer, "data_collator", None), _PaddingMasked):  # called again: wrap the original
        trainer.data_collator = trainer.data_collator.collator
    trainer = _wrap(trainer, instruction_part, response_part, tokenizer=tok)
    trainer.data_collator = _PaddingMasked(trainer.data_collator)
    return trainer


__all__ = ["TEMPLATES", "get_chat_template", "standardize_data_formats", "standardize_sharegpt",
           "train_on_responses_only"]
