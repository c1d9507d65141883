"""Codebooks whose codes sit at fixed LM ids, interleaved in one stream (Step-Audio-EditX).

A :class:`CodeStream` describes such codebooks: codebook k's code c is the LM id ``offsets[k] + c``, and a
stream holds ``interleave[k]`` ids of codebook k per group, in codebook order. Tokens of such a stream hold
its LM ids themselves (the tokenize stage interleaves precomputed codes, the LM vocabulary of
:mod:`audiotune.models.vocab` covers them); :func:`step_pairs_from_interleaved` turns a stream into a
dual-codebook flow's time-aligned pairs, which the data checks of Tokens against a flow use too. The layout
itself is checked by :func:`audiotune.config.data.check_code_stream_layout`, shared with the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from audiotune.config.data import check_code_stream_layout
from audiotune.errors import DataError

__all__ = ["CodeStream", "CodeStreamError", "step_pairs_from_interleaved"]


class CodeStreamError(DataError, ValueError):
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

    def __post_init__(self) -> None:  # ValueError naming the fields (the config's own check of the layout)
        layout = check_code_stream_layout(self.offsets, self.sizes, self.interleave)
        for name, values in zip(("offsets", "sizes", "interleave"), layout, strict=True):
            object.__setattr__(self, name, values)

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
            CodeStreamError: A code outside ``[0, size)`` of its codebook, or not one complete group.
        """
        if len(codes) != len(self.sizes):
            raise CodeStreamError(f"{len(codes)} code lists, expected {len(self.sizes)} (one per codebook)", False)
        books = [np.asarray(c, dtype=np.int64).reshape(-1) for c in codes]
        for k, book in enumerate(books):
            bad = np.flatnonzero((book < 0) | (book >= self.sizes[k]))
            if len(bad):
                raise CodeStreamError(f"codebook {k} code {int(book[bad[0]])} at index {int(bad[0])} is outside "
                                  f"[0, {self.sizes[k]}) (codebook_sizes[{k}])", True)
        groups = min(len(b) // n for b, n in zip(books, self.interleave, strict=True))
        if groups == 0:
            lengths = [len(b) for b in books]
            raise CodeStreamError(f"codebook lengths {lengths} fill no group of {list(self.interleave)}", False)
        parts = [(b[: groups * n].reshape(groups, n) + o) for b, n, o in
                 zip(books, self.interleave, self.offsets, strict=True)]
        return np.concatenate(parts, axis=1).reshape(-1)

    def check(self, ids: Any) -> np.ndarray:
        """``ids`` as int64 [T] after checking the length and that every position holds its codebook's ids.

        Raises:
            CodeStreamError: The length is not a positive multiple of :attr:`group`, or an id lies outside the
                ids of the codebook its position belongs to.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0 or len(ids) % self.group:
            raise CodeStreamError(f"{len(ids)} ids is not a positive multiple of {self.group} (interleave "
                              f"{list(self.interleave)})", False)
        book = np.tile(self.pattern, len(ids) // self.group)
        low, end = np.asarray(self.offsets)[book], (np.asarray(self.offsets) + np.asarray(self.sizes))[book]
        bad = np.flatnonzero((ids < low) | (ids >= end))
        if len(bad):
            i = int(bad[0])
            raise CodeStreamError(f"id {int(ids[i])} at position {i} is outside codebook {int(book[i])}'s ids "
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
        CodeStreamError: An id outside the ids of its position's codebook.
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
