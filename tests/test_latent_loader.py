"""The latent loader: batches per contract, split by rank and worker, resampling, S3."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.data.encode import encode_dataset
from components.data.latent_loader import make_loader
from components.data.shards import index_shards
from components.data.text_embeddings import pipeline_text_embedder, text_encoder_fingerprint
from components.models.base_model import fingerprints_of, module_fingerprint
from components.storage.storage import Storage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny_models import tiny_pipeline

N, SHARD = 40, 5  # samples, samples per latent shard -> 8 shards


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A small img2dataset-style source (varied sizes), its manifest, and its latent shards."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    rows = []
    (tmp / "source").mkdir()
    with tarfile.open(tmp / "source" / "00000.tar", "w") as tar:
        for i in range(N):
            key = f"00000{i:04d}"
            w, h = (32, 32) if i % 3 else (48, 32)  # some need a crop
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            rows.append({"key": key, "caption": f"a handwritten digit {['zero', 'one'][i % 2]}",
                         "shard": "00000.tar", "member": f"{key}.jpg"})
    storage = Storage(str(tmp / "root"))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes("curated/manifest.parquet", buf.getvalue())
    pipe = tiny_pipeline("sd15", tmp / "pipe")
    result = encode_dataset(storage, "curated/manifest.parquet", Storage(str(tmp / "source")), pipe.vae,
                            module_fingerprint(pipe.vae), resolution=32, batch_size=8, shard_size=SHARD,
                            text_embedder=pipeline_text_embedder(pipe, "sd15"),
                            text_encoder_fingerprint=text_encoder_fingerprint(fingerprints_of(pipe)))
    assert result.samples == N
    return storage, result.index_rel, [r["key"] for r in rows]


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def test_batches_carry_latents_captions_conditioning_and_embeddings(encoded):
    storage, index_rel, keys = encoded
    batch = next(iter(make_loader(storage, index_rel, batch_size=8, shuffle=False)))
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (8, 4, 8, 8)
    assert len(batch["captions"]) == 8 and batch["captions"][0].startswith("a handwritten digit")
    for name in ("original_size", "crop_top_left", "target_size"):
        assert batch[name].dtype == torch.long and batch[name].shape == (8, 2)
    by_key = dict(zip(batch["keys"], batch["original_size"].tolist(), strict=True))
    assert by_key[keys[0]] == [32, 48] and by_key[keys[1]] == [32, 32]  # (h, w) of the source image
    crops = dict(zip(batch["keys"], batch["crop_top_left"].tolist(), strict=True))
    assert crops[keys[0]] == [0, 8]
    assert batch["target_size"].tolist()[0] == [32, 32]
    assert batch["prompt_embeds"].dtype == torch.float32 and batch["prompt_embeds"].shape[0] == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_yields_every_sample_once(encoded, workers):
    storage, index_rel, keys = encoded
    loader = make_loader(storage, index_rel, batch_size=6, num_workers=workers, seed=3)
    first = _keys(loader)
    assert sorted(first) == sorted(keys) and len(first) == N
    assert first != sorted(first)  # shuffled
    loader.dataset.set_epoch(1)
    second = _keys(loader)
    assert sorted(second) == sorted(keys) and second != first  # reshuffled per epoch


def test_two_ranks_with_two_workers_split_without_loss_or_doubles(encoded):
    storage, index_rel, keys = encoded
    per_rank = [_keys(make_loader(storage, index_rel, batch_size=4, num_workers=2, rank=r, world_size=2, seed=7))
                for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2  # 8 shards of 5: 4 shards per rank


def test_resample_keeps_going_past_an_epoch(encoded):
    storage, index_rel, keys = encoded
    loader = make_loader(storage, index_rel, batch_size=8, resample=True, rank=0, world_size=2)
    it = iter(loader)
    seen = [k for _ in range(12) for k in next(it)["keys"]]  # 96 samples from a 40-sample set
    assert len(seen) == 96 and set(seen) <= set(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_ranks_hold_their_rows_of_one_process_global_batches(encoded, workers):
    """2 ranks of batch 3 get, batch by batch, the halves of 1 process's batches of 6 (same seed and workers)."""
    storage, index_rel, _ = encoded

    def batches(batch_size: int, rank: int, world_size: int) -> list[dict]:
        it = iter(make_loader(storage, index_rel, batch_size, resample=True, seed=4, num_workers=workers, rank=rank,
                              world_size=world_size, drop_last=True))
        return [next(it) for _ in range(10)]  # 60 samples: past one epoch of 40

    one, r0, r1 = batches(6, 0, 1), batches(3, 0, 2), batches(3, 1, 2)
    for whole, a, b in zip(one, r0, r1, strict=True):
        assert a["keys"] + b["keys"] == whole["keys"]
        assert torch.equal(torch.cat([a["latents"], b["latents"]]), whole["latents"])
        assert a["captions"] + b["captions"] == whole["captions"]
    assert [a["keys"] for a in r0] != [b["keys"] for b in r1]  # the ranks train on different rows


def test_loader_errors_are_clear(encoded, tmp_path):
    storage, index_rel, _ = encoded
    with pytest.raises(Exception, match="no latent index; run `lcmlora encode` first"):
        make_loader(storage, "latents/missing/index.json", batch_size=4)
    bad = Storage(str(tmp_path))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("k1.jpg")
        tar.addfile(info, io.BytesIO(b""))
    index = json.loads(storage.read_text(index_rel))
    index["shards"] = [{"name": "00000.tar", "count": 1, "sha256": ""}]
    bad.write_text("index.json", json.dumps(index))
    with pytest.raises(ValueError, match="sample k1 has no .latent.npy; not a latent shard"):
        next(iter(make_loader(bad, "index.json", batch_size=1)))


def test_loader_reads_shards_from_s3(encoded, s3_env):
    storage, index_rel, keys = encoded
    bucket = s3_env.make_bucket()
    remote = s3_env.storage(bucket, "artifacts")
    folder = index_rel.rsplit("/", 1)[0]
    for rel in [index_rel, *index_shards(storage, index_rel)]:
        remote.put_file(storage.url(rel), rel)
    assert folder.startswith("latents/")
    got = _keys(make_loader(remote, index_rel, batch_size=8, num_workers=2))
    assert sorted(got) == sorted(keys)
