"""``sloth finetune --export``: after training, the merged 16-bit checkpoint and / or GGUF files (with an Ollama
Modelfile) in the output folder; every exporter limit is checked before training starts."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from .errors import FinetuneError

#: --export format -> (kind, argument): merged safetensors in a dtype, or GGUF in a quantization
FORMATS: Dict[str, Tuple[str, str]] = {
    "merged": ("merged", "bf16"), "merged-bf16": ("merged", "bf16"), "merged-fp16": ("merged", "fp16"),
    "merged-fp32": ("merged", "fp32"),
    "gguf": ("gguf", "q4_k_m"), "gguf-q4_k_m": ("gguf", "q4_k_m"), "gguf-q5_k_m": ("gguf", "q5_k_m"),
    "gguf-q6_k": ("gguf", "q6_k"), "gguf-q4_0": ("gguf", "q4_0"), "gguf-q8_0": ("gguf", "q8_0"),
    "gguf-f16": ("gguf", "f16"), "gguf-bf16": ("gguf", "bf16"), "gguf-f32": ("gguf", "f32"),
}


def parse_exports(value: str) -> Tuple[str, ...]:
    """The formats of ``--export a,b,...`` (checked, duplicates dropped, order kept)."""
    out: List[str] = []
    for item in (x.strip().lower() for x in value.split(",")):
        if not item:
            continue
        if item not in FORMATS:
            raise FinetuneError(f"--export: unknown format {item!r}; use a comma-separated list of "
                                f"{', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise FinetuneError("--export needs at least one format, e.g. --export merged,gguf-q4_k_m")
    return tuple(out)


def check_exports(exports: Sequence[str], model_config, tokenizer) -> None:
    """Fail before training when an export cannot work: the gguf package missing, or anything of the model or
    tokenizer the GGUF exporter does not cover (family, attention / MLP biases, rope scaling, tokenizer kind...)."""
    if not any(FORMATS[e][0] == "gguf" for e in exports):
        return
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FinetuneError("--export gguf-*: the gguf package is not installed; pip install gguf (or drop the "
                            "gguf formats)") from None
    from ..export.gguf import check_exportable

    try:
        check_exportable(model_config, tokenizer=tokenizer)
    except ValueError as e:
        raise FinetuneError(f"--export gguf: {str(e).removeprefix('sloth.save_gguf: ')}; or use --export merged") \
            from None


def run_exports(exports: Sequence[str], model, tokenizer, output_dir: str, log) -> Dict[str, str]:
    """Write each export of ``exports`` under ``output_dir`` (``merged/`` or ``merged-<dtype>/``, ``gguf/``);
    returns format -> path."""
    from ..export import save_gguf, save_merged
    from .outputs import inside

    done: Dict[str, str] = {}
    ggufs = [e for e in exports if FORMATS[e][0] == "gguf"]
    for e in exports:
        kind, arg = FORMATS[e]
        if kind == "merged":
            path = inside(output_dir, "merged" if arg == "bf16" else f"merged-{arg}")
            if path in done.values():
                continue
            save_merged(model, path, tokenizer=tokenizer, dtype=arg, overwrite=True)
        else:
            os.makedirs(inside(output_dir, "gguf"), exist_ok=True)
            path = inside(output_dir, os.path.join("gguf", f"model-{arg}.gguf"))
            if path in done.values():
                continue
            mf = "Modelfile" if len(ggufs) == 1 else f"Modelfile.{arg}"
            save_gguf(model, path, quant=arg, tokenizer=tokenizer, name="sloth-finetune",
                      modelfile=os.path.join(os.path.dirname(path), mf))
        done[e] = path
        log(f"sloth finetune: export {e} -> {path}")
    return done
