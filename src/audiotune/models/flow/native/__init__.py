"""Upstream flow architectures (CosyVoice-300M, CosyVoice2, Step-Audio-EditX) written natively,
key-for-key compatible with the release files."""
