"""Generate a small multi-speaker speech corpus for the demo and the tests.

With ``espeak-ng`` on PATH the speakers are espeak voices (English, plus Mandarin
through the ``cmn-latn-pinyin`` voice with pinyin input); otherwise a built-in
synthesizer makes voiced, speech-like audio (harmonics through moving formants),
so the demo works on any machine. Writes ``manifest.jsonl`` in the
Step-Audio-EditX layout and ``wavs/<speaker>/<id>.wav``.

    python examples/make_corpus.py --out demo/corpus [--speakers 4] [--utts 8] [--backend auto|espeak|synth]

``--music N`` writes instead an ACE-Step style music folder of N short songs (``NAME.wav`` with
``NAME_prompt.txt`` tags and, for every other song, ``NAME_lyrics.txt``) for ``mode: acestep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger("make_corpus")

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things.",
    "A rainbow is a division of white light into many beautiful colors.",
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
]
PINYIN = [
    "ni3 hao3, huan1 ying2 shi3 yong4 yu3 yin1 he2 cheng2.",
    "jin1 tian1 tian1 qi4 hen3 hao3.",
    "wo3 men5 yi1 qi3 qu4 gong1 yuan2 san4 bu4 ba5.",
    "zhe4 shi4 yi2 ge4 ce4 shi4 ju4 zi5.",
    "qing3 ba3 chuang1 hu5 da3 kai1.",
    "ta1 mei3 tian1 zao3 shang5 he1 cha2.",
    "xue2 xi2 yi1 men2 xin1 de5 yu3 yan2 xu1 yao4 shi2 jian1.",
    "zhe4 ben3 shu1 fei1 chang2 you3 qu4.",
    "wan3 shang5 wo3 men5 chi1 jiao3 zi5.",
    "ming2 tian1 jian4.",
]
EDIT_TYPES = ["emotion", "speed", "style"]
ESPEAK_VOICES = [  # (voice, words per minute, pitch 0-99)
    ("en-us", 165, 40), ("en-gb", 150, 60), ("en-us+f3", 170, 70), ("en-gb-scotland", 140, 30),
    ("en-us+m3", 155, 50), ("en-gb+f2", 160, 80), ("en-029", 150, 45), ("en-us+f4", 175, 65),
]


# ---------------------------------------------------------------- synth backend
def _synth(text: str, sr: int, f0: float, formant_shift: float, rng: np.random.Generator) -> np.ndarray:
    """Synthesize speech-like audio for ``text``.

    A jittered harmonic source (vibrato plus random pitch drift around ``f0``) passes through two formant
    resonances that move per syllable (one syllable per vowel, at most three per word); each syllable has a
    smooth amplitude envelope, fricative-like noise bursts follow some letters, and words are separated by
    short pauses, so the result is non-silent and changes with the text (about 0.25-0.35 s per word).

    Args:
        text: The sentence; words are split on whitespace.
        sr: Sample rate in Hz.
        f0: The speaker's mean fundamental frequency in Hz.
        formant_shift: The speaker's formant scale (vocal-tract length), around 1.0.
        rng: The random generator; the same state gives the same samples.

    Returns:
        Mono float32 audio, peak-normalised to 0.5.
    """
    words = text.split()
    pieces = [np.zeros(int(0.12 * sr), dtype=np.float32)]
    for word in words:
        n_syl = max(1, sum(ch in "aeiouy" for ch in word.lower()) // 1)
        for s in range(min(n_syl, 3)):
            dur = rng.uniform(0.09, 0.16)
            n = int(dur * sr)
            t = np.arange(n) / sr
            pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)))
            pitch *= 1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1))
            phase = 2 * np.pi * np.cumsum(pitch) / sr
            ch = word[(s * 2) % len(word)].lower()
            code = (ord(ch) % 13) / 12.0
            f1 = (300 + 500 * code) * formant_shift
            f2 = (900 + 1400 * ((ord(word[0].lower()) * 7 + s) % 11) / 10.0) * formant_shift
            sig = np.zeros(n)
            for k in range(1, 30):
                fk = k * pitch
                gain = np.exp(-((fk - f1) ** 2) / (2 * 120.0**2)) + 0.6 * np.exp(-((fk - f2) ** 2) / (2 * 180.0**2))
                sig += (gain + 0.02) * np.sin(k * phase) / k**0.5
            env = np.sin(np.pi * np.clip(t / dur, 0, 1)) ** 0.6
            sig = sig * env + 0.004 * rng.standard_normal(n) * env
            if ch in "sfztkpc":  # a little frication
                sig[: n // 4] += 0.05 * rng.standard_normal(n // 4)
            pieces.append(sig.astype(np.float32))
        pieces.append(np.zeros(int(rng.uniform(0.04, 0.1) * sr), dtype=np.float32))
    pieces.append(np.zeros(int(0.12 * sr), dtype=np.float32))
    wav = np.concatenate(pieces)
    return (0.5 * wav / (np.abs(wav).max() + 1e-9)).astype(np.float32)


# --------------------------------------------------------------- espeak backend
def _espeak_voices() -> set[str]:
    """Return the language and voice names that ``espeak-ng --voices`` lists."""
    out = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=False).stdout
    names = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4:
            names.update({parts[1], parts[3]})
    return names


def _espeak(text: str, voice: str, wpm: int, pitch: int, sr: int, tmp: Path) -> np.ndarray:
    """Speak ``text`` with espeak-ng into a temporary WAV and return it as mono float32 at ``sr`` Hz.

    Args:
        text: The sentence (pinyin with tone numbers for the ``cmn-latn-pinyin`` voice).
        voice: The espeak-ng voice, optionally with a ``+variant``.
        wpm: Speaking rate in words per minute.
        pitch: Pitch, 0-99.
        sr: The sample rate to return; espeak's native rate is resampled with soxr when it differs.
        tmp: A scratch folder for the WAV espeak writes.

    Returns:
        Mono float32 audio at ``sr`` Hz.

    Raises:
        RuntimeError: espeak-ng failed; the message carries its stderr.
    """
    out = tmp / "x.wav"
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(out), text],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r} (exit {proc.returncode}): {proc.stderr.strip()}")
    wav, native = sf.read(out, dtype="float32")
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    if native != sr:
        wav = soxr.resample(wav, native, sr, quality="HQ")
    return wav.astype(np.float32)


def make_corpus(out_dir: str | Path, n_speakers: int = 4, utts_per_speaker: int = 8, sample_rate: int = 22050,
                seed: int = 0, backend: str = "auto", mandarin: bool = True, edit_fraction: float = 0.25) -> Path:
    """Write a small multi-speaker corpus and its Step-Audio-EditX manifest.

    Writes ``<out_dir>/wavs/<speaker>/<id>.wav`` (16-bit PCM, mono) and ``<out_dir>/manifest.jsonl``, one JSON
    object per utterance with ``id``, ``target_audio_path`` (relative to the manifest), ``target_text`` and
    ``speaker_id``; about ``edit_fraction`` of the rows also carry ``prompt_audio_path``, ``prompt_text`` (an
    earlier utterance of the same speaker) and ``edit_type`` (``emotion``, ``speed`` or ``style``). An existing
    corpus in ``out_dir`` is overwritten (its ``wavs/`` folder is removed first). With ``mandarin`` and more
    than one speaker, the last speaker reads pinyin sentences with tone numbers (the ``cmn-latn-pinyin`` voice
    with espeak; skipped with a warning when that voice is missing).

    Args:
        out_dir: The folder to write into; created if missing.
        n_speakers: Number of speakers (espeak voices, or synthetic f0/formant settings).
        utts_per_speaker: Utterances per speaker.
        sample_rate: Sample rate of the written WAVs in Hz.
        seed: Seed for sentence choice, prompt pairing and the synthetic voices; the synth backend
            writes identical bytes for the same seed.
        backend: ``"espeak"`` (needs ``espeak-ng`` on PATH), ``"synth"`` (built in), or ``"auto"``
            (espeak when available, else synth).
        mandarin: Make the last speaker a Mandarin (pinyin) speaker.
        edit_fraction: Probability, per utterance after a speaker's first, of becoming an edit row.

    Returns:
        The path of ``manifest.jsonl``.

    Raises:
        ValueError: An argument is out of range.
        RuntimeError: ``backend="espeak"`` without espeak-ng, or espeak-ng failed.
    """
    if backend not in ("auto", "espeak", "synth"):
        raise ValueError(f"backend must be 'auto', 'espeak' or 'synth', got {backend!r}")
    if n_speakers < 1 or utts_per_speaker < 1:
        raise ValueError(f"n_speakers and utts_per_speaker must be >= 1, got {n_speakers} and {utts_per_speaker}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz, got {sample_rate}")
    if not 0.0 <= edit_fraction <= 1.0:
        raise ValueError(f"edit_fraction must be in [0, 1], got {edit_fraction}")
    out = Path(out_dir)
    if backend == "auto":
        backend = "espeak" if shutil.which("espeak-ng") else "synth"
    if backend == "espeak" and not shutil.which("espeak-ng"):
        raise RuntimeError("backend 'espeak' needs the espeak-ng executable (apt-get install espeak-ng)")
    if out.exists():
        shutil.rmtree(out / "wavs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    voices = ESPEAK_VOICES
    has_pinyin = False
    if backend == "espeak":
        available = _espeak_voices()
        voices = [v for v in ESPEAK_VOICES if v[0].split("+")[0] in available] or [("en", 160, 50)]
        if len(voices) < len(ESPEAK_VOICES):
            log.warning("espeak-ng lacks some voices; using %s", [v[0] for v in voices])
        has_pinyin = "cmn-latn-pinyin" in available
        if mandarin and not has_pinyin:
            log.warning("espeak-ng has no cmn-latn-pinyin voice; all speakers read English")
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(n_speakers):
            spk = f"spk{s:02d}"
            speaker_utts: list[dict] = []
            mandarin_speaker = mandarin and s == n_speakers - 1 and n_speakers > 1 and (
                backend == "synth" or has_pinyin)
            sentences = PINYIN if mandarin_speaker else ENGLISH
            order = rng.permutation(len(sentences))
            f0 = float(rng.uniform(95, 240))
            shift = float(rng.uniform(0.85, 1.2))
            for u in range(utts_per_speaker):
                text = sentences[order[u % len(sentences)]]
                uid = f"{spk}_{u:03d}"
                if backend == "espeak":
                    if mandarin_speaker:
                        voice, wpm, pitch = "cmn-latn-pinyin", 150, 50
                    else:  # past the voice list, reuse voices at another rate and pitch
                        voice, wpm, pitch = voices[s % len(voices)]
                        lap = s // len(voices)
                        wpm, pitch = wpm + 12 * lap * (-1) ** lap, (pitch + 17 * lap) % 100
                    wav = _espeak(text, voice, wpm, pitch, sample_rate, Path(tmp))
                else:
                    wav = _synth(text, sample_rate, f0, shift, rng)
                rel = f"wavs/{spk}/{uid}.wav"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(out / rel, wav, sample_rate, subtype="PCM_16")
                total += len(wav) / sample_rate
                row = {"id": uid, "target_audio_path": rel, "target_text": text, "speaker_id": spk}
                if speaker_utts and rng.random() < edit_fraction:
                    prompt = speaker_utts[int(rng.integers(len(speaker_utts)))]
                    row.update(prompt_audio_path=prompt["target_audio_path"], prompt_text=prompt["target_text"],
                               edit_type=EDIT_TYPES[int(rng.integers(len(EDIT_TYPES)))])
                speaker_utts.append(row)
                rows.append(row)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d utterances (%.1f s of audio, %d speakers, %d edit rows, backend %s, %d Hz) to %s",
             len(rows), total, n_speakers, sum("edit_type" in r for r in rows), backend, sample_rate, manifest)
    return manifest


MUSIC_TAGS = ["pop, piano, upbeat", "rock, electric guitar, drums", "ambient, pads, slow", "jazz, bass, swing"]
MUSIC_LYRICS = ["[verse]\nla la la under the sun\n[chorus]\noh oh oh", "[verse]\nrun run run\n[chorus]\nhey hey"]


def make_music(out_dir: str | Path, n_songs: int = 4, seconds: float = 2.0, sample_rate: int = 22050,
               seed: int = 0) -> Path:
    """An ACE-Step data folder: stereo chord progressions with a beat, tags, and lyrics for every other song."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    for i in range(n_songs):
        root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
        chord = sum(np.sin(2 * np.pi * root * r * t) for r in (1.0, 1.26, 1.5)) / 3
        beat = np.exp(-30 * ((t * (1.5 + i % 3)) % 1.0)) * rng.standard_normal(len(t)) * 0.2
        left, right = 0.4 * chord + beat, 0.4 * np.roll(chord, 40) + beat
        sf.write(out / f"song{i:02d}.wav", np.stack([left, right], axis=1).astype(np.float32), sample_rate)
        (out / f"song{i:02d}_prompt.txt").write_text(MUSIC_TAGS[i % len(MUSIC_TAGS)])
        if i % 2 == 0:
            (out / f"song{i:02d}_lyrics.txt").write_text(MUSIC_LYRICS[(i // 2) % len(MUSIC_LYRICS)])
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse the arguments, write the corpus, log the time it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--speakers", type=int, default=4, help="Number of speakers.")
    parser.add_argument("--utts", type=int, default=8, help="Utterances per speaker.")
    parser.add_argument("--sample-rate", type=int, default=22050, help="Sample rate of the WAVs in Hz.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for sentences, edit pairs and synthetic voices.")
    parser.add_argument("--backend", choices=("auto", "espeak", "synth"), default="auto",
                        help="auto: espeak-ng when on PATH, else the built-in synthesizer.")
    parser.add_argument("--no-mandarin", action="store_true", help="No pinyin speaker.")
    parser.add_argument("--edit-fraction", type=float, default=0.25, help="Share of rows that become edit rows.")
    parser.add_argument("--music", type=int, default=0, metavar="N",
                        help="Write an ACE-Step music folder of N songs instead of the speech corpus.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Length of each song (--music).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    if args.music:
        make_music(args.out, n_songs=args.music, seconds=args.seconds, sample_rate=args.sample_rate, seed=args.seed)
        log.info("done in %.1f s", time.perf_counter() - start)
        return 0
    make_corpus(args.out, n_speakers=args.speakers, utts_per_speaker=args.utts, sample_rate=args.sample_rate,
                seed=args.seed, backend=args.backend, mandarin=not args.no_mandarin,
                edit_fraction=args.edit_fraction)
    log.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
