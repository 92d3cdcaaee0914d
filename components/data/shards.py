"""The latent-shard contract (DESIGN contract 3): layout, index schema, per-sample members.

The writer (components/data/encode.py) and the reader (components/data/latent_loader.py) both import
this module; neither imports the other. One shard set lives at

    <encode.output>/<vae_fp>/<resolution>px-<manifest_hash[:16]>[-te<te_fp[:16]>]/
        00000.tar  00000.json  ...   webdataset tar and its sidecar (count, sha256, rejections)
        index.json                   written last; its presence means complete

and each sample of a tar is the members

    KEY.latent.npy   fp16 C x h x w, VAE latent mean before scaling
    KEY.txt          caption (utf-8)
    KEY.json         {key, source_key, source_shard, original_size (h, w), crop_top_left, target_size}
    KEY.emb.npy      optional, text-encoder hidden states (L x D), fp16
    KEY.pooled.npy   optional, SDXL pooled text embedding (D), fp16
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from components.storage.storage import Storage

INDEX_FORMAT = "lcmlora-latents/1"
INDEX_NAME = "index.json"
LATENT_DTYPE = np.float16  # latents and embeddings are stored in fp16

# per-sample member suffixes (the webdataset extension after `KEY.`)
LATENT = "latent.npy"
CAPTION = "txt"
META = "json"
EMBEDDING = "emb.npy"  # text-encoder hidden states, optional
POOLED = "pooled.npy"  # SDXL pooled embedding, optional

# the keys every index.json carries (contract 3), in the order they are documented
INDEX_KEYS = ("format", "vae_fingerprint", "scaling_factor", "shift_factor", "resolution",
              "latent_channels", "latent_size", "latent_dtype", "manifest", "manifest_hash",
              "text_encoder_fingerprint", "embeddings", "count", "shards", "rejected")


class ShardError(RuntimeError):
    """A latent index is missing, malformed or not the one this base needs."""


class ResolutionMismatch(ShardError, ValueError):
    """The base resolution does not fit the VAE (or an index was made for another one)."""


def latent_dir(output: str, vae_fp: str, resolution: int, manifest_hash: str, te_fp: str | None = None) -> str:
    """Where the shards of (VAE, resolution, manifest[, text encoder]) live, relative to the root."""
    name = f"{resolution}px-{manifest_hash[:16]}" + (f"-te{te_fp[:16]}" if te_fp else "")
    return f"{output.strip('/')}/{vae_fp}/{name}"


def index_path(folder: str) -> str:
    """The index of the shard folder `folder` (relative to the storage root)."""
    return f"{folder}/{INDEX_NAME}"


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as `.npy` bytes (no pickle), as stored in a shard member."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sample_members(key: str, latent: np.ndarray, caption: str, meta: dict[str, Any],
                   embeddings: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """The tar members of one sample: latent (fp16), caption, metadata, then sorted embeddings.

    `embeddings` maps "emb" / "pooled" to arrays (see the module docstring).
    """
    members = [(f"{key}.{LATENT}", npy_bytes(latent.astype(LATENT_DTYPE))),
               (f"{key}.{CAPTION}", caption.encode()),
               (f"{key}.{META}", json.dumps(meta, sort_keys=True).encode())]
    members += [(f"{key}.{name}.npy", npy_bytes(v.astype(LATENT_DTYPE))) for name, v in sorted(embeddings.items())]
    return members


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A webdataset sample dict (suffix -> bytes) -> key, latent, caption, micro-conditioning[, emb, pooled]."""
    key = sample["__key__"]
    if LATENT not in sample:
        raise ValueError(f"{sample.get('__url__')}: sample {key} has no .{LATENT}; not a latent shard")
    meta = json.loads(sample[META])
    out = {
        "key": key,
        "latent": np.load(io.BytesIO(sample[LATENT])),
        "caption": sample[CAPTION].decode() if CAPTION in sample else "",
        "original_size": meta["original_size"],
        "crop_top_left": meta["crop_top_left"],
        "target_size": meta["target_size"],
    }
    if EMBEDDING in sample:
        out["emb"] = np.load(io.BytesIO(sample[EMBEDDING]))
    if POOLED in sample:
        out["pooled"] = np.load(io.BytesIO(sample[POOLED]))
    return out


def read_index(storage: Storage, index_rel: str, *, vae_fingerprint: str | None = None,
               resolution: int | None = None) -> dict[str, Any]:
    """Read and check an index; a VAE or resolution other than expected is a clear error."""
    try:
        index = json.loads(storage.read_text(index_rel))
    except FileNotFoundError:
        raise ShardError(f"{storage.url(index_rel)}: no latent index; run `lcmlora encode` first") from None
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{storage.url(index_rel)}: not a {INDEX_FORMAT} index (format {index.get('format')!r})")
    if vae_fingerprint is not None and index["vae_fingerprint"] != vae_fingerprint:
        raise ResolutionMismatch(f"{storage.url(index_rel)}: made with VAE {index['vae_fingerprint']}, "
                                 f"not this base's VAE {vae_fingerprint}; encode for this base")
    if resolution is not None and index["resolution"] != resolution:
        raise ResolutionMismatch(f"{storage.url(index_rel)}: latents are for resolution {index['resolution']}, "
                                 f"the base wants {resolution}; encode at this resolution")
    return index


def index_shards(storage: Storage, index_rel: str) -> list[str]:
    """Shard paths (relative to the storage root) listed by an index."""
    folder = index_rel.rsplit("/", 1)[0] if "/" in index_rel else ""
    index = read_index(storage, index_rel)
    return [f"{folder}/{s['name']}" if folder else s["name"] for s in index["shards"]]
