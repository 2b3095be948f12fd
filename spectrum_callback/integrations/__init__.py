"""Integrations with training frameworks: the Hugging Face Trainer's hooks
(:mod:`.transformers_hooks`)."""
