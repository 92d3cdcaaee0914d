"""The encode stage: curated manifest -> latent shards for one base's VAE (contract 3).

    output = encode_stage(params, base, storage)   # base: a ResolvedBase; the one call of every caller

`encode_stage` finds the curated manifest by key (or takes the one given) and runs `run_encode`.

The VAE (and, with `encode.text_embeddings`, the text encoders) run in `encode.dtype` on
`encode.device` with `encode.workers` decode threads. Shards are keyed by the base's module
fingerprints, which are always those of the float32 weights (contract 1), so the distill
stage finds the shards whatever dtype encoded them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.claims import claim_work, default_owner, refresh_claim
from components.config import EncodeConfig, Params
from components.data.encode import DTYPES, encode_dataset
from components.data.shards import index_path, latent_dir
from components.data.text_embeddings import pipeline_text_embedder, text_encoder_fingerprint
from components.models.base_model import ResolvedBase
from components.progress import Progress, ProgressFn
from components.stages.inputs import curated_manifest, source_storage, stored_sha256
from components.storage.storage import Storage

CLAIM = "encode.claim.json"  # in the shard folder: who encodes it (create-only), refreshed while encoding
CLAIM_STALE_S = 600.0  # a claim not refreshed for this long belongs to a dead process
CLAIM_POLL_S = 1.0


@dataclass(frozen=True)
class EncodeOutput:
    """Where the shard index is and what this run did."""

    index: str  # index.json, relative to the storage root
    index_hash: str  # sha256 of index.json ("" on ranks other than 0)
    pointer: str  # <encode.pointers>/<base>.json: the fixed-path pointer to the index ("" off rank 0)
    samples: int
    shards: int
    encoded_shards: int  # encoded by this process in this run
    rejected: int  # samples encoding rejected (appended to rejected.parquet)
    reused: bool  # the index already existed (same VAE, resolution, manifest): nothing was encoded
    vae_fingerprint: str
    text_encoder_fingerprint: str | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able summary (what tasks return and artifacts show)."""
        return {"index": self.index, "index_hash": self.index_hash, "pointer": self.pointer,
                "samples": self.samples, "shards": self.shards, "encoded_shards": self.encoded_shards,
                "rejected": self.rejected, "reused": self.reused, "vae_fingerprint": self.vae_fingerprint,
                "text_encoder_fingerprint": self.text_encoder_fingerprint, "seconds": round(self.seconds, 1)}


def _models(cfg: EncodeConfig, base: ResolvedBase):
    """VAE, its fingerprint, the text embedder and its fingerprint (None without text embeddings)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.text_embeddings:
        loaded = base.load()  # float32: the fingerprints of contract 1
        loaded.pipe.to(device=cfg.device, dtype=dtype)
        embedder = pipeline_text_embedder(loaded.pipe, loaded.family, cfg.device)
        return loaded.pipe.vae, base.fingerprints["vae"], embedder, text_encoder_fingerprint(base.fingerprints)
    return base.load_vae().to(cfg.device, dtype), base.fingerprints["vae"], None, None


def claim_folder(storage: Storage, folder: str, owner: str, *, stale_s: float = CLAIM_STALE_S,
                 poll_s: float = CLAIM_POLL_S, progress: ProgressFn | None = None) -> bool:
    """Create-only claim of a shard folder: True when this owner encodes it, False once another finished it."""
    def waiting(holder: str) -> None:
        if progress is not None:
            progress(Progress(stage="encode", step=0, total=0, note=f"waiting for {holder}"))

    return claim_work(storage, f"{folder}/{CLAIM}", index_path(folder), owner, stale_s=stale_s, poll_s=poll_s,
                      on_wait=waiting)


def run_encode(cfg: EncodeConfig, *, base: ResolvedBase, storage: Storage, manifest_rel: str,
               source: Storage, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] | None = None, progress: ProgressFn | None = None,
               claim_owner: str | None = None, claim_stale_s: float = CLAIM_STALE_S) -> EncodeOutput:
    """Encode the manifest for `base`'s VAE; rank 0 writes the index and `<encode.pointers>/<base>.json`.

    One process (`world_size == 1`) claims the shard folder first (module docstring); `claim_owner`
    names it (default host:pid).
    """
    # 1. The models, in the configured dtype and device.
    vae, vae_fp, embedder, te_fp = _models(cfg, base)

    # 2. The claim on the shard folder: another base with this VAE may be encoding it right now.
    claimed, owner, report = None, claim_owner or default_owner(), progress
    if world_size == 1:
        manifest_hash = stored_sha256(storage, manifest_rel)
        folder = latent_dir(cfg.output, vae_fp, base.config.resolution, manifest_hash, te_fp)
        if claim_folder(storage, folder, owner, stale_s=claim_stale_s, progress=progress):
            claimed = folder

            def report(p: Progress) -> None:  # every report refreshes the claim
                refresh_claim(storage, f"{folder}/{CLAIM}", owner)
                if progress is not None:
                    progress(p)

    # 3. The shards (resumable, shared by every base with this VAE).
    try:
        result = encode_dataset(
            storage, manifest_rel, source, vae, vae_fp, resolution=base.config.resolution, output=cfg.output,
            batch_size=cfg.batch_size, shard_size=cfg.shard_size, device=cfg.device, dtype=cfg.dtype,
            workers=cfg.workers, rank=rank, world_size=world_size, barrier=barrier, text_embedder=embedder,
            text_encoder_fingerprint=te_fp, progress=report)
    finally:
        if claimed and storage.exists(index_path(claimed)):
            storage.delete(f"{claimed}/{CLAIM}")  # done: the index is what others look for now
    if rank != 0:
        return EncodeOutput(result.index_rel, "", "", result.samples, result.shards, result.encoded_shards,
                            len(result.rejected), result.reused, vae_fp, te_fp, result.seconds)

    # 4. The fixed-path pointer to this base's index (what DVC tracks), rewritten only when it changes.
    pointer = {"base": base.name, "index": result.index_rel, "vae_fingerprint": vae_fp,
               "resolution": base.config.resolution, "text_encoder_fingerprint": te_fp, "count": result.samples,
               "shards": result.shards,
               "params": {"base": base.config.model_dump(mode="json"), "encode": cfg.model_dump(mode="json")}}
    text = json.dumps(pointer, indent=1, sort_keys=True) + "\n"
    pointer_rel = f"{cfg.pointers.strip('/')}/{base.name}.json"
    if not storage.exists(pointer_rel) or storage.read_text(pointer_rel) != text:
        storage.write_text(pointer_rel, text)
    index_hash = stored_sha256(storage, result.index_rel)
    return EncodeOutput(result.index_rel, index_hash, pointer_rel, result.samples, result.shards,
                        result.encoded_shards, len(result.rejected), result.reused, vae_fp, te_fp, result.seconds)


def encode_stage(params: Params, base: ResolvedBase, storage: Storage, *, manifest: str | None = None,
                 rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                 claim_owner: str | None = None, progress: ProgressFn | None = None) -> EncodeOutput:
    """The encode stage's one call: the curated manifest -> latent shards for `base`'s VAE in `storage`.

    `manifest` (relative to `storage`) defaults to the one the curate stage keyed for this source,
    curate section and base resolution (`stages/curate/KEY/manifest.parquet`).
    """
    return run_encode(params.encode, base=base, storage=storage,
                      manifest_rel=manifest or curated_manifest(params, storage, base.config.resolution),
                      source=source_storage(params.curate.source, params.storage), rank=rank,
                      world_size=world_size, barrier=barrier, progress=progress, claim_owner=claim_owner)
