"""The latent-shard contract (contract 3): layout, sample members round trip, index checks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from components.data.shards import (
    INDEX_FORMAT,
    ResolutionMismatch,
    ShardError,
    decode_sample,
    index_shards,
    latent_dir,
    npy_bytes,
    read_index,
    sample_members,
)
from components.storage.storage import Storage


def test_latent_dir_is_keyed_by_vae_resolution_manifest_and_text_encoder():
    assert latent_dir("/latents/", "vae0", 64, "a" * 64) == f"latents/vae0/64px-{'a' * 16}"
    assert latent_dir("latents", "vae0", 64, "a" * 64, "t" * 20) == f"latents/vae0/64px-{'a' * 16}-te{'t' * 16}"


def test_sample_members_round_trip_through_a_tar():
    latent = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2) / 7
    meta = {"key": "k1", "original_size": [40, 30], "crop_top_left": [4, 0], "target_size": [32, 32]}
    members = sample_members("k1", latent, "a digit", meta, {"pooled": np.ones(3), "emb": np.zeros((2, 3))})
    assert [n for n, _ in members] == ["k1.latent.npy", "k1.txt", "k1.json", "k1.emb.npy", "k1.pooled.npy"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        sample = {"__key__": "k1", **{m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}}
    decoded = decode_sample(sample)
    assert decoded["latent"].dtype == np.float16 and decoded["latent"].shape == (4, 2, 2)
    np.testing.assert_allclose(decoded["latent"], latent, atol=1e-3)
    assert decoded["caption"] == "a digit" and decoded["original_size"] == [40, 30]
    assert decoded["crop_top_left"] == [4, 0] and decoded["target_size"] == [32, 32]
    assert decoded["emb"].shape == (2, 3) and decoded["pooled"].dtype == np.float16


def test_decode_refuses_a_sample_without_a_latent():
    with pytest.raises(ValueError, match="no .latent.npy; not a latent shard"):
        decode_sample({"__key__": "k", "txt": b"x", "json": b"{}"})


def test_npy_bytes_refuses_pickle():
    assert np.load(io.BytesIO(npy_bytes(np.eye(2))), allow_pickle=False).tolist() == [[1, 0], [0, 1]]


def test_read_index_checks_format_vae_and_resolution(tmp_path):
    storage = Storage(str(tmp_path))
    index = {"format": INDEX_FORMAT, "vae_fingerprint": "vae0", "resolution": 32,
             "shards": [{"name": "00000.tar", "count": 3, "sha256": "0" * 64}]}
    storage.write_text("l/index.json", json.dumps(index))
    assert read_index(storage, "l/index.json", vae_fingerprint="vae0", resolution=32)["resolution"] == 32
    assert index_shards(storage, "l/index.json") == ["l/00000.tar"]
    with pytest.raises(ResolutionMismatch, match="not this base's VAE other"):
        read_index(storage, "l/index.json", vae_fingerprint="other")
    with pytest.raises(ResolutionMismatch, match="latents are for resolution 32, the base wants 64"):
        read_index(storage, "l/index.json", resolution=64)
    with pytest.raises(ShardError, match="no latent index; run `lcmlora encode` first"):
        read_index(storage, "missing/index.json")
    storage.write_text("bad/index.json", json.dumps({"format": "other/1"}))
    with pytest.raises(ShardError, match="not a lcmlora-latents/1 index"):
        read_index(storage, "bad/index.json")
