"""Batches of cached ACE-Step songs for the training engine (``repeat_count`` honoured)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from audiotune.models.acestep.latents import LatentSplit, silence_context


class AceStepBatches:
    """The engine's batch source over a :class:`LatentSplit`.

    Each song appears ``repeat_count`` times per epoch (when ``repeat``); the order is shuffled per epoch
    from ``seed``; batches are dealt round-robin to the processes, the short ones padded with repeats
    (flagged by :meth:`repeats`, weighed 0 in validation). Songs of a batch are padded to its longest
    latents and conditioning; the loss masks padded frames (the transformer has no cross-attention mask,
    so padded conditioning is seen: ACE-Step trains one song per batch, ``max_batch_size: 1``).
    """

    def __init__(self, split: LatentSplit, shared: dict[str, torch.Tensor], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True, repeat: bool = True):
        self.split = split
        self.silence = shared["silence_latent"]
        self.null_cond = shared["null_condition_emb"]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle, self.repeat = shuffle, repeat

    def _dealt(self, epoch: int) -> tuple[list[list[int]], list[bool]]:
        order = [i for i, e in enumerate(self.split.entries) for _ in range(e.repeat_count if self.repeat else 1)]
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        groups = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = groups[self.rank::self.world]
        per_process = -(-len(groups) // self.world)
        flags = [False] * len(mine)
        while len(mine) < per_process:  # repeat a batch so that every process runs as many
            mine.append(groups[len(mine) % len(groups)])
            flags.append(True)
        return mine, flags

    def batches(self, epoch: int) -> list[list[int]]:
        return self._dealt(epoch)[0]

    def repeats(self, epoch: int) -> list[bool]:
        return self._dealt(epoch)[1]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [self.split.tensors(i) for i in indices]
        frames = max(lat.shape[0] for lat, _ in pairs)
        cond_len = max(c.shape[0] for _, c in pairs)
        latents = torch.stack([F.pad(lat.float(), (0, 0, 0, frames - lat.shape[0])) for lat, _ in pairs])
        cond = torch.stack([F.pad(c.float(), (0, 0, 0, cond_len - c.shape[0])) for _, c in pairs])
        mask = torch.stack([(torch.arange(frames) < lat.shape[0]).float() for lat, _ in pairs])
        context = silence_context(self.silence.float(), frames).unsqueeze(0).expand(len(pairs), -1, -1)
        return {"latents": latents, "cond": cond, "frame_mask": mask, "context": context.contiguous(),
                "null_cond": self.null_cond.float()}
