"""An Ollama ``Modelfile`` beside a GGUF file: ``FROM`` the GGUF, a Go ``TEMPLATE`` equivalent to the tokenizer's
Jinja chat template, and ``PARAMETER stop`` lines for its end-of-turn text.

Ollama templates are Go templates, not Jinja, so the template is derived, not translated: the Jinja template is
rendered on small conversations with marker contents, and the text around each marker gives, per role, the text
before and after a message (``ChatWrappers``). That covers templates that write each message as
``header(role) + content + footer(role)`` (Llama 3, ChatML / Qwen, Mistral-style, sloth's bundled one); a template
that cannot be split this way gets a Modelfile without TEMPLATE (Ollama then uses the GGUF's own chat template).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from .files import atomic_write

_M = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01", "user2": "\x01US2\x01"}


@dataclass
class ChatWrappers:
    """Text around one message of each role, as the chat template writes it."""

    leading: str  # before the first message (e.g. the BOS text)
    header: Dict[str, str]  # role -> text before the content
    footer: Dict[str, str]  # role -> text after the content
    generation: str  # what add_generation_prompt appends

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        """The prompt these wrappers give (what the derived Go template renders)."""
        out = self.leading
        for m in messages:
            out += self.header[m["role"]] + m["content"] + self.footer[m["role"]]
        if add_generation_prompt:
            out += self.generation
        return out


def _render(tokenizer, messages, gen=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def chat_wrappers(tokenizer) -> Optional[ChatWrappers]:
    """The per-role wrappers of the tokenizer's chat template, or None when it is not of the
    header + content + footer kind (checked by re-rendering a conversation both ways)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u = {"role": "user", "content": _M["user"]}
    a = {"role": "assistant", "content": _M["assistant"]}
    u2 = {"role": "user", "content": _M["user2"]}
    try:
        r1 = _render(tokenizer, [u])
        r1g = _render(tokenizer, [u], True)
        r2 = _render(tokenizer, [u, a])
        r3 = _render(tokenizer, [u, a, u2])
    except Exception:
        return None
    if not r1g.startswith(r1) or r1.count(_M["user"]) != 1:
        return None
    before_u, footer_u = r1.split(_M["user"])
    generation = r1g[len(r1):]
    if not r2.startswith(before_u + _M["user"] + footer_u) or _M["assistant"] not in r2:
        return None
    header_a = r2[len(before_u + _M["user"] + footer_u): r2.index(_M["assistant"])]
    footer_a = r2.split(_M["assistant"], 1)[1]
    pre_u2 = r3.split(_M["assistant"], 1)[1].split(_M["user2"])[0]
    if not pre_u2.startswith(footer_a):
        return None
    header_u = pre_u2[len(footer_a):]
    if not before_u.endswith(header_u):
        return None
    leading = before_u[: len(before_u) - len(header_u)]
    header, footer = {"user": header_u, "assistant": header_a}, {"user": footer_u, "assistant": footer_a}
    s = {"role": "system", "content": _M["system"]}
    try:
        r0 = _render(tokenizer, [s, u])
        if r0.startswith(leading) and r0.count(_M["system"]) == 1:
            head_s, rest = r0[len(leading):].split(_M["system"])
            if rest.endswith(header_u + _M["user"] + footer_u):
                header["system"] = head_s
                footer["system"] = rest[: len(rest) - len(header_u + _M["user"] + footer_u)]
    except Exception:
        pass
    w = ChatWrappers(leading, header, footer, generation)
    check = [m for m in ([s] if "system" in header else []) + [u, a, u2]]
    try:  # the derivation must reproduce the template on a conversation it did not split on
        if w.render(check, True) != _render(tokenizer, check, True):
            return None
    except Exception:
        return None
    return w


def _go_text(s: str) -> str:
    """Literal text for a Go template inside a Modelfile's triple quotes: a "{{" becomes a template action printing
    it, and where the text holds three double quotes in a row (which would end the Modelfile's TEMPLATE string and
    let the rest of the chat template inject Modelfile lines) each double quote becomes an action printing it."""
    quotes = '"""' in s
    out = []
    i = 0
    while i < len(s):
        if s.startswith("{{", i):
            out.append('{{ "{{" }}')
            i += 2
        elif quotes and s[i] == '"':
            out.append('{{ "\\x22" }}')
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def go_template(w: ChatWrappers, bos_text: str = "") -> str:
    """An Ollama (Go) TEMPLATE rendering ``.Messages`` as the wrappers do, with the generation prompt after the
    last message unless it is the assistant's. ``bos_text`` is dropped from the leading text (llama.cpp adds the
    BOS token itself when the GGUF says so). No ``{{-`` / ``-}}`` trimming: the literal text is kept exactly, its
    newlines included."""
    leading = w.leading[len(bos_text):] if bos_text and w.leading.startswith(bos_text) else w.leading
    parts = [_go_text(leading), "{{ range $i, $_ := .Messages }}", "{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    first = True
    for role in ("system", "user", "assistant"):
        if role not in w.header:
            continue
        parts.append(("{{ if" if first else "{{ else if") + f' eq .Role "{role}" }}}}')
        parts.append(_go_text(w.header[role]) + "{{ .Content }}" + _go_text(w.footer[role]))
        first = False
    parts.append("{{ end }}")
    parts.append('{{ if and $last (ne .Role "assistant") }}' + _go_text(w.generation) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def stop_strings(w: Optional[ChatWrappers], tokenizer) -> List[str]:
    """Stop texts: the assistant footer's first line (e.g. ``<|eot_id|>``, ``<|im_end|>``) and the EOS token."""
    stops = []
    if w is not None:
        f = w.footer.get("assistant", "").strip()
        if f:
            stops.append(f.splitlines()[0].strip())
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return [s for s in stops if s]


def write_modelfile(gguf_path: str, tokenizer=None, add_bos: bool = False, path: Optional[str] = None) -> str:
    """Write an Ollama ``Modelfile`` next to ``gguf_path`` (``FROM ./<file>``, TEMPLATE and stops derived from the
    tokenizer's chat template when possible); returns its path. Use it with ``ollama create NAME -f Modelfile``."""
    path = path or os.path.join(os.path.dirname(os.path.abspath(gguf_path)), "Modelfile")
    lines = [f"FROM ./{os.path.basename(gguf_path)}", ""]
    w = chat_wrappers(tokenizer) if tokenizer is not None else None
    if w is not None:
        bos = getattr(tokenizer, "bos_token", None) if add_bos else None
        tpl = go_template(w, bos or "")
        if '"""' in tpl or tpl.endswith('"'):  # cannot happen with _go_text; never write a TEMPLATE that breaks out
            raise ValueError("sloth: the chat template's Go form contains triple quotes; not writing the Modelfile")
        lines += ['TEMPLATE """' + tpl + '"""', ""]
    for s in stop_strings(w, tokenizer) if tokenizer is not None else []:
        if "\n" in s or "\r" in s:  # one Modelfile line per stop: a line break would start a new instruction
            continue
        lines.append('PARAMETER stop "' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
    atomic_write(path, ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    return path


__all__ = ["ChatWrappers", "chat_wrappers", "go_template", "stop_strings", "write_modelfile"]
