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
:func:`step_pairs_from_interleaved` turns a stream into the flow's time-aligned pairs. Both
live in :mod:`audiotune.data.code_stream` (the data layer checks Tokens with them) and are
re-exported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from audiotune.data.code_stream import CodeStream, CodeStreamError, step_pairs_from_interleaved

__all__ = [  # CodeStream, CodeStreamError and step_pairs_from_interleaved live in audiotune.data.code_stream
    "FORMAT_SLOTS", "IGNORE_INDEX", "PROMPT_FORMATS", "SEGMENT_TOKENS", "AudioVocab", "CodeStream", "CodeStreamError",
    "audio_token_settings", "build_vocab", "step_pairs_from_interleaved", "tokenized_format", "vocab_for_tokens",
]

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
