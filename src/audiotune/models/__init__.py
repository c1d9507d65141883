"""Causal-LM wrapper (incl. multi-codebook heads), flow decoder, vocoder."""
