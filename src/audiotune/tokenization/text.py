"""Text tokenizers: the base model's (AutoTokenizer), or one trained here (BPE or characters).

Every tokenizer ends up as a Hugging Face ``PreTrainedTokenizerFast`` saved with
``save_pretrained`` in the Tokens artifact, so training and inference load the same one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from audiotune import storage
from audiotune.errors import DataError

log = logging.getLogger(__name__)

PAD, EOS, UNK, BOS = "<|pad|>", "<|endoftext|>", "<|unk|>", "<|startoftext|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, BOS]


class TextTokenizerError(DataError):
    """The text tokenizer cannot be loaded or trained."""


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "tokenizer_config.json", "special_tokens_map.json", "spiece.model", "sentencepiece.bpe.model")
DEFAULT_LIMITS = (64.0, 1_000_000)  # tokenize.max_base_tokenizer_mb, tokenize.max_base_vocab


def _vocab_entries(path: Path) -> int:
    """Vocabulary entries of a tokenizer folder's JSON files (tokenizer.json's model vocabulary and added tokens,
    or vocab.json); 0 when it has neither."""
    count = 0
    if (path / "tokenizer.json").is_file():
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
        count = len(vocab or ()) + len(data.get("added_tokens") or ()) if isinstance(data, dict) else 0
    elif (path / "vocab.json").is_file():
        count = len(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
    return count


def check_base_tokenizer(path: Path, uri: str, max_mb: float, max_vocab: int) -> None:
    """Refuse a base model's tokenizer larger than the limits, before it is built.

    Raises:
        TextTokenizerError: Naming the file, its size or entry count, and the setting.
    """
    for name in sorted({*TOKENIZER_FILES, *(p.name for p in path.glob("*.tiktoken"))}):
        file = path / name
        if file.is_file() and file.stat().st_size > max_mb * 2**20:
            raise TextTokenizerError(f"base model {uri}: {name} is {file.stat().st_size / 2**20:.1f} MiB, more than "
                                     f"tokenize.max_base_tokenizer_mb={max_mb:g}; is it the right base? (raise the "
                                     "limit if so)")
    try:
        entries = _vocab_entries(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TextTokenizerError(f"base model {uri}: its tokenizer JSON is not valid ({err})") from None
    if entries > max_vocab:
        raise TextTokenizerError(f"base model {uri}: its tokenizer has {entries} vocabulary entries, more than "
                                 f"tokenize.max_base_vocab={max_vocab}; is it the right base? (raise the limit if so)")


def load_base_tokenizer(uri: str, trust_remote_code: bool = False,
                        limits: tuple[float, int] = DEFAULT_LIMITS) -> PreTrainedTokenizerBase:
    """The base model's tokenizer from a local directory or an s3:// URI (downloaded once, cached); its own code
    runs only with ``trust_remote_code`` (llm.trust_remote_code), never after a prompt. ``limits`` (MiB of a
    tokenizer file, vocabulary entries) are checked first (:func:`check_base_tokenizer`)."""
    path = storage.local_copy(uri)
    check_base_tokenizer(Path(path), uri, *limits)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TextTokenizerError(f"cannot load a tokenizer from base model {uri}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS,
        model_max_length=1 << 30,
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (any script, no unknown characters)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def train_char(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character; suits Chinese text)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok)


def build_text_tokenizer(kind: str, base_model: str | None, texts: Iterable[str], vocab_size: int,
                         trust_remote_code: bool = False,
                         limits: tuple[float, int] = DEFAULT_LIMITS) -> tuple[PreTrainedTokenizerBase, str]:
    """Pick and build the text tokenizer; returns it and what it is (``base``, ``bpe``, ``char``); ``limits``
    bound a base's tokenizer (see :func:`check_base_tokenizer`)."""
    if kind == "auto":
        kind = "base" if base_model else "bpe"
    if kind == "base":
        if not base_model:
            raise TextTokenizerError("tokenize.text_tokenizer is 'base' but no base model was given (--base-model)")
        return load_base_tokenizer(base_model, trust_remote_code, limits), "base"
    if kind == "bpe":
        return train_bpe(texts, vocab_size), "bpe"
    if kind == "char":
        return train_char(texts), "char"
    raise TextTokenizerError(f"unknown text tokenizer {kind!r}")


def windows(ids: list[int], context_length: int, stride: int) -> Iterator[list[int]]:
    """Cut a long token sequence into windows of ``context_length`` overlapping by ``stride``.

    The last window ends at the end of the sequence; a short sequence is one window.
    """
    if len(ids) <= context_length:
        yield list(ids)
        return
    step = context_length - stride
    start = 0
    while True:
        end = start + context_length
        if end >= len(ids):
            yield list(ids[max(0, len(ids) - context_length):])
            return
        yield list(ids[start:end])
        start += step
