"""Codes that already exist in the source: in each Dataset row's meta, or in MOSS-TTSD shards.

MOSS-TTSD's ``finetune/data_preprocess.py`` writes ``<name>.pkl`` (records pickled one after
another, each ``{"input_ids": [seq, 8], "labels": [seq, 8]}``) and ``<name>_metas.npy``
(``np.stack([pointers, tokens_lengths, audio_lengths])``: byte offset, sequence length and audio
frames of each record). In ``input_ids`` the audio rows hold the 8 XY-tokenizer codebooks, the
first shifted by the text vocabulary (151665); text rows hold the text id in column 0 and the pad
1024 elsewhere. In ``labels`` the audio rows are the codes themselves and text rows are -100.

Pickle runs code when it loads, so shards are read only when the user says they trust them, and
even then with an unpickler that can build nothing but containers and numpy arrays.

Codes at LLM ids (Step-Audio-EditX): with ``codebook_offsets`` the codes of a row are stored as one
interleaved stream of LLM ids (:class:`audiotune.models.vocab.CodeStream`). A row's meta may hold
that stream as ``<audio_N>`` token strings (``N`` counts from the first codebook's offset, as
Step-Audio-EditX's ``merge_vq0206_to_token_str`` writes them), as a flat list of LLM ids, or as one
list of raw codes per codebook, which is interleaved here as its tokenizer does (complete groups only).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from audiotune.models.vocab import CodeStream, CodeStreamError
from audiotune.tokenization.audio_tokenizers.base import AudioTokenizer, CodesOutOfRange, RowError, TokenizerError

MOSS_CHANNELS = 8
MOSS_AUDIO_OFFSET = 151665  # added to the first codebook so it does not collide with text ids
MOSS_PAD = 1024  # filler in codebooks 1..7 of text rows
IGNORE = -100
METAS_SUFFIX = "_metas.npy"


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The functions numpy's own pickles call, under both the numpy 1 and numpy 2 module names."""
    reconstruct = np.arange(1).__reduce__()[0]
    frombuffer = np.arange(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer  # protocol 5 arrays
    return allowed


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_reconstructors(),
    **{("builtins", c.__name__): c for c in (list, dict, tuple, set, frozenset, bytearray)},
}
_ALLOWED_GLOBALS[("_codecs", "encode")] = __import__("_codecs").encode  # how protocol 2 stores bytes


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays / scalars / dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only containers and numpy arrays are allowed"
            ) from None


def _require_trust(path: Path, trust_pickle: bool) -> None:
    if not trust_pickle:
        raise TokenizerError(
            f"{path}: MOSS-TTSD shards are pickle files, which can run code when read. If you trust them, set "
            "tokenize.audio_tokenizer.trust_pickle: true (they are then read with a restricted unpickler)"
        )


def moss_shards(path: str | Path) -> list[tuple[Path, Path]]:
    """``(pkl, metas)`` pairs under ``path``: a folder of shards, one ``.pkl`` or one ``_metas.npy``."""
    path = Path(path)
    if path.is_dir():
        pkls = sorted(path.glob("*.pkl"))
        if not pkls:
            raise TokenizerError(f"tokenize.audio_tokenizer.moss_path={path}: no .pkl shards in this folder")
    elif path.name.endswith(METAS_SUFFIX):
        pkls = [path.with_name(path.name[: -len(METAS_SUFFIX)] + ".pkl")]
    elif path.suffix == ".pkl":
        pkls = [path]
    else:
        raise TokenizerError(
            f"tokenize.audio_tokenizer.moss_path={path}: expected a folder, a .pkl or a {METAS_SUFFIX} file"
        )
    pairs = []
    for pkl in pkls:
        metas = pkl.with_name(pkl.stem + METAS_SUFFIX)
        for needed in (pkl, metas):
            if not needed.is_file():
                raise TokenizerError(f"{needed}: missing (MOSS-TTSD shards come as <name>.pkl + <name>{METAS_SUFFIX})")
        pairs.append((pkl, metas))
    return pairs


def _read_metas(metas: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Byte offsets and (when recorded) audio lengths from a ``_metas.npy`` int array."""
    try:
        arr = np.load(metas, allow_pickle=False)
    except ValueError as err:
        raise TokenizerError(f"{metas}: not a plain numpy int array ({err})") from None
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise TokenizerError(f"{metas}: expected int pointers [N] or [3, N], got {arr.dtype} {arr.shape}")
    if arr.ndim == 1:
        return arr, None
    return arr[0], (arr[2] if arr.shape[0] >= 3 else None)


def moss_record_codes(record: Any, expected_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Audio codes ``[8, frames]`` int32 (first codebook un-shifted) and text ids of one MOSS record."""
    if not isinstance(record, dict) or "input_ids" not in record:
        raise RowError(f"expected a dict with 'input_ids', got {type(record).__name__}")
    try:
        input_ids = np.asarray(record["input_ids"], dtype=np.int64)
        labels = np.asarray(record["labels"], dtype=np.int64) if "labels" in record else None
    except (ValueError, TypeError) as err:
        raise RowError(f"input_ids/labels are not rectangular integer arrays ({err})") from None
    if input_ids.ndim != 2 or input_ids.shape[1] < MOSS_CHANNELS:
        raise RowError(f"input_ids has shape {input_ids.shape}, expected [seq_len, {MOSS_CHANNELS}]")
    input_ids = input_ids[:, :MOSS_CHANNELS]
    if labels is not None and labels.shape[0] == input_ids.shape[0] and labels.ndim == 2:
        audio = labels[:, 1] != IGNORE
    else:
        audio = input_ids[:, 1] != MOSS_PAD
    rows = np.flatnonzero(audio)
    if len(rows) == 0:
        raise RowError("no audio rows in input_ids")
    if rows[-1] - rows[0] + 1 != len(rows):
        raise RowError("audio rows of input_ids are not contiguous")
    if expected_frames is not None and len(rows) != expected_frames:
        raise RowError(f"{len(rows)} audio rows but the metas file records {expected_frames}")
    codes = input_ids[rows].T.copy()
    codes[0] -= MOSS_AUDIO_OFFSET
    return codes.astype(np.int32), input_ids[~audio, 0]


def iter_moss_shards(path: str | Path, trust_pickle: bool) -> Iterator[dict]:
    """Records of MOSS-TTSD shards, in file and pointer order.

    Each item is ``{"source": "<file>.pkl#<i>", "index": i, "codes": int32 [8, frames],
    "text_ids": int64 [n]}``; a record that cannot be used instead carries ``"error"`` (a
    :class:`RowError`) and no codes, so the caller can quarantine it and go on.

    Raises:
        TokenizerError: ``trust_pickle`` is false, or a shard is missing or unreadable.
        pickle.UnpicklingError: A shard names a global other than containers and numpy arrays.
    """
    pairs = moss_shards(path)
    _require_trust(Path(path), trust_pickle)
    for pkl, metas in pairs:
        pointers, audio_lengths = _read_metas(metas)
        with open(pkl, "rb") as f:
            for i, pointer in enumerate(pointers.tolist()):
                source = f"{pkl.name}#{i}"
                f.seek(int(pointer))
                try:
                    record = RestrictedUnpickler(f).load()
                except pickle.UnpicklingError as err:
                    raise pickle.UnpicklingError(f"{pkl} record {i} at byte {pointer}: {err}") from None
                except (EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
                    raise TokenizerError(f"{pkl} record {i} at byte {pointer}: cannot be read ({err!r})") from None
                expected = int(audio_lengths[i]) if audio_lengths is not None else None
                try:
                    codes, text_ids = moss_record_codes(record, expected)
                except RowError as err:
                    yield {"source": source, "index": i, "error": RowError(f"{source}: {err}")}
                    continue
                yield {"source": source, "index": i, "codes": codes, "text_ids": text_ids}


class StreamOutOfRange(CodesOutOfRange):
    """An id of an interleaved stream outside the ids of its position's codebook."""

    def __init__(self, message: str):
        self.low = self.high = self.vocab_size = None
        RowError.__init__(self, message)


_AUDIO_TOKEN = re.compile(r"\s*<audio_(\d+)>")


def parse_audio_tokens(text: str, where: str) -> list[int]:
    """``"<audio_12><audio_1030>..."`` → ``[12, 1030, ...]`` (whitespace between tokens is allowed).

    Raises:
        RowError: Anything else in the string, or no token at all.
    """
    numbers, pos = [], 0
    for match in _AUDIO_TOKEN.finditer(text):
        if match.start() != pos:
            break
        numbers.append(int(match.group(1)))
        pos = match.end()
    if text[pos:].strip():
        raise RowError(f"{where}: unexpected text {text[pos:pos + 20]!r} at character {pos} "
                       "(expected only <audio_N> tokens)")
    if not numbers:
        raise RowError(f"{where}: no <audio_N> tokens")
    return numbers


class PrecomputedTokenizer(AudioTokenizer):
    """Codes taken from the source instead of computed from audio.

    Args:
        codes_field: Key in a row's ``meta`` holding ``[frames]`` or ``[codebooks][frames]`` ints.
        num_codebooks: Codebooks every row must have.
        token_rate: Frames (or stream ids) per second of the codes (for aligning mels).
        vocab_size: Codes per codebook; codes outside ``[0, vocab_size)`` raise :class:`CodesOutOfRange`.
        moss_path: MOSS-TTSD shards (a folder or file), read by :meth:`moss_records`.
        trust_pickle: Allow reading those pickle shards.
        max_code: The largest code seen so far (sets ``codebook_size`` when ``vocab_size`` is unset).
        prompt_codes_field: Key in a row's ``meta`` holding the prompt audio's codes.
        codebook_offsets: Codes at LLM ids: the LLM id of code 0 of each codebook (see the module docstring).
        codebook_sizes: Codes at LLM ids: codes per codebook.
        interleave: Codes at LLM ids: ids of each codebook per group (default one each).
    """

    name = "precomputed"

    def __init__(
        self,
        codes_field: str = "codes",
        num_codebooks: int = 1,
        token_rate: float = 25.0,
        vocab_size: int | None = None,
        moss_path: str | Path | None = None,
        trust_pickle: bool = False,
        max_code: int = -1,
        prompt_codes_field: str = "prompt_codes",
        codebook_offsets: list[int] | None = None,
        codebook_sizes: list[int] | None = None,
        interleave: list[int] | None = None,
    ):
        self.codes_field = codes_field
        self.num_codebooks = int(num_codebooks)
        self.token_rate = float(token_rate)
        self.vocab_size = vocab_size
        self.moss_path = Path(moss_path) if moss_path else None
        self.trust_pickle = trust_pickle
        self.max_code = int(max_code)  # largest code seen: sets codebook_size when vocab_size is unset
        self.prompt_codes_field = prompt_codes_field
        self.stream: CodeStream | None = None
        if codebook_offsets is not None:
            try:
                self.stream = CodeStream(codebook_offsets, codebook_sizes or [], interleave or [1])
            except ValueError as err:
                raise TokenizerError(f"tokenize.audio_tokenizer: {err}") from None
            self.num_codebooks = 1  # one row: the interleaved stream

    @property
    def codebook_size(self) -> int:  # type: ignore[override]
        if self.stream is not None:
            return self.stream.span  # the LLM ids the stream may hold, from its first one
        return self.vocab_size if self.vocab_size is not None else self.max_code + 1

    def manifest_fields(self) -> dict[str, Any]:
        """What the Tokens manifest's ``audio_tokenizer`` section records beyond type, sizes and rate: for codes
        at LLM ids, the stream's layout and ``frame_rate``, the time-aligned frames per second of its pairs
        (``token_rate`` counts stored ids: Step-Audio-EditX's 125/3 ids/s are 25 pair frames/s)."""
        if self.stream is None:
            return {}
        frame_rate = self.token_rate * max(self.stream.interleave) / self.stream.group
        return {"code_stream": {**self.stream.to_dict(), "frame_rate": frame_rate}}

    @classmethod
    def from_config(cls, cfg: Any, resolve_path: Any = Path) -> "PrecomputedTokenizer":
        """From an ``AudioTokenizerConfig``; ``resolve_path`` turns ``moss_path`` into a local path."""
        return cls(
            codes_field=cfg.codes_field, num_codebooks=cfg.num_codebooks, token_rate=cfg.token_rate,
            vocab_size=cfg.vocab_size, moss_path=resolve_path(cfg.moss_path) if cfg.moss_path else None,
            trust_pickle=cfg.trust_pickle, prompt_codes_field=cfg.prompt_codes_field,
            codebook_offsets=cfg.codebook_offsets, codebook_sizes=cfg.codebook_sizes, interleave=cfg.interleave,
        )

    def encode(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        raise TokenizerError("precomputed codes come from the source: use codes_for_row(row), not encode(audio)")

    def check_codes(self, codes: np.ndarray, where: str) -> np.ndarray:
        """``codes`` as int32 ``[num_codebooks, frames]`` after shape and range checks (raises :class:`RowError`)."""
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise RowError(f"{where}: expected [frames] or [codebooks][frames] codes, got shape {codes.shape}")
        if codes.shape[0] != self.num_codebooks:
            raise RowError(
                f"{where}: {codes.shape[0]} codebooks, but tokenize.audio_tokenizer.num_codebooks={self.num_codebooks}"
            )
        low, high = int(codes.min()), int(codes.max())
        limit = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int32).max
        if low < 0 or high >= limit:
            raise CodesOutOfRange(low, high, limit, where)
        self.max_code = max(self.max_code, high)
        return codes.astype(np.int32)

    def codes_for_row(self, row: dict, field: str | None = None) -> np.ndarray | None:
        """Codes ``[num_codebooks, frames]`` from ``row["meta"][field]`` (default ``codes_field``); None when
        the row has none. With codes at LLM ids: ``[1, T]``, the checked stream of LLM ids."""
        field = field or self.codes_field
        meta = row.get("meta")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) if meta else {}
            except json.JSONDecodeError as err:
                raise RowError(f"row {row.get('id')}: meta is not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get(field) is None:
            return None
        where = f"row {row.get('id')} meta.{field}"
        if self.stream is not None:
            return self._stream_codes(meta[field], where)[None]
        try:
            codes = np.asarray(meta[field])
        except ValueError:
            raise RowError(f"{where}: codebooks of different lengths") from None
        if codes.size == 0:
            raise RowError(f"{where}: empty codes")
        if codes.dtype.kind not in "iu":
            raise RowError(f"{where}: expected integer codes, got {codes.dtype} values")
        return self.check_codes(codes, where)

    def prompt_codes_for_row(self, row: dict) -> np.ndarray | None:
        """Prompt codes from ``row["meta"][prompt_codes_field]`` in the forms of :meth:`codes_for_row`."""
        return self.codes_for_row(row, self.prompt_codes_field)

    def _stream_codes(self, value: Any, where: str) -> np.ndarray:
        """A stream given as ``<audio_N>`` text, flat LLM ids or one code list per codebook → checked LLM ids."""
        stream = self.stream
        assert stream is not None
        try:
            if isinstance(value, str):
                return stream.check(np.asarray(parse_audio_tokens(value, where), dtype=np.int64) + stream.first_id)
            if not isinstance(value, list) or not value:
                raise RowError(f"{where}: expected <audio_N> tokens, a list of LLM ids or {len(stream.sizes)} code "
                               f"lists, got {type(value).__name__}")
            if all(isinstance(v, list) for v in value):
                return stream.interleave_codes(value)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise RowError(f"{where}: expected integer ids (or one list of codes per codebook)")
            return stream.check(value)
        except CodeStreamError as err:
            kind = StreamOutOfRange if err.out_of_range else RowError
            raise kind(f"{where}: {err} (tokenize.audio_tokenizer.codebook_offsets / codebook_sizes / "
                       "interleave)") from None

    def moss_records(self) -> Iterator[dict]:
        """:func:`iter_moss_shards` over ``moss_path``, with codes range-checked (bad ones carry ``error``)."""
        if self.moss_path is None:
            raise TokenizerError("tokenize.audio_tokenizer.moss_path: not set")
        for record in iter_moss_shards(self.moss_path, self.trust_pickle):
            if "codes" in record:
                try:
                    record["codes"] = self.check_codes(record["codes"], record["source"])
                except RowError as err:
                    record = {"source": record["source"], "index": record["index"], "error": err}
            yield record

    def params(self) -> dict[str, Any]:
        return {
            "codes_field": self.codes_field, "num_codebooks": self.num_codebooks, "token_rate": self.token_rate,
            "vocab_size": self.vocab_size, "max_code": self.max_code, "prompt_codes_field": self.prompt_codes_field,
            "codebook_offsets": list(self.stream.offsets) if self.stream else None,
            "codebook_sizes": list(self.stream.sizes) if self.stream else None,
            "interleave": list(self.stream.interleave) if self.stream else None,
        }

    @classmethod
    def _from_state(cls, directory: Path, params: dict[str, Any]) -> "PrecomputedTokenizer":
        return cls(**params)
