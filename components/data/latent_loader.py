"""Loader of latent shards (DESIGN contract 3, components/data/shards.py) for distillation: a webdataset pipeline.

    loader = make_loader(storage, "latents/<vae_fp>/.../index.json", batch_size=8)
    for batch in loader:  # dict of tensors and lists
        batch["latents"]         float32 B x C x h x w, VAE latent mean, NOT yet scaled
        batch["captions"]        list[str]
        batch["original_size"]   LongTensor B x 2 (h, w)   SDXL micro-conditioning
        batch["crop_top_left"]   LongTensor B x 2 (top, left)
        batch["target_size"]     LongTensor B x 2 (h, w)
        batch["keys"]            list[str]
        batch["prompt_embeds"]   float32 B x L x D         only when shards carry KEY.emb.npy
        batch["pooled_prompt_embeds"] float32 B x D        only when shards carry KEY.pooled.npy

Shards are split first by rank (node), then by DataLoader worker, so within an epoch without
resampling every sample is yielded exactly once across all ranks and workers (the shard
order is shuffled with `seed + epoch`, identical on every rank; call
`loader.dataset.set_epoch(e)` between epochs). With `resample=True` each DataLoader worker
draws shards with replacement forever (training by steps) into one GLOBAL stream, the same on
every rank: its batches hold `batch_size x world_size` samples, and rank r keeps (decodes) rows
`[r*batch_size, (r+1)*batch_size)`. So 2 ranks of batch b see exactly the samples of 1 process
of batch 2b, and 1 process sees what it saw before the stream was shared (it is keyed as rank
0's was). The stream depends on `num_workers` (one per worker, interleaved by the DataLoader):
compare runs at the same `num_workers`. Shards are read through `Storage`, so local and `s3://`
roots both work.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from components.data.shards import decode_sample, index_shards
from components.storage.storage import Storage

SHUFFLE_BUFFER = 1000  # samples held for shuffling inside each worker


def _seed(*parts: int) -> int:
    """A reproducible seed from integers (Python's hash() of str is salted per process)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A list of decoded samples -> one batch dict (see the module docstring)."""
    batch: dict[str, Any] = {
        "latents": torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float32)),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
    }
    if all("emb" in s for s in samples):
        batch["prompt_embeds"] = torch.from_numpy(np.stack([s["emb"] for s in samples]).astype(np.float32))
    if all("pooled" in s for s in samples):
        batch["pooled_prompt_embeds"] = torch.from_numpy(np.stack([s["pooled"] for s in samples]).astype(np.float32))
    return batch


class LatentDataset(IterableDataset):
    """Iterable of batches over latent shards, split by rank and worker."""

    def __init__(self, storage: Storage, shards: list[str], batch_size: int, *, shuffle: bool, resample: bool,
                 seed: int, rank: int | None, world_size: int | None, drop_last: bool):
        if not shards:
            raise ValueError("latent loader: the index lists no shards (nothing was encoded?)")
        self.storage, self.shards, self.batch_size = storage, list(shards), batch_size
        self.shuffle, self.resample, self.seed, self.drop_last = shuffle, resample, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for a new epoch (same order on every rank)."""
        self.epoch = epoch

    def _worker(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = pytorch_worker_info()
        return (self.rank if self.rank is not None else rank,
                self.world_size if self.world_size is not None else world, worker, workers)

    def _stream_key(self) -> tuple[int, int]:
        """(stream, worker) keying the random draws: resampled, every rank draws rank 0's (global) stream."""
        rank, _, worker, _ = self._worker()
        return (0 if self.resample else rank), worker

    def _shard_stream(self) -> Iterator[str]:
        rank, world, worker, workers = self._worker()
        if self.resample:
            # Reproducible infinite draws per (seed, epoch, worker), identical on every rank.
            rng = random.Random(_seed(self.seed, self.epoch, *self._stream_key(), 0))
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        # 1. by rank, 2. by worker: disjoint and complete.
        yield from order[rank::world][worker::workers]

    def _open(self, names: Iterator[str]) -> Iterator[dict[str, Any]]:
        for name in names:
            with self.storage.open(name) as fh:
                yield {"url": self.storage.url(name), "stream": fh}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, _, _ = self._worker()
        samples: Iterator[dict[str, Any]] = group_by_keys(tar_file_expander(self._open(self._shard_stream())))
        if self.shuffle:
            rng = random.Random(_seed(self.seed, self.epoch, *self._stream_key(), 1))
            samples = wds.filters.shuffle(bufsize=SHUFFLE_BUFFER, initial=min(100, SHUFFLE_BUFFER), rng=rng)(samples)
        if not self.resample:  # this rank's shards: every sample of them, in batches
            for group in wds.filters.batched(batchsize=self.batch_size, collation_fn=None,
                                             partial=not self.drop_last)(samples):
                yield collate([decode_sample(s) for s in group])
            return
        # The global batch (batch_size x world_size, endless: never partial); only this rank's rows are decoded.
        rows = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        for group in wds.filters.batched(batchsize=self.batch_size * world, collation_fn=None, partial=False)(samples):
            yield collate([decode_sample(s) for s in group[rows]])


def make_loader(storage: Storage, index_rel: str, batch_size: int, *, shuffle: bool = True, resample: bool = False,
                seed: int = 0, num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader of batch dicts over the shards of `index_rel` (see the module docstring).

    `rank`/`world_size` default to the torch.distributed group (or RANK/WORLD_SIZE).
    """
    dataset = LatentDataset(storage, index_shards(storage, index_rel), batch_size, shuffle=shuffle,
                            resample=resample, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
