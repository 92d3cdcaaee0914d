"""The one output layout: every stage's output lives at `storage.root/stages/STAGE/[BASE/]KEY`.

A KEY is built only from content fingerprints (source tree digest, manifest hash, VAE / UNet /
text-encoder fingerprints, shard index hash, LoRA file hashes) and the resolved params of the
stage's own section; never from models, pipelines or sessions. The Prefect flows (cache keys,
tasks/caching.py) and the CLI stage commands (default output folders, flows/cli.py) both call
these functions, with fingerprints from `components/stages/inputs.py`, so whoever runs a stage
finds and reuses what the other wrote (docs/data.md, "Output layout").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from components.config import BaseConfig, Params
from components.data.shards import index_path, latent_dir
from components.data.text_embeddings import text_encoder_fingerprint
from components.storage.content_hash import canonical_digest, file_sha256
from components.storage.storage import Storage

KEY_VERSION = 2  # bump to invalidate every cached stage (e.g. when an output layout changes)
STAGE_OUTPUTS = "stages"  # the keyed stage outputs below storage.root

# distill keys that do not change the trained LoRA: where its shards are, how often it is checkpointed,
# the test barrier
DISTILL_OPERATIONAL = {"latents_index", "checkpoint_every", "checkpoints_keep", "hold_file"}
# ... and what may change between a run and its resume from a checkpoint: where it stops
RESUMABLE = DISTILL_OPERATIONAL | {"max_steps"}


def section_digest(section: BaseModel | dict[str, Any]) -> str:
    """sha256 of one resolved params section (or any JSON-able mapping)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return canonical_digest(data)


def stage_key(stage: str, **inputs: Any) -> str:
    """`STAGE-<32 hex>`: the key of a stage from its content fingerprints and params digests."""
    return f"{stage}-{canonical_digest({'stage': stage, 'key_version': KEY_VERSION, **inputs})[:32]}"


def output_rel(stage: str, key: str, base: str | None = None) -> str:
    """Where a stage's output lives below storage.root: `stages/STAGE/[BASE/]KEY`."""
    return "/".join(p for p in (STAGE_OUTPUTS, stage, base, key) if p)


def base_identity(base_name: str, base: BaseConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What makes a base the same base: its name, settings and module fingerprints.

    The reference (path or hub id) is left out: a moved folder with the same weights is the same base; so is
    `data` (what it distills on): the shard index hash in the keys already says which data; and
    `objectives` (which LoRAs the flows make for it): each run's distill section names its objective.
    """
    return {"name": base_name, **base.model_dump(mode="json", exclude={"reference", "data", "objectives"}),
            "fingerprints": fingerprints}


# --- the key of each stage: content fingerprints + its own params section ----------------


def curate_key(cfg: Params, source_digest: str, min_side: int) -> str:
    """The source bytes, the curate section and the minimum side."""
    return stage_key("curate", source=source_digest, curate=section_digest(cfg.curate), min_side=min_side)


def synthesize_key(cfg: Params, base: BaseConfig, fingerprints: dict[str, str], prompts_sha256: str,
                   guidance_scale: float) -> str:
    """The sampled model's fingerprints (a fused style model has its own), the prompts it samples, its
    resolution and CFG scale, and the synthesize section (the style file and weight aside: the fused
    fingerprints count; the prompt file's path aside: its prompts count)."""
    return stage_key("synthesize", model=fingerprints, family=base.family, resolution=base.resolution,
                     guidance_scale=guidance_scale, prompts=prompts_sha256,
                     synthesize=section_digest(cfg.synthesize.model_dump(
                         mode="json", exclude={"prompts", "style", "style_weight", "guidance_scale"})))


def encode_key(cfg: Params, base: BaseConfig, manifest_hash: str, fingerprints: dict[str, str]) -> str:
    """The manifest, the VAE (and text encoders when embedded), the resolution and the encode section."""
    te_fp = text_encoder_fingerprint(fingerprints) if cfg.encode.text_embeddings else None
    return stage_key("encode", manifest=manifest_hash, vae=fingerprints["vae"], text_encoder=te_fp,
                     resolution=base.resolution, encode=section_digest(cfg.encode))


def encode_marker(cfg: Params, base: BaseConfig, manifest_hash: str, fingerprints: dict[str, str]) -> str:
    """The index.json whose presence proves the shards of this VAE and manifest are complete.

    Encode is content-addressed by itself (shared by every base with the same VAE): its shards
    live under `encode.output/<vae fingerprint>/...`, not under `stages/encode/`.
    """
    te_fp = text_encoder_fingerprint(fingerprints) if cfg.encode.text_embeddings else None
    return index_path(latent_dir(cfg.encode.output, fingerprints["vae"], base.resolution, manifest_hash, te_fp))


def distill_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str], index_hash: str) -> str:
    """The base, the shard index and the distill section without its operational keys (and the launch config)."""
    accelerate = cfg.orchestrate.accelerate_config
    return stage_key("distill", base=base_identity(base_name, base, fingerprints), shards=index_hash,
                     distill=section_digest(cfg.distill.model_dump(mode="json", exclude=DISTILL_OPERATIONAL)),
                     accelerate=file_sha256(accelerate) if accelerate else None)


def evaluate_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str],
                 weights_sha256: str) -> str:
    """The base, the LoRA weights and the evaluate section."""
    return stage_key("evaluate", base=base_identity(base_name, base, fingerprints), lora=weights_sha256,
                     evaluate=section_digest(cfg.evaluate))


def merge_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str], weights_sha256: str,
              style_sha256: str) -> str:
    """The base, both LoRAs, and the evaluate and merge sections (the style file's path aside: its hash counts;
    `fallback` aside: what runs after a lost style does not change the merge)."""
    return stage_key("merge", base=base_identity(base_name, base, fingerprints), lora=weights_sha256,
                     style=style_sha256, evaluate=section_digest(cfg.evaluate),
                     merge=section_digest(cfg.merge.model_dump(mode="json", exclude={"style_file", "fallback"})))


def publish_key(cfg: Params, name: str, **content: Any) -> str:
    """What is published (LoRA hash, evaluation or merge key), under which name, alias and registry."""
    return stage_key("publish", **content, name=name, alias=cfg.publish.alias, registry=Storage(cfg.registry.root).url())
