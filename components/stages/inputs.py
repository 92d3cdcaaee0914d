"""Where each stage finds its inputs and puts its output: the key chain the CLI and the flows share.

The flows (flows/stages.py, through tasks/) and the CLI stage commands (flows/cli.py) compute
the content fingerprints with these functions and the keys with `components/stages/keys.py`,
so both land on the same `storage.root/stages/STAGE/[BASE/]KEY` folders:

    source digest --curate_key--> stages/curate/KEY/manifest.parquet
    manifest hash, VAE fingerprint --> encode.output/<vae>/... index.json (+ encode.pointers/BASE.json)
    base fingerprints, index hash --distill_key--> stages/distill/BASE/KEY
    LoRA weights sha256 --evaluate_key / merge_key--> stages/evaluate|merge/BASE/KEY
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from components.config import Params, StorageConfig
from components.lora.io import lora_file
from components.models.base_model import ResolvedBase
from components.stages.keys import curate_key, distill_key, evaluate_key, merge_key, output_rel
from components.storage.content_hash import file_sha256, tree_digest
from components.storage.folder_sync import is_complete
from components.storage.storage import Storage


class MissingInput(FileNotFoundError):
    """A stage's input is not where the key chain says it is: the earlier stage has not run."""


# --- the content fingerprints keys are built from -----------------------------------------


def source_storage(source: str, storage_cfg: StorageConfig) -> Storage:
    """The curation source (local folder or s3://) on the storage endpoint of params."""
    return Storage(source, endpoint_url=storage_cfg.endpoint_url, region=storage_cfg.region,
                   retries=storage_cfg.retries)


def manifest_rel(folder: str, name: str = "manifest.parquet") -> str:
    """The manifest (or another file `name`) of a curate output folder, relative to the storage root."""
    folder = folder.strip("/")
    return f"{folder}/{name}" if folder else name


def source_digest(params: Params) -> str:
    """Content digest of the whole curation source tree (metadata and shards)."""
    return tree_digest(source_storage(params.curate.source, params.storage))


def stored_sha256(storage: Storage, rel: str) -> str:
    """sha256 of a stored file: the manifest hash, the shard index hash."""
    return hashlib.sha256(storage.read_bytes(rel)).hexdigest()


def lora_sha256(path: str | Path) -> str:
    """sha256 of a LoRA's weights, given as its file or its contract-4 folder."""
    return file_sha256(lora_file(path))


# --- where each stage's output is, for one params and base --------------------------------


def curate_rel(params: Params, min_side: int) -> str:
    """`stages/curate/KEY`: the curated manifest folder for this source, curate section and minimum side."""
    return output_rel("curate", curate_key(params, source_digest(params), min_side))


def curated_manifest(params: Params, storage: Storage, min_side: int) -> str:
    """The curated manifest of this params (relative to the storage root); it must exist."""
    rel = manifest_rel(curate_rel(params, min_side))
    if not storage.exists(rel):
        raise MissingInput(f"{storage.url(rel)}: no curated manifest for this source and curate section; "
                           "run `lcmlora curate` first (or pass --manifest)")
    return rel


def encoded_index(params: Params, storage: Storage, base_name: str) -> str:
    """The shard index of a base: `distill.latents_index`, else the one its encode pointer names."""
    if params.distill.latents_index:
        return params.distill.latents_index
    pointer = f"{params.encode.pointers.strip('/')}/{base_name}.json"
    if not storage.exists(pointer):
        raise MissingInput(f"{storage.url(pointer)}: no encode pointer for base {base_name}; run "
                           f"`lcmlora encode --base {base_name}` first (or set distill.latents_index)")
    return json.loads(storage.read_text(pointer))["index"]


def distill_rel(params: Params, storage: Storage, base: ResolvedBase) -> tuple[str, str]:
    """(`stages/distill/BASE/KEY`, the shard index it trains on) for this base and distill section."""
    index = encoded_index(params, storage, base.name)
    key = distill_key(params, base.name, base.config, base.fingerprints, stored_sha256(storage, index))
    return output_rel("distill", key, base.name), index


def distilled_lora(params: Params, storage: Storage, base: ResolvedBase) -> str:
    """The complete distill output of this params for the base (relative to the storage root)."""
    rel, _ = distill_rel(params, storage, base)
    if not is_complete(storage, rel):
        raise MissingInput(f"{storage.url(rel)}: no complete LoRA of base {base.name} for this distill section; "
                           f"run `lcmlora distill --base {base.name}` first (or pass --lora / --lcm)")
    return rel


def evaluation_rel(params: Params, base: ResolvedBase, lora_folder: str | Path) -> str:
    """`stages/evaluate/BASE/KEY`: the evaluation of this LoRA on the base under the evaluate section."""
    key = evaluate_key(params, base.name, base.config, base.fingerprints, lora_sha256(lora_folder))
    return output_rel("evaluate", key, base.name)


def merge_rel(params: Params, base: ResolvedBase, lcm_folder: str | Path, style_file: str | Path) -> str:
    """`stages/merge/BASE/KEY`: the style variants of this LCM-LoRA and style LoRA under the merge section."""
    key = merge_key(params, base.name, base.config, base.fingerprints, lora_sha256(lcm_folder),
                    lora_sha256(style_file))
    return output_rel("merge", key, base.name)
