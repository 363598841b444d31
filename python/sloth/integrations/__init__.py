"""Integrations of sloth's kernels into Transformers, PEFT and TRL (each imported on demand)."""
