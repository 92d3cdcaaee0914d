"""Latent pre-encoding: curated manifest -> latent webdataset shards + index (DESIGN contract 3).

For one VAE: decode each kept image (undecodable ones are rejected with the decoder's error),
resize the shorter side to the base resolution and centre-crop (recording SDXL
micro-conditioning: original_size (h, w) and crop_top_left (top, left)), VAE-encode in
batches, and write shards of `KEY.latent.npy` (fp16 C x h x w, latent *mean*, not scaled),
`KEY.txt`, `KEY.json` and optionally `KEY.emb.npy` (+ `KEY.pooled.npy` for SDXL). The layout,
the index schema and the sample members are contract 3, in components/data/shards.py.

The directory is a pure function of (VAE, resolution, manifest, text encoder), so a base that
shares a VAE finds the index and encodes nothing, and shards are never overwritten.
**Resumable**: the shard plan is fixed by the manifest (sorted keys, `shard_size` each);
a shard's sidecar is written, then its tar with a create-only write, so a rerun after a kill
encodes only the shards without a tar. **Scale-out**: rank r of N encodes shards i with
i % N == r; after a barrier, rank 0 writes the index from the sidecars.

Throughput: a reader thread streams the source tars, a thread pool decodes and resizes, the
caller's thread runs the VAE, and a writer thread serializes and stores shards, so that
everything but the VAE overlaps with the VAE.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components.data.image_prep import decode_image, resize_and_crop, to_model_input
from components.data.shards import (
    INDEX_FORMAT,
    ResolutionMismatch,
    index_path,
    latent_dir,
    read_index,
    sample_members,
)
from components.data.text_embeddings import TextEmbedder
from components.progress import Progress, ProgressFn
from components.storage.read_ahead import read_ahead
from components.storage.storage import AlreadyExists, Storage

QUEUE_DEPTH = 4  # prepared batches waiting for the VAE, and encoded batches waiting to be written
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EncodeError(RuntimeError):
    """Encoding cannot proceed; the message says what to fix."""


# --- pure pieces ------------------------------------------------------------------------


def vae_downsample_factor(vae: Any) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1) (8 for SD, 4 for the toy)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(vae: Any, resolution: int) -> None:
    """A resolution the VAE cannot tile into whole latent cells is a configuration error."""
    factor = vae_downsample_factor(vae)
    if resolution <= 0 or resolution % factor:
        raise ResolutionMismatch(
            f"VAE/resolution mismatch: resolution {resolution} is not a positive multiple of the VAE's "
            f"downsample factor {factor}; set bases.NAME.resolution to a multiple of {factor}")


@torch.no_grad()
def encode_latent_mean(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior mean E[z|x] (not sampled, not scaled): Bx3xHxW -> BxCxhxw."""
    return vae.encode(pixels).latent_dist.mean


@dataclass(frozen=True)
class ShardPlan:
    index: int
    rows: list[dict[str, Any]]  # manifest rows (key, caption, shard, member)

    @property
    def name(self) -> str:
        return f"{self.index:05d}.tar"


def plan_shards(manifest: pa.Table, shard_size: int) -> list[ShardPlan]:
    """Deterministic plan: rows sorted by key, `shard_size` per output shard."""
    if shard_size < 1:
        raise EncodeError(f"encode.shard_size must be >= 1, got {shard_size}")
    rows = manifest.select(["key", "caption", "shard", "member"]).sort_by("key").to_pylist()
    return [ShardPlan(i, rows[s:s + shard_size]) for i, s in enumerate(range(0, len(rows), shard_size))]


def shards_for_rank(plan: list[ShardPlan], rank: int, world_size: int) -> list[ShardPlan]:
    """Rank r of N takes shards r, r + N, ...: disjoint, and together all of them."""
    return [p for p in plan if p.index % world_size == rank]


# --- the pipeline -----------------------------------------------------------------------


@dataclass
class _Prepared:
    """One VAE batch, decoded and cropped, with its bookkeeping."""

    shard: ShardPlan
    rows: list[dict[str, Any]]
    pixels: np.ndarray  # BxHxWx3 uint8
    original_size: list[tuple[int, int]]
    crop_top_left: list[tuple[int, int]]
    rejected: list[dict[str, str]]  # rows of this batch that could not be decoded
    last: bool  # the shard's final batch


@dataclass
class EncodeResult:
    index_rel: str
    samples: int
    shards: int
    encoded_shards: int  # encoded by this process in this run
    reused: bool  # the index already existed: nothing was done
    rejected: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    vae_seconds: float = 0.0  # time inside the VAE (this process)
    encoded_samples: int = 0  # samples encoded by this process in this run


def _read_wanted(source: Storage, shard: str, wanted: set[str]) -> tuple[dict[str, bytes], str | None]:
    """Image bytes of the wanted members of one source tar, and a read error if any."""
    found: dict[str, bytes] = {}
    try:
        with source.open(shard) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    found[member.name] = tar.extractfile(member).read()
                    if len(found) == len(wanted):
                        break
    except FileNotFoundError:
        return found, f"{source.url(shard)}: shard not found"
    except (tarfile.TarError, EOFError, OSError) as err:
        return found, f"{source.url(shard)}: truncated or corrupt tar ({type(err).__name__}: {err})"
    return found, None


def _prepare_one(row: dict[str, Any], data: bytes | None, error: str | None, resolution: int):
    if data is None:
        return None, {"key": row["key"], "reason": "missing_image",
                      "detail": error or f"{row['member']} not in {row['shard']}"}
    try:
        pixels, original, crop = resize_and_crop(decode_image(data), resolution)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a counted rejection
        detail = re.sub(r" at 0x[0-9a-f]+", "", f"{type(err).__name__}: {err}")  # no memory addresses
        return None, {"key": row["key"], "reason": "corrupt_image", "detail": detail}
    return (pixels, original, crop), None


def _prepared_batches(shards: list[ShardPlan], source: Storage, resolution: int, batch_size: int,
                      pool: ThreadPoolExecutor) -> Iterator[_Prepared]:
    """Read, decode and crop each shard's images, in VAE-sized batches (runs in a thread)."""
    for plan in shards:
        # 1. Fetch bytes, one source tar at a time (rows of a source shard are contiguous).
        by_source: dict[str, list[dict[str, Any]]] = {}
        for row in plan.rows:
            by_source.setdefault(row["shard"], []).append(row)
        blobs: dict[str, tuple[bytes | None, str | None]] = {}
        for src_shard, rows in by_source.items():
            found, err = _read_wanted(source, src_shard, {r["member"] for r in rows})
            for r in rows:
                blobs[r["key"]] = (found.get(r["member"]), err)
        # 2. Decode and crop in the pool, batch by batch.
        starts = list(range(0, len(plan.rows), batch_size)) or [0]
        for n, s in enumerate(starts):
            rows = plan.rows[s:s + batch_size]
            done = list(pool.map(_prepare_one, rows, *zip(*(blobs[r["key"]] for r in rows), strict=True),
                                 [resolution] * len(rows))) if rows else []
            ok_rows = [r for r, (ok, _) in zip(rows, done, strict=True) if ok is not None]
            ok = [x for x, _ in done if x is not None]
            pixels = np.stack([p for p, _, _ in ok]) if ok else np.zeros((0, resolution, resolution, 3), np.uint8)
            yield _Prepared(plan, ok_rows, pixels, [o for _, o, _ in ok], [c for _, _, c in ok],
                            [rej for _, rej in done if rej is not None], last=n == len(starts) - 1)


class _ShardWriter:
    """Accumulates encoded samples per shard; a thread serializes and stores finished shards."""

    def __init__(self, storage: Storage, out_rel: str, resolution: int):
        self.storage, self.out_rel, self.resolution = storage, out_rel, resolution
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="lcmlora-encode-writer")
        self.thread.start()
        self.pending: dict[int, dict[str, Any]] = {}

    def add(self, prepared: _Prepared, latents: np.ndarray, embeddings: dict[str, np.ndarray]) -> None:
        self._raise()
        entry = self.pending.setdefault(prepared.shard.index, {"samples": [], "rejected": []})
        entry["rejected"] += prepared.rejected
        for i, row in enumerate(prepared.rows):
            entry["samples"].append((row, latents[i], {k: v[i] for k, v in embeddings.items()},
                                     prepared.original_size[i], prepared.crop_top_left[i]))
        if prepared.last:
            self.q.put((prepared.shard, self.pending.pop(prepared.shard.index)))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as err:  # noqa: BLE001 - surfaced in add()/close()
                self.error = err

    def _write(self, plan: ShardPlan, entry: dict[str, Any]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, latent, embs, original, crop in entry["samples"]:
                key = row["key"]
                meta = {"key": key, "source_key": key, "source_shard": row["shard"],
                        "original_size": list(original), "crop_top_left": list(crop),
                        "target_size": [self.resolution, self.resolution]}
                for name, data in sample_members(key, latent, row["caption"], meta, embs):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        sidecar = {"name": plan.name, "count": len(entry["samples"]), "sha256": hashlib.sha256(data).hexdigest(),
                   "planned": len(plan.rows), "rejected": entry["rejected"]}
        # Sidecar first, tar last and create-only: a tar on storage means its sidecar is there too.
        self.storage.write_text(f"{self.out_rel}/{plan.name[:-4]}.json", json.dumps(sidecar, sort_keys=True) + "\n")
        try:
            self.storage.write_bytes(f"{self.out_rel}/{plan.name}", data, create_only=True)
        except AlreadyExists:
            pass  # another process finished the same shard first; its bytes stand


def encode_dataset(
    storage: Storage,
    manifest_rel: str,
    source: Storage,
    vae: Any,
    vae_fingerprint: str,
    *,
    resolution: int,
    output: str = "latents",
    batch_size: int = 32,
    shard_size: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    text_embedder: TextEmbedder | None = None,
    text_encoder_fingerprint: str | None = None,
    progress: ProgressFn | None = None,
) -> EncodeResult:
    """Encode the manifest at `manifest_rel` (on `storage`) with `vae`; return where the index is.

    `progress` is called once at step 0 and after each batch with the samples handled so far
    (encoded or rejected); total is what this process has to encode in this run.
    """
    start = time.perf_counter()
    check_resolution(vae, resolution)
    if (text_embedder is None) != (text_encoder_fingerprint is None):
        raise EncodeError("text_embedder and text_encoder_fingerprint go together")
    # 1. The manifest, its content hash, and the folder they decide.
    try:
        manifest_bytes = storage.read_bytes(manifest_rel)
    except FileNotFoundError:
        raise EncodeError(f"{storage.url(manifest_rel)}: no curated manifest; run `lcmlora curate` first") from None
    manifest_hash = hashlib.sha256(manifest_bytes).hexdigest()
    out_rel = latent_dir(output, vae_fingerprint, resolution, manifest_hash, text_encoder_fingerprint)
    index_rel = index_path(out_rel)
    if storage.exists(index_rel):
        index = read_index(storage, index_rel, vae_fingerprint=vae_fingerprint, resolution=resolution)
        return EncodeResult(index_rel, index["count"], len(index["shards"]), 0, True,
                            index.get("rejected", []), time.perf_counter() - start)
    manifest = pq.read_table(io.BytesIO(manifest_bytes))
    plan = plan_shards(manifest, shard_size)
    mine = [p for p in shards_for_rank(plan, rank, world_size) if not storage.exists(f"{out_rel}/{p.name}")]
    total = sum(len(p.rows) for p in mine)
    report = progress or (lambda _p: None)
    report(Progress(stage="encode", step=0, total=total, note=f"{len(mine)} shard(s)"))

    # 2. Encode this rank's missing shards: reader thread -> VAE here -> writer thread.
    torch_dtype = DTYPES[dtype]
    if next(vae.parameters()).dtype != torch_dtype or next(vae.parameters()).device != torch.device(device):
        vae = vae.to(device=device, dtype=torch_dtype)
    vae.eval()
    writer = _ShardWriter(storage, out_rel, resolution)
    vae_seconds, encoded, handled = 0.0, 0, 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lcmlora-decode") as pool:
        try:
            for prepared in read_ahead(_prepared_batches(mine, source, resolution, batch_size, pool), QUEUE_DEPTH,
                                       "lcmlora-encode-reader"):
                t0 = time.perf_counter()
                if len(prepared.rows):
                    x = to_model_input(prepared.pixels, device, torch_dtype)
                    latents = encode_latent_mean(vae, x).float().cpu().numpy()
                    embeddings = text_embedder([r["caption"] for r in prepared.rows]) if text_embedder else {}
                else:
                    latents, embeddings = np.zeros((0,)), {}
                vae_seconds += time.perf_counter() - t0
                encoded += len(prepared.rows)
                writer.add(prepared, latents, embeddings)
                handled += len(prepared.rows) + len(prepared.rejected)
                elapsed = time.perf_counter() - start
                report(Progress(stage="encode", step=handled, total=total, note=f"shard {prepared.shard.index}",
                                metrics={"images/s": handled / elapsed if elapsed > 0 else 0.0}))
        finally:
            writer.close()

    # 3. Rank 0 writes the index once every shard is there, then records the rejections.
    if barrier is not None:
        barrier()
    if rank != 0:
        return EncodeResult(index_rel, encoded, len(plan), len(mine), False, [], time.perf_counter() - start,
                            vae_seconds, encoded)
    index = _build_index(storage, out_rel, plan, vae, vae_fingerprint, resolution, manifest_rel, manifest_hash,
                         text_encoder_fingerprint, text_embedder is not None)
    try:
        storage.write_text(index_rel, json.dumps(index, indent=1, sort_keys=True) + "\n", create_only=True)
    except AlreadyExists:
        pass
    append_rejections(storage, manifest_rel, index["rejected"])
    return EncodeResult(index_rel, index["count"], len(index["shards"]), len(mine), False, index["rejected"],
                        time.perf_counter() - start, vae_seconds, encoded)


def _build_index(storage: Storage, out_rel: str, plan: list[ShardPlan], vae: Any, vae_fp: str, resolution: int,
                 manifest_rel: str, manifest_hash: str, te_fp: str | None, with_embeddings: bool) -> dict[str, Any]:
    shards, rejected, missing = [], [], []
    for p in plan:
        if not storage.exists(f"{out_rel}/{p.name}"):
            missing.append(p.name)
            continue
        side = json.loads(storage.read_text(f"{out_rel}/{p.name[:-4]}.json"))
        rejected += side["rejected"]
        if side["count"]:
            shards.append({"name": p.name, "count": side["count"], "sha256": side["sha256"]})
    if missing:
        raise EncodeError(f"{storage.url(out_rel)}: shards {', '.join(missing)} are missing (a rank failed?); "
                          "rerun `lcmlora encode` to finish them")
    factor = vae_downsample_factor(vae)
    config = vae.config
    return {
        "format": INDEX_FORMAT,
        "vae_fingerprint": vae_fp,
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": None if getattr(config, "shift_factor", None) is None else float(config.shift_factor),
        "resolution": resolution,
        "latent_channels": int(config.latent_channels),
        "latent_size": resolution // factor,
        "latent_dtype": "float16",
        "manifest": manifest_rel,
        "manifest_hash": manifest_hash,
        "text_encoder_fingerprint": te_fp,
        "embeddings": with_embeddings,
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "rejected": rejected,
    }


def append_rejections(storage: Storage, manifest_rel: str, rejected: list[dict[str, str]]) -> int:
    """Add encode's rejections to `rejected.parquet` beside the manifest (contract 2), once each."""
    if not rejected:
        return 0
    folder = manifest_rel.rsplit("/", 1)[0] if "/" in manifest_rel else ""
    rel = f"{folder}/rejected.parquet" if folder else "rejected.parquet"
    schema = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                        ("value", pa.float64())])
    table = pq.read_table(io.BytesIO(storage.read_bytes(rel))).cast(schema) if storage.exists(rel) \
        else schema.empty_table()
    present = set(zip(table["key"].to_pylist(), table["reason"].to_pylist(), strict=True))
    new = [r for r in rejected if (r["key"], r["reason"]) not in present]
    if not new:
        return 0
    extra = pa.table({"key": [r["key"] for r in new], "reason": [r["reason"] for r in new],
                      "detail": [r["detail"] for r in new], "value": pa.nulls(len(new), pa.float64())}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables([table, extra]), buf, compression="zstd")
    storage.write_bytes(rel, buf.getvalue())
    return len(new)
