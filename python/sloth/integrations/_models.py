"""Where the Transformers model is inside what a user passes (a PeftModel, or the model itself)."""

from __future__ import annotations


def peft_parts(model):
    """``(the Transformers model, the PeftModel or None)`` of a PeftModel or a bare Transformers model."""
    try:
        from peft import PeftModel
    except ImportError:
        return model, None
    if isinstance(model, PeftModel):
        return model.get_base_model(), model
    return model, None
