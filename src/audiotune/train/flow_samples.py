"""Listening to the flow while it trains: generated mels as PNG (target vs generated) and WAV."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def mel_figure(target: np.ndarray, generated: np.ndarray, path: Path, title: str = "") -> None:
    """Two stacked log-mel images ``[n_mels, T]`` on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(min(target.min(), generated.min())), float(max(target.max(), generated.max()))
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), dpi=100, sharex=True)
    for ax, mel, name in zip(axes, (target, generated), ("target", "generated"), strict=True):
        image = ax.imshow(mel, origin="lower", aspect="auto", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_ylabel(f"{name}\nmel bin")
    axes[-1].set_xlabel("frame")
    fig.colorbar(image, ax=axes, shrink=0.8, label="log mel")
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)


class SampleRenderer:
    """Generates mels for a fixed handful of examples and writes PNG + WAV files.

    Args:
        examples: :class:`audiotune.train.flow_data.FlowExamples` to draw from (validation
            examples, or training ones when there are none).
        num_samples: How many (the first ones, so every render shows the same utterances).
        vocoder: A :class:`audiotune.models.vocoder.Vocoder`.
        n_timesteps: Euler steps.
        cfg_rate: Guidance strength.
        seed: Seed of the initial noise (a private generator: torch's RNG is left alone).
        temperature: Scale of the initial noise.
    """

    def __init__(self, examples, num_samples: int, vocoder, n_timesteps: int, cfg_rate: float, seed: int,
                 temperature: float = 1.0) -> None:
        self.examples = examples
        self.indices = list(range(min(num_samples, len(examples))))
        self.vocoder = vocoder
        self.n_timesteps, self.cfg_rate, self.seed, self.temperature = n_timesteps, cfg_rate, seed, temperature

    @torch.no_grad()
    def render(self, model: torch.nn.Module, out_dir: Path, tag: str) -> list[Path]:
        """Write ``<tag>-<k>.png`` and ``<tag>-<k>.wav`` for each sample; returns the files."""
        if not self.indices:
            return []
        import soundfile as sf

        out_dir.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        batch = self.examples.collate(self.indices)
        tensors: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        was_training = model.training
        model.eval()
        try:
            mel, lengths = model.sample(
                tensors["codes"], tensors["code_lengths"], mel_lengths=tensors["mel_lengths"],
                speaker_index=tensors.get("speaker_index"), speaker_embedding=tensors.get("speaker_embedding"),
                n_timesteps=self.n_timesteps, cfg_rate=self.cfg_rate, temperature=self.temperature,
                generator=torch.Generator().manual_seed(self.seed))
        finally:
            model.train(was_training)
        files = []
        for k, i in enumerate(self.indices):
            n = int(lengths[k])
            generated = mel[k, :, :n].float().cpu().numpy()
            target = batch["mel"][k, :, :n].numpy()
            png, wav = out_dir / f"{tag}-{k}.png", out_dir / f"{tag}-{k}.wav"
            mel_figure(target, generated, png, f"{self.examples.ids[i]} ({tag})")
            audio = self.vocoder(generated)
            peak = float(np.abs(audio).max()) if audio.size else 0.0
            sf.write(wav, audio / peak * 0.9 if peak > 1.0 else audio, self.vocoder.sample_rate, subtype="PCM_16")
            files += [png, wav]
        return files
