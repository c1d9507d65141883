"""The built-in audio tokenizer: k-means codebooks over pooled log-mel frames (no pretrained weights).

Audio → 16 kHz → 80-bin log-mel every 10 ms → average-pooled to ``token_rate`` frames per second
(``floor(duration · token_rate)`` of them) → per-dimension standardisation fitted on the training
frames → nearest centroid in each codebook. With ``num_codebooks > 1`` the codebooks are residual:
codebook ``j`` quantises what codebooks ``< j`` left over.

Fitting samples at most ``fit_max_frames`` pooled frames (a seeded reservoir), seeds the centroids
with k-means++ on a subsample and runs Lloyd iterations in torch; the same data and seed give the
same codebooks and codes. Its own mel is independent of the flow's target mel.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from audiotune.tokenization.audio_tokenizers.base import AudioTokenizer, TokenizerError, resample

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mel_kmeans.safetensors"
_ASSIGN_CHUNK = 16384  # rows per distance block: bounds memory at chunk × k floats


class MelKMeansTokenizer(AudioTokenizer):
    """Residual k-means over pooled log-mel frames.

    Args:
        token_rate: Frames per second (at most ``sample_rate / hop_length``).
        codebook_size: Requested k per codebook (reduced when the data has fewer distinct frames).
        num_codebooks: Residual codebooks.
        fit_max_frames: Pooled frames sampled to fit k-means.
        fit_iters: Maximum Lloyd iterations per codebook.
        sample_rate: The tokenizer's own analysis rate.
        n_mels: Mel bins.
        n_fft: FFT size (and window length).
        hop_length: Mel hop in samples.
    """

    name = "mel-kmeans"

    def __init__(
        self,
        token_rate: float = 25.0,
        codebook_size: int = 1024,
        num_codebooks: int = 1,
        fit_max_frames: int = 100_000,
        fit_iters: int = 30,
        sample_rate: int = 16000,
        n_mels: int = 80,
        n_fft: int = 400,
        hop_length: int = 160,
    ):
        mel_rate = sample_rate / hop_length
        if not 0 < token_rate <= mel_rate:
            raise TokenizerError(
                f"tokenize.audio_tokenizer.token_rate={token_rate}: mel-kmeans needs 0 < rate <= {mel_rate:g} Hz"
            )
        self.token_rate = float(token_rate)
        self.requested_codebook_size = int(codebook_size)
        self.codebook_size = int(codebook_size)
        self.num_codebooks = int(num_codebooks)
        self.fit_max_frames = int(fit_max_frames)
        self.fit_iters = int(fit_iters)
        self.sample_rate = int(sample_rate)
        self.n_mels, self.n_fft, self.hop_length = int(n_mels), int(n_fft), int(hop_length)
        self.seed: int | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.codebooks: list[torch.Tensor] = []
        import librosa

        fb = librosa.filters.mel(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels)
        self._fbank = torch.from_numpy(fb.astype(np.float32))
        self._window = torch.hann_window(self.n_fft)

    @classmethod
    def from_config(cls, cfg: Any) -> "MelKMeansTokenizer":
        """From an ``AudioTokenizerConfig``."""
        return cls(
            token_rate=cfg.token_rate, codebook_size=cfg.codebook_size, num_codebooks=cfg.num_codebooks,
            fit_max_frames=cfg.fit_max_frames, fit_iters=cfg.fit_iters,
        )

    @property
    def fitted(self) -> bool:
        return bool(self.codebooks)

    # -- features --------------------------------------------------------------------------------

    def log_mel(self, wav16: np.ndarray) -> torch.Tensor:
        """Log-mel frames ``[frames, n_mels]`` of audio at the tokenizer's rate, one every hop (centred)."""
        x = torch.from_numpy(np.ascontiguousarray(wav16, dtype=np.float32))
        spec = torch.stft(
            x, self.n_fft, self.hop_length, window=self._window, center=True, pad_mode="constant",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        return torch.log(torch.clamp(self._fbank @ power, min=1e-5)).T

    def pooled(self, wav: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Un-normalised token-rate frames ``[num_frames(len(wav), sample_rate), n_mels]``."""
        n_frames = self.num_frames(len(wav), sample_rate)
        mel = self.log_mel(resample(wav, sample_rate, self.sample_rate))
        if n_frames == 0:
            return mel.new_zeros(0, self.n_mels)
        # mel frame j is centred at j·hop/sr seconds; token i averages the frames in [i/rate, (i+1)/rate)
        step = self.hop_length * self.token_rate / self.sample_rate
        owner = np.floor(np.arange(mel.shape[0]) * step + 1e-9).astype(np.int64)
        keep = int(np.searchsorted(owner, n_frames))
        owner_t = torch.from_numpy(owner[:keep])
        sums = mel.new_zeros(n_frames, self.n_mels).index_add_(0, owner_t, mel[:keep])
        counts = torch.bincount(owner_t, minlength=n_frames)
        if bool((counts == 0).any()):  # only at the very end after resampling rounding: repeat the last frame
            idx = torch.arange(n_frames)
            src = torch.cummax(torch.where(counts > 0, idx, torch.zeros_like(idx)), 0).values
            sums, counts = sums[src], counts[src]
        return sums / counts[:, None].to(sums.dtype)

    # -- fit / encode ----------------------------------------------------------------------------

    def fit(self, wavs: Iterable[np.ndarray], sample_rate: int, seed: int) -> None:
        """Fit normalisation on all pooled frames and the codebooks on a seeded sample of them."""
        rng = np.random.default_rng(seed)
        reservoir = np.empty((self.fit_max_frames, self.n_mels), dtype=np.float32)
        total, sums, sq = 0, np.zeros(self.n_mels), np.zeros(self.n_mels)
        for wav in wavs:
            frames = self.pooled(wav, sample_rate).numpy()
            if not len(frames):
                continue
            sums += frames.sum(0, dtype=np.float64)
            sq += np.square(frames, dtype=np.float64).sum(0)
            seen = total + np.arange(len(frames))
            fill = seen < self.fit_max_frames
            reservoir[seen[fill]] = frames[fill]
            if not fill.all():  # reservoir sampling (algorithm R), vectorised per utterance
                slot = rng.integers(0, seen[~fill] + 1)
                hit = slot < self.fit_max_frames
                reservoir[slot[hit]] = frames[~fill][hit]
            total += len(frames)
        if total == 0:
            raise TokenizerError("mel-kmeans: no audio frames to fit on (every training utterance is too short)")
        mean = sums / total
        std = np.sqrt(np.maximum(sq / total - mean**2, 0.0))
        self.mean = torch.from_numpy(mean.astype(np.float32))
        self.std = torch.from_numpy(np.maximum(std, 1e-5).astype(np.float32))
        x = (torch.from_numpy(reservoir[: min(total, self.fit_max_frames)]) - self.mean) / self.std
        gen = torch.Generator().manual_seed(seed)
        self.codebooks = []
        for j in range(self.num_codebooks):
            centroids = fit_kmeans(x, self.requested_codebook_size, self.fit_iters, gen, label=f"codebook {j}")
            self.codebooks.append(centroids)
            x = x - centroids[assign(x, centroids)[0]]
        self.codebook_size = max(len(c) for c in self.codebooks)
        self.seed = int(seed)
        log.info(
            "mel-kmeans fitted on %d of %d frames: codebook sizes %s",
            min(total, self.fit_max_frames), total, [len(c) for c in self.codebooks],
        )

    def quantize(self, frames: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Codes ``[num_codebooks, frames]`` and the final residual of normalised frames."""
        if not self.fitted:
            raise TokenizerError("mel-kmeans is not fitted: call fit() or load a fitted tokenizer")
        residual = (frames - self.mean) / self.std
        codes = np.empty((len(self.codebooks), len(frames)), dtype=np.int32)
        for j, centroids in enumerate(self.codebooks):
            idx, _ = assign(residual, centroids)
            codes[j] = idx.numpy()
            residual = residual - centroids[idx]
        return codes, residual

    def encode(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Codes of one utterance, int32 ``[num_codebooks, floor(duration · token_rate)]``."""
        return self.quantize(self.pooled(wav, sample_rate))[0]

    # -- state -----------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            "token_rate": self.token_rate, "codebook_size": self.requested_codebook_size,
            "num_codebooks": self.num_codebooks, "fit_max_frames": self.fit_max_frames,
            "fit_iters": self.fit_iters, "sample_rate": self.sample_rate, "n_mels": self.n_mels,
            "n_fft": self.n_fft, "hop_length": self.hop_length, "seed": self.seed,
            "codebook_sizes": [len(c) for c in self.codebooks], "weights": WEIGHTS_FILE if self.fitted else None,
        }

    def _save_files(self, directory: Path) -> None:
        if not self.fitted:
            return
        from safetensors.torch import save_file

        tensors = {"mean": self.mean, "std": self.std}
        tensors.update({f"codebook.{j}": c.contiguous() for j, c in enumerate(self.codebooks)})
        save_file(tensors, str(directory / WEIGHTS_FILE))

    @classmethod
    def _from_state(cls, directory: Path, params: dict[str, Any]) -> "MelKMeansTokenizer":
        keys = ("token_rate", "codebook_size", "num_codebooks", "fit_max_frames", "fit_iters",
                "sample_rate", "n_mels", "n_fft", "hop_length")
        missing = [k for k in keys if k not in params]
        if missing:
            raise TokenizerError(f"{directory}: audio_tokenizer.json lacks {missing}")
        tok = cls(**{k: params[k] for k in keys})
        if params.get("weights"):
            from safetensors.torch import load_file

            path = directory / params["weights"]
            if not path.is_file():
                raise TokenizerError(f"{path}: missing; the mel-kmeans state is incomplete")
            tensors = load_file(str(path))
            expected = {"mean", "std"} | {f"codebook.{j}" for j in range(tok.num_codebooks)}
            if set(tensors) != expected:
                raise TokenizerError(f"{path}: tensors {sorted(tensors)}, expected {sorted(expected)}")
            tok.mean, tok.std = tensors["mean"], tensors["std"]
            tok.codebooks = [tensors[f"codebook.{j}"] for j in range(tok.num_codebooks)]
            tok.codebook_size = max(len(c) for c in tok.codebooks)
            tok.seed = params.get("seed")
        return tok


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row and its squared distance (blocked ``‖x‖² − 2x·c + ‖c‖²``)."""
    cc = centroids.square().sum(1)
    idx = torch.empty(len(x), dtype=torch.long)
    dist = torch.empty(len(x), dtype=x.dtype)
    for start in range(0, len(x), _ASSIGN_CHUNK):
        block = x[start:start + _ASSIGN_CHUNK]
        d, i = torch.addmm(cc, block, centroids.T, alpha=-2).min(1)
        idx[start:start + len(block)] = i
        dist[start:start + len(block)] = (d + block.square().sum(1)).clamp_min_(0)
    return idx, dist


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D² sampling) of ``k`` centroids from ``x``."""
    xx = x.square().sum(1)
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = (xx - 2 * (x @ x[chosen[0]]) + xx[chosen[0]]).clamp_min_(0)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:
            break
        j = int(torch.multinomial(d2, 1, generator=gen))
        chosen.append(j)
        torch.minimum(d2, (xx - 2 * (x @ x[j]) + xx[j]).clamp_min_(0), out=d2)
    return x[chosen].clone()


def fit_kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, label: str = "codebook") -> torch.Tensor:
    """Centroids ``[k', dim]`` of ``x`` by k-means++ seeding and Lloyd iterations (deterministic for ``gen``).

    ``k' = min(k, distinct rows of x)``; a smaller ``k'`` is logged as a warning.

    Kept instead of scikit-learn, measured (20,000 × 80 frames, k = 256, 10 iterations, the shared 2-core machine
    under load): this fit 10.5 s, mean squared distance 467.98; ``MiniBatchKMeans(batch_size=4096)`` 90.4 s,
    473.79; ``KMeans(n_init=1)`` 145.7 s, 468.00 (scikit-learn 1.9.1). Assigning the 20,000 frames: :func:`assign`
    234 ms, ``KMeans.predict`` 82 ms — a small share of a tokenize run, left as is so that fit and encode share
    one distance.
    """
    distinct = len(torch.unique(x, dim=0))
    if distinct < k:
        log.warning("mel-kmeans %s: only %d distinct frames, codebook size reduced from %d", label, distinct, k)
        k = distinct
    pool = x
    init_size = max(16 * k, 10_000)
    if len(x) > init_size:  # seeding on a subsample: k-means++ is sequential in k
        pool = x[torch.randperm(len(x), generator=gen)[:init_size]]
    centroids = _kmeans_pp(pool, k, gen)
    if len(centroids) < k:  # the subsample had too few distinct rows: seed from everything
        centroids = _kmeans_pp(x, k, gen)
    tol = 1e-4 * float(x.var(0).mean()) if len(x) > 1 else 0.0
    for _ in range(iters):
        idx, _ = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k)
        new = centroids.clone()
        used = counts > 0  # an empty cluster keeps its centroid
        new[used] = sums[used] / counts[used, None].to(x.dtype)
        shift = float((new - centroids).square().sum())
        centroids = new
        if shift <= tol:
            break
    return centroids


def quantization_error(tok: MelKMeansTokenizer, wav: np.ndarray, sample_rate: int) -> float:
    """Mean squared residual per normalised frame after all codebooks (a diagnostic)."""
    _, residual = tok.quantize(tok.pooled(wav, sample_rate))
    return float(residual.square().sum(1).mean()) if len(residual) else math.nan
