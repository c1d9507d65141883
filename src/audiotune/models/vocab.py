"""How text tokens, special markers and audio codes share one LM vocabulary.

Text ids come from the text tokenizer (the Tokens artifact's ``tokenizer/``), to which
the segment markers below are added as special tokens. Audio codes of codebook 0 map
to ``audio_offset + code``: either appended after the text vocabulary (``append``:
embeddings are resized) or at a configured offset where the base model already has
audio tokens (``offset``: Step-Audio-EditX, CosyVoice LMs). Codebooks 1..C-1 of a
multi-codebook model (MOSS-TTSD style) have their own embedding tables and heads of
``codebook_size + 2`` entries: the codes, the delay filler and padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    """

    text_vocab_size: int
    special_ids: dict[str, int]
    codebook_size: int
    num_codebooks: int
    audio_offset: int
    pad_id: int
    eos_id: int
    extra: dict = field(default_factory=dict)

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
