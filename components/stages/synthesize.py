"""The synthesize stage: a model's own samples -> a LAION/img2dataset source (components/data/synthesize.py).

    output = synthesize_stage(params, base, storage)   # base: a ResolvedBase; the one call of every caller
    curate.source = storage.url(output.source)          # then curate -> encode -> distill take it unchanged

The model is the base, or the base with a style LoRA fused at l1 (`style`, `synthesize.style`); it
samples `synthesize.count` images with DPM-Solver++ at `synthesize.steps` and the base's CFG scale,
prompts from a prompt file or, by default, the captions of the curated manifest. The source lives in
the keyed folder `stages/synthesize/BASE/KEY` (`components/stages/keys.py` `synthesize_key`: the
model's fingerprints, the prompts, the sampler settings), or in `output`:

    plan.json                                    the run's identity (key, model, sampler, prompts), first
    NNNNN.tar, NNNNN_stats.json, NNNNN.parquet   one shard per image batch, its metadata parquet last
    params.yaml                                  the resolved params
    synthesize.json                              last: the source is complete; a rerun reuses it

Every file is written whole (atomic writes; the metadata and the markers create-only), and image i
depends only on its own seed, so a run killed mid-way resumes with the batches it lacks and ends
with the bytes an uninterrupted run writes. Two runs of one key at once sample it once: the first
claims `stages/synthesize/BASE/KEY.claim.json` (components/claims.py), the other waits and reuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from components.claims import claim_work, default_owner, refresh_claim
from components.config import ConfigError, Params
from components.data.synthesize import (
    PlannedImage,
    SamplerSettings,
    batches,
    fuse_adapter,
    plan_images,
    sample_batch,
    shard_files,
    shard_name,
)
from components.models.base_model import ResolvedBase, fingerprints_of
from components.paths import project_path
from components.progress import Progress, ProgressFn
from components.stages.inputs import MissingInput, curated_manifest, lora_sha256, manifest_rel
from components.stages.keys import output_rel, synthesize_key
from components.storage.storage import AlreadyExists, Storage

PLAN = "plan.json"  # written first: which key the folder's shards belong to
DONE = "synthesize.json"  # written last: the source is complete
STYLE_ADAPTER = "synthesize_style"
CLAIM_STALE_S = 600.0  # a claim not refreshed for this long belongs to a dead process


@dataclass(frozen=True)
class SynthesizeOutput:
    """Where the source is (relative to the storage it was written to) and what this run did."""

    source: str  # the source folder: point curate.source at storage.url(source)
    key: str  # synthesize-<32 hex>
    count: int  # images in the source
    shards: int
    sampled_batches: int  # batches this run sampled (a resumed run: only those it lacked; 0 when reused)
    reused: bool  # the folder already held this complete source: nothing was sampled
    seconds: float
    fingerprints: dict[str, str] = field(default_factory=dict)  # of the sampled model (a fused one's own)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able summary (what tasks return and artifacts show)."""
        return {"source": self.source, "key": self.key, "count": self.count, "shards": self.shards,
                "sampled_batches": self.sampled_batches, "reused": self.reused, "seconds": round(self.seconds, 1),
                "fingerprints": dict(self.fingerprints)}


def _rel(folder: str, name: str) -> str:
    return manifest_rel(folder, name)


def stored_output(storage: Storage, folder: str) -> SynthesizeOutput | None:
    """The complete source already in `folder` (its synthesize.json is there), or None."""
    if not storage.exists(_rel(folder, DONE)):
        return None
    done = json.loads(storage.read_text(_rel(folder, DONE)))
    return SynthesizeOutput(source=folder.strip("/"), key=done["key"], count=done["count"], shards=len(done["shards"]),
                            sampled_batches=0, reused=True, seconds=0.0, fingerprints=dict(done["fingerprints"]))


def synthesis_prompts(params: Params, storage: Storage, base: ResolvedBase) -> list[str]:
    """`synthesize.prompts` (a file, one prompt a line), else the curated manifest's captions, in its order."""
    from components.evaluate.evaluation import load_prompts

    if params.synthesize.prompts:
        path = project_path(params.synthesize.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file not found (synthesize.prompts); give a text file, one "
                                    "prompt a line, or unset it to sample the curated manifest's captions")
        return load_prompts(path)
    import pyarrow.parquet as pq

    try:
        rel = curated_manifest(params, storage, base.config.resolution)
    except MissingInput as err:
        raise MissingInput(f"{err}; or set synthesize.prompts to a prompt file") from None
    captions = pq.read_table(io.BytesIO(storage.read_bytes(rel)), columns=["caption"]).column("caption").to_pylist()
    return [c.strip() for c in captions if c and c.strip()]


def sampled_model(base: ResolvedBase, style: Path | None, weight: float) -> tuple[Any, dict[str, str]]:
    """The pipeline to sample (float32, CPU) and its fingerprints: the base, or the base with `style` fused at `weight`."""
    from components.lora.io import load_adapter, lora_file

    loaded = base.load()
    if style is None:
        return loaded.pipe, dict(base.fingerprints)
    load_adapter(loaded.pipe, loaded.family, lora_file(style), STYLE_ADAPTER)  # checked; kohya alphas folded
    fuse_adapter(loaded.pipe, STYLE_ADAPTER, weight)
    return loaded.pipe, fingerprints_of(loaded.pipe)


def run_synthesize(params: Params, *, pipe: Any, fingerprints: dict[str, str], plan: list[PlannedImage],
                   settings: SamplerSettings, storage: Storage, folder: str, key: str, base_name: str,
                   style: dict[str, Any] | None, progress: ProgressFn | None = None) -> SynthesizeOutput:
    """Sample the batches `folder` lacks, one shard each, then mark the source complete."""
    import torch

    t0 = time.perf_counter()
    cfg = params.synthesize
    todo = batches(plan, cfg.batch_size)
    prompts_sha256 = _prompts_sha256(plan)
    # 1. The folder's identity: a folder holding another key's shards is never written into.
    identity = {"key": key, "base": base_name, "fingerprints": fingerprints, "style": style,
                "sampler": settings.as_dict(), "count": len(plan), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "prompts_sha256": prompts_sha256}
    text = json.dumps(identity, indent=1, sort_keys=True) + "\n"
    try:
        storage.write_text(_rel(folder, PLAN), text, create_only=True)
        storage.write_text(_rel(folder, "params.yaml"), params.to_yaml())
    except AlreadyExists:
        found = json.loads(storage.read_text(_rel(folder, PLAN))).get("key")
        if found != key:
            raise FileExistsError(f"{storage.url(folder)}: holds the synthesis {found}, not {key}; pick another "
                                  "--output (its shards are never overwritten)") from None
    # 2. Each batch the folder lacks: sample, write its tar and stats, then its metadata (its done mark).
    pipe.to(cfg.device, getattr(torch, cfg.dtype))
    meta = {"model": fingerprints.get("unet"), **settings.as_dict()}
    url_prefix = f"lcmlora-synthesize://{base_name}/{key}"
    done = {i for i in range(len(todo)) if storage.exists(_rel(folder, _metadata_name(i)))}
    sampled, images_done = 0, sum(len(todo[i]) for i in done)
    if progress is not None:
        progress(Progress(stage="synthesize", step=images_done, total=len(plan),
                          note=f"resumed: {len(done)} of {len(todo)} batches there" if done else "sampling"))
    for i, batch in enumerate(todo):
        if i in done:
            continue
        t = time.perf_counter()
        pixels = sample_batch(pipe, batch, settings)
        files = shard_files(i, batch, pixels, url_prefix=url_prefix, sample_meta=meta)
        for name, data in files.items():
            last = name == _metadata_name(i)
            try:
                storage.write_bytes(_rel(folder, name), data, create_only=last)
            except AlreadyExists:  # the claim keeps another writer out; the same key writes the same bytes
                pass
        sampled += 1
        images_done += len(batch)
        if progress is not None:
            progress(Progress(stage="synthesize", step=images_done, total=len(plan), note=f"batch {i + 1}/{len(todo)}",
                              metrics={"images_per_s": len(batch) / max(time.perf_counter() - t, 1e-9)}))
    # 3. The completion mark (create-only: a complete source is immutable).
    shards = [shard_name(i) for i in range(len(todo))]
    record = {**identity, "shards": shards, "metadata": [_metadata_name(i) for i in range(len(todo))]}
    try:
        storage.write_text(_rel(folder, DONE), json.dumps(record, indent=1, sort_keys=True) + "\n", create_only=True)
    except AlreadyExists:
        pass
    return SynthesizeOutput(source=folder.strip("/"), key=key, count=len(plan), shards=len(shards),
                            sampled_batches=sampled, reused=False, seconds=time.perf_counter() - t0,
                            fingerprints=dict(fingerprints))


def synthesize_stage(params: Params, base: ResolvedBase, storage: Storage, *, style: str | Path | None = None,
                     style_weight: float | None = None, prompts: list[str] | None = None, output: str | None = None,
                     claim_owner: str | None = None, progress: ProgressFn | None = None) -> SynthesizeOutput:
    """The synthesize stage's one call: `base` (with `style` fused at `style_weight`) -> a source in `storage`.

    `style` and `style_weight` default to `synthesize.style` and `synthesize.style_weight`; `prompts`
    to `synthesis_prompts` (the prompt file, else the curated captions). By default the source goes to
    the keyed folder `stages/synthesize/BASE/KEY`, and a complete one stored there is reused; `output`
    (a folder of `storage`) holds it instead (reused there too when it is this key's, refused when another's).
    """
    cfg = params.synthesize
    t0 = time.perf_counter()
    if "unet" not in base.fingerprints:
        raise ConfigError(f"base {base.name}: resolved for its VAE alone (vae_only); synthesize samples the whole "
                          "pipeline: resolve it with its UNet and text encoders")
    # 1. What is sampled: the prompts, the sampler, the model (a style is fused now: its fingerprints key it).
    plan = plan_images(prompts if prompts is not None else synthesis_prompts(params, storage, base), cfg.count,
                       cfg.seed)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else base.config.guidance_scale
    settings = SamplerSettings(cfg.scheduler, cfg.steps, guidance, base.config.resolution, cfg.timestep_spacing)
    style_ref = style if style is not None else cfg.style
    style_path = project_path(style_ref) if style_ref else None
    weight = style_weight if style_weight is not None else cfg.style_weight
    pipe, fingerprints = (None, dict(base.fingerprints)) if style_path is None else \
        sampled_model(base, style_path, weight)
    key = synthesize_key(params, base.config, fingerprints, _prompts_sha256(plan), guidance)
    folder = output.strip("/") if output is not None else output_rel("synthesize", key, base.name)
    # 2. A complete source of this key is reused; else the folder is claimed (a second run waits, then reuses).
    if (stored := stored_output(storage, folder)) is not None:
        if stored.key != key:
            raise FileExistsError(f"{storage.url(folder)}: holds the synthesis {stored.key}, not {key}; pick "
                                  "another --output")
        return stored
    claim_rel, owner = f"{folder}.claim.json", claim_owner or default_owner()
    claimed = output is None

    def waiting(holder: str) -> None:
        if progress is not None:
            progress(Progress(stage="synthesize", step=0, total=0, note=f"waiting for {holder}"))

    if claimed and not claim_work(storage, claim_rel, _rel(folder, DONE), owner, stale_s=CLAIM_STALE_S,
                                  on_wait=waiting):
        return stored_output(storage, folder)

    def report(p: Progress) -> None:  # every report refreshes the claim
        if claimed:
            refresh_claim(storage, claim_rel, owner)
        if progress is not None:
            progress(p)

    # 3. The batches the folder lacks; the claim goes once the source is complete (a killed run's goes stale).
    try:
        if pipe is None:  # the base alone: loaded only now, when there is something to sample
            pipe, _ = sampled_model(base, None, weight)
        style_record = None if style_path is None else {"sha256": lora_sha256(style_path), "weight": weight}
        result = run_synthesize(params, pipe=pipe, fingerprints=fingerprints, plan=plan, settings=settings,
                                storage=storage, folder=folder, key=key, base_name=base.name, style=style_record,
                                progress=report)
    finally:
        if claimed and storage.exists(_rel(folder, DONE)):
            storage.delete(claim_rel)
    return replace(result, seconds=time.perf_counter() - t0)


def _metadata_name(batch: int) -> str:
    return f"{shard_name(batch)[:-4]}.parquet"


def _prompts_sha256(plan: list[PlannedImage]) -> str:
    """sha256 of the prompts in plan order (one per image), what the key holds of them."""
    return hashlib.sha256("\n".join(im.prompt for im in plan).encode()).hexdigest()
