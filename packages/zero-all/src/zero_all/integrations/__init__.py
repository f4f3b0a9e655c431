"""Integrations with other libraries' training loops (``zero_all.integrations.transformers``: the Hugging Face Trainer)."""
