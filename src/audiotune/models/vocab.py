"""How text tokens, special markers and audio codes share one LM vocabulary.

Text ids come from the text tokenizer (the Tokens artifact's ``tokenizer/``), to which
the segment markers below are added as special tokens. Audio codes of codebook 0 map
to ``audio_offset + code``: either appended after the text vocabulary (``append``:
embeddings are resized) or at a configured offset where the base model already has
audio tokens (``offset``: Step-Audio-EditX, CosyVoice LMs). Codebooks 1..C-1 of a
multi-codebook model (MOSS-TTSD style) have their own embedding tables and heads of
``codebook_size + 2`` entries: the codes, the delay filler and padding.

Codes already in the LM's vocabulary (Step-Audio-EditX): a :class:`CodeStream` describes
codebooks whose codes sit at fixed LM ids (codebook k's code c is ``offsets[k] + c``) and
are interleaved in one stream (``interleave[k]`` ids of codebook k per group, in codebook
order). Such Tokens hold the stream's LM ids themselves; the vocabulary then covers the ids
from the first codebook's offset to the end of the last one, in ``offset`` mode, and
:func:`step_pairs_from_interleaved` turns a stream into the flow's time-aligned pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from audiotune.errors import DataError

SEGMENT_TOKENS = [
    "<|audio_start|>", "<|audio_end|>", "<|prompt_start|>", "<|prompt_end|>", "<|instruction|>",
    "<|task_tts|>", "<|task_clone|>", "<|task_edit|>", "<|task_understand|>", "<|task_music|>",
]
IGNORE_INDEX = -100


@dataclass
class AudioVocab:
    """Ids of every kind of token in the LM's vocabulary.

    Attributes:
        text_vocab_size: Size of the text tokenizer with the segment markers added.
        special_ids: Segment marker → id.
        codebook_size: Codes per codebook.
        num_codebooks: Codebooks per frame (1 for CosyVoice-style LMs).
        audio_offset: LM id of code 0 of codebook 0.
        pad_id: Padding id of channel 0 (never a loss target).
        eos_id: End of sequence (the text tokenizer's).
        extra: Values a base family overrides (``filler_id``, ``channel_pad_id``).
        code_stream: With Tokens of LM ids (a :class:`CodeStream` as a dict): the Tokens' codes are
            LM ids in ``[audio_offset, audio_offset + codebook_size)``, used as they are.
        prompt_format: A chat frame (:func:`tokenized_format`) that replaces the segment markers.
    """

    text_vocab_size: int
    special_ids: dict[str, int]
    codebook_size: int
    num_codebooks: int
    audio_offset: int
    pad_id: int
    eos_id: int
    extra: dict = field(default_factory=dict)
    code_stream: dict | None = None  # CodeStream.to_dict(): the Tokens hold LM ids of that stream
    prompt_format: dict | None = None  # a chat frame of its own (tokenized_format); None: segment markers

    @property
    def lm_vocab_size(self) -> int:
        """Rows the LM's embedding (channel 0) needs."""
        return max(self.text_vocab_size, self.audio_offset + self.codebook_size)

    @property
    def filler_id(self) -> int:
        """Delay-pattern filler of codebooks 1..C-1 (their own tables); a base family may set it in ``extra``."""
        return int(self.extra.get("filler_id", self.codebook_size))

    @property
    def channel_pad_id(self) -> int:
        """Padding of codebooks 1..C-1 (their own tables); a base family may set it in ``extra``
        (MOSS-TTSD: one speech pad id serves as filler and padding)."""
        return int(self.extra.get("channel_pad_id", self.codebook_size + 1))

    def new_token_ids(self, base_vocab_size: int) -> list[int]:
        """LM ids that did not exist in the base model (trainable under LoRA)."""
        return list(range(base_vocab_size, self.lm_vocab_size))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AudioVocab":
        return cls(**data)


def build_vocab(tokenizer, codebook_size: int, num_codebooks: int, mode: str = "append",
                offset: int | None = None) -> AudioVocab:
    """Add the segment markers to ``tokenizer`` (in place) and lay out the audio ids.

    Args:
        tokenizer: A Hugging Face tokenizer (the Tokens artifact's).
        codebook_size: Codes per codebook of the audio tokenizer.
        num_codebooks: Codebooks per frame.
        mode: ``append`` (audio ids after the text vocabulary) or ``offset``.
        offset: With ``offset``: the LM id of audio code 0.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": SEGMENT_TOKENS})
    text_size = len(tokenizer)
    if mode == "append":
        audio_offset = text_size
    elif mode == "offset":
        if offset is None:
            raise ValueError("llm.audio_token_offset must be set when llm.audio_tokens is 'offset'")
        audio_offset = offset
        if audio_offset < text_size and audio_offset + codebook_size > 0:
            overlap = range(max(audio_offset, 0), min(audio_offset + codebook_size, text_size))
            specials = [t for t, i in zip(SEGMENT_TOKENS, tokenizer.convert_tokens_to_ids(SEGMENT_TOKENS),
                                          strict=True) if i in overlap]
            if specials:
                raise ValueError(f"audio ids [{audio_offset}, {audio_offset + codebook_size}) overlap the "
                                 f"segment markers {specials}")
    else:
        raise ValueError(f"unknown audio token mode {mode!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return AudioVocab(
        text_vocab_size=text_size,
        special_ids=dict(zip(SEGMENT_TOKENS, tokenizer.convert_tokens_to_ids(SEGMENT_TOKENS), strict=True)),
        codebook_size=codebook_size, num_codebooks=num_codebooks, audio_offset=audio_offset,
        pad_id=int(pad), eos_id=int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad),
    )


# -- codes at fixed LM ids, interleaved in one stream (Step-Audio-EditX) --------------------------------
class StreamError(DataError, ValueError):
    """A stream of LM ids that does not follow its :class:`CodeStream` (length or id at a position).

    Attributes:
        out_of_range: True when an id lies outside its codebook's ids (False: the length is wrong).
    """

    def __init__(self, message: str, out_of_range: bool):
        super().__init__(message)
        self.out_of_range = out_of_range


@dataclass(frozen=True)
class CodeStream:
    """Codebooks at fixed LM ids, interleaved in one stream.

    Attributes:
        offsets: LM id of code 0 of each codebook (Step-Audio-EditX: 65536, 65536 + 1024).
        sizes: Codes per codebook (Step-Audio-EditX: 1024 for vq02, 4096 for vq06).
        interleave: Ids of each codebook per group, in codebook order (Step-Audio-EditX: 2, 3).
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    interleave: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("offsets", "sizes", "interleave"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        n = len(self.offsets)
        if n == 0 or len(self.sizes) != n or len(self.interleave) != n:
            raise ValueError(f"codebook_offsets {list(self.offsets)}, codebook_sizes {list(self.sizes)} and "
                             f"interleave {list(self.interleave)} must be non-empty lists of the same length")
        if min(self.offsets) < 0 or min(self.sizes) < 1 or min(self.interleave) < 1:
            raise ValueError(f"codebook_offsets must be >= 0, codebook_sizes and interleave >= 1 (got "
                             f"{list(self.offsets)}, {list(self.sizes)}, {list(self.interleave)})")
        ranges = sorted(self.id_ranges)
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:], strict=False):
            if b0 < a1:
                raise ValueError(f"codebook id ranges [{a0}, {a1}) and [{b0}, {b1}) overlap "
                                 "(codebook_offsets / codebook_sizes)")

    @property
    def id_ranges(self) -> list[tuple[int, int]]:
        """``[first, end)`` LM ids of every codebook."""
        return [(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True)]

    @property
    def first_id(self) -> int:
        """The lowest audio LM id (the vocabulary's ``audio_offset``)."""
        return min(self.offsets)

    @property
    def span(self) -> int:
        """Audio ids from :attr:`first_id` to the end of the last codebook (the vocabulary's ``codebook_size``)."""
        return max(end for _, end in self.id_ranges) - self.first_id

    @property
    def group(self) -> int:
        """Ids per group."""
        return sum(self.interleave)

    @property
    def pattern(self) -> np.ndarray:
        """Codebook of every position within a group, e.g. ``[0, 0, 1, 1, 1]``."""
        return np.repeat(np.arange(len(self.interleave)), self.interleave)

    def interleave_codes(self, codes: list[Any]) -> np.ndarray:
        """Raw codes of each codebook → the stream of LM ids (int64).

        As Step-Audio-EditX's tokenizer does: only complete groups are kept (as many as the shortest
        codebook fills), leftover codes at the end are dropped.

        Raises:
            StreamError: A code outside ``[0, size)`` of its codebook, or not one complete group.
        """
        if len(codes) != len(self.sizes):
            raise StreamError(f"{len(codes)} code lists, expected {len(self.sizes)} (one per codebook)", False)
        books = [np.asarray(c, dtype=np.int64).reshape(-1) for c in codes]
        for k, book in enumerate(books):
            bad = np.flatnonzero((book < 0) | (book >= self.sizes[k]))
            if len(bad):
                raise StreamError(f"codebook {k} code {int(book[bad[0]])} at index {int(bad[0])} is outside "
                                  f"[0, {self.sizes[k]}) (codebook_sizes[{k}])", True)
        groups = min(len(b) // n for b, n in zip(books, self.interleave, strict=True))
        if groups == 0:
            raise StreamError(f"codebook lengths {[len(b) for b in books]} fill no group of {list(self.interleave)}",
                              False)
        parts = [(b[: groups * n].reshape(groups, n) + o) for b, n, o in
                 zip(books, self.interleave, self.offsets, strict=True)]
        return np.concatenate(parts, axis=1).reshape(-1)

    def check(self, ids: Any) -> np.ndarray:
        """``ids`` as int64 [T] after checking the length and that every position holds its codebook's ids.

        Raises:
            StreamError: The length is not a positive multiple of :attr:`group`, or an id lies outside the
                ids of the codebook its position belongs to.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0 or len(ids) % self.group:
            raise StreamError(f"{len(ids)} ids is not a positive multiple of {self.group} (interleave "
                              f"{list(self.interleave)})", False)
        book = np.tile(self.pattern, len(ids) // self.group)
        low, end = np.asarray(self.offsets)[book], (np.asarray(self.offsets) + np.asarray(self.sizes))[book]
        bad = np.flatnonzero((ids < low) | (ids >= end))
        if len(bad):
            i = int(bad[0])
            raise StreamError(f"id {int(ids[i])} at position {i} is outside codebook {int(book[i])}'s ids "
                              f"[{int(low[i])}, {int(end[i])}) ({len(bad)} such positions)", True)
        return ids

    def deinterleave(self, ids: Any) -> list[np.ndarray]:
        """A checked stream → raw codes of each codebook (the inverse of :meth:`interleave_codes`)."""
        groups = self.check(ids).reshape(-1, self.group)
        bounds = np.cumsum([0, *self.interleave])
        return [(groups[:, a:b] - o).reshape(-1) for a, b, o in zip(bounds, bounds[1:], self.offsets, strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return {"codebook_offsets": list(self.offsets), "codebook_sizes": list(self.sizes),
                "interleave": list(self.interleave), "id_ranges": [list(r) for r in self.id_ranges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CodeStream":
        return cls(data["codebook_offsets"], data["codebook_sizes"], data["interleave"])


def step_pairs_from_interleaved(ids: Any, offsets: Any, sizes: Any, interleave: Any) -> np.ndarray:
    """An interleaved stream of LM ids → time-aligned ids ``[frames, codebooks]`` for a dual-codebook flow.

    The arithmetic of Step-Audio-EditX's ``CosyVoice._reshape``: every group of ``sum(interleave)``
    ids becomes ``max(interleave)`` frames. Column k holds codebook k's raw codes shifted into one
    shared table where every codebook is followed by a pad row (codebook 0 at rows ``[0, sizes[0])``,
    its pad at ``sizes[0]``, codebook 1 from ``sizes[0] + 1`` on, ...); a codebook with fewer ids than
    frames per group is padded at the group's end. A trailing partial group is first completed with
    code 0 of each missing position's codebook, as upstream does. With Step-Audio-EditX's layout
    (``[65536, 66560]``, ``[1024, 4096]``, ``[2, 3]``), ``[a, b, x, y, z]`` becomes
    ``[[a', x'], [b', y'], [1024, z']]`` with ``a' = a - 65536`` and ``x' = x - 66560 + 1025``.

    Args:
        ids: The stream [T] (LM ids; pass offsets relative to another origin for other ids).
        offsets: Id of code 0 of each codebook in ``ids``.
        sizes: Codes per codebook.
        interleave: Ids of each codebook per group.

    Returns:
        int64 ``[frames, len(sizes)]``.

    Raises:
        StreamError: An id outside the ids of its position's codebook.
    """
    stream = CodeStream(offsets, sizes, interleave)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    missing = (-len(ids)) % stream.group
    if missing:
        fill = np.asarray(stream.offsets)[stream.pattern[stream.group - missing:]]
        ids = np.concatenate([ids, fill])
    codes = stream.deinterleave(ids)
    frames, groups = max(stream.interleave), len(ids) // stream.group
    base = np.cumsum([0, *(s + 1 for s in stream.sizes)])[:-1]
    out = np.empty((groups, frames, len(codes)), dtype=np.int64)
    for k, (book, n) in enumerate(zip(codes, stream.interleave, strict=True)):
        out[:, :n, k] = book.reshape(groups, n) + base[k]
        out[:, n:, k] = base[k] + stream.sizes[k]  # the codebook's pad row
    return out.reshape(groups * frames, len(codes))


def audio_token_settings(audio: dict | None, mode: str, offset: int | None) -> tuple[str, int | None]:
    """``(llm.audio_tokens, llm.audio_token_offset)`` for Tokens whose manifest's audio section is ``audio``.

    Tokens of LM ids (a ``code_stream``) fix them: ``offset`` at the stream's first id. Otherwise the
    configured values stay.

    Raises:
        ValueError: ``llm.audio_token_offset`` is set to another id than the Tokens' first audio id.
    """
    stream = (audio or {}).get("code_stream")
    if not stream:
        return mode, offset
    first = CodeStream.from_dict(stream).first_id
    if mode == "offset" and offset is not None and offset != first:
        raise ValueError(f"llm.audio_token_offset={offset}, but the Tokens hold LM ids from {first} "
                         "(tokenize.audio_tokenizer.codebook_offsets); unset it or set it to that id")
    return "offset", first


def vocab_for_tokens(tokenizer, audio: dict | None, mode: str = "append", offset: int | None = None,
                     prompt_format: str | None = None) -> AudioVocab:
    """:func:`build_vocab` as the Tokens manifest's audio section (``audio``) says.

    Tokens of LM ids (``code_stream``) get an ``offset`` vocabulary over the stream's ids, whatever
    ``mode`` says; others get ``mode`` / ``offset``. ``prompt_format`` names a frame of
    :data:`PROMPT_FORMATS` (None or ``audiotune``: the segment markers).
    """
    audio = audio or {"codebook_size": 0, "num_codebooks": 1}
    mode, offset = audio_token_settings(audio, mode, offset)
    stream = audio.get("code_stream")
    size = CodeStream.from_dict(stream).span if stream else int(audio.get("codebook_size") or 0)
    vocab = build_vocab(tokenizer, size, int(audio.get("num_codebooks") or 1), mode, offset)
    vocab.code_stream = dict(stream) if stream else None
    if prompt_format not in (None, "audiotune"):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"llm.prompt_format={prompt_format!r}: unknown (expected audiotune or one of "
                             f"{sorted(PROMPT_FORMATS)})")
        vocab.prompt_format = tokenized_format(prompt_format, tokenizer)
    return vocab


# -- chat frames of other systems: fixed pieces around the row's ids ----------------------------------------
# A frame is, per layout, a list of: an int (a fixed id), a str (text, tokenized once with the Tokens'
# tokenizer) or a slot in braces: {text} {prompt_text} {instruction} (the row's ids), {prompt_audio} (its
# prompt codes), {audio} (its target codes, the loss) and {eos} (the tokenizer's end, a target too).
_STEP_CLONE_HEAD = "Generate audio with the following timbre, prosody and speaking style\n"
_STEP_EDIT_SYSTEM = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions and "
    "applying precise adjustments to meet their needs. Your expertise spans a wide range of enhancement "
    "capabilities, including but not limited to:\n# Emotional Enhancement\n# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n# Audio Tuning & Editing\nNote: You will receive instructions in natural "
    "language and are expected to accurately interpret and execute the most suitable audio edits and "
    "enhancements.\n")
_STEP_BOS, _STEP_BOT, _STEP_EOT = 1, 4, 3  # the ids Step-Audio-EditX's tts.py writes around every turn
_STEP_ANSWER = [_STEP_EOT, _STEP_BOT, "assistant\n", "{audio}", "{eos}"]
PROMPT_FORMATS: dict[str, dict[str, list]] = {
    "step-audio-editx": {  # tts.py: _encode_audio_edit_clone_prompt / _encode_audio_edit_prompt
        "clone": [_STEP_BOS, _STEP_BOT, "system\n" + _STEP_CLONE_HEAD + "\n[speaker_start]\nspeaker name: clone\n"
                  "speaker prompt text: \n", "{prompt_text}", "\nspeaker audio tokens: \n", "{prompt_audio}",
                  "\n[speaker_end]\n", _STEP_EOT, _STEP_BOT, "human\n", "{text}", *_STEP_ANSWER],
        "edit": [_STEP_BOS, _STEP_BOT, "system\n" + _STEP_EDIT_SYSTEM, _STEP_EOT, _STEP_BOT, "human\n",
                 "{instruction}", "\n", "{prompt_audio}", "\n", *_STEP_ANSWER],
        "tts": [_STEP_BOS, _STEP_BOT, "system\n" + _STEP_CLONE_HEAD, _STEP_EOT, _STEP_BOT, "human\n", "{text}",
                *_STEP_ANSWER],
    },
}
FORMAT_SLOTS = ("{text}", "{prompt_text}", "{instruction}", "{prompt_audio}", "{audio}", "{eos}")


def tokenized_format(name: str, tokenizer) -> dict[str, Any]:
    """``PROMPT_FORMATS[name]`` with its text pieces turned into ids by ``tokenizer`` (no special tokens added)."""
    layouts = {}
    for layout, pieces in PROMPT_FORMATS[name].items():
        out: list = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append([piece])
            elif piece in FORMAT_SLOTS:
                out.append(piece.strip("{}"))
            else:
                out.append(list(tokenizer(piece, add_special_tokens=False)["input_ids"]))
        layouts[layout] = out
    return {"name": name, "layouts": layouts}
