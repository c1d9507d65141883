"""Text tokenizers, audio tokenizers (a registry), mel and speaker features."""
