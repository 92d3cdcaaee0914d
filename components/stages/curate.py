"""The curate stage: a LAION-style source -> curated manifest behind the GX gate (contract 2).

    output = run_curate(params.curate, source=source, storage=storage, output="stages/curate/KEY",
                        min_side=base.resolution, resolved_yaml=params.to_yaml())
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from components.config import CurateConfig, Params, StorageConfig
from components.data.curate import curate
from components.progress import ProgressFn
from components.storage.storage import Storage


@dataclass(frozen=True)
class CurateOutput:
    """Where the manifest landed (relative to the storage it was written to) and what curation kept."""

    folder: str  # the manifest folder, relative to the storage root ("" when it is the root)
    manifest: str  # folder/manifest.parquet
    manifest_hash: str  # sha256 of manifest.parquet: versions the manifest
    rows_in: int
    kept: int
    rejected: dict[str, int]  # reason -> rows
    elapsed_s: float
    reused: bool = False  # the folder already held this curation (same key): nothing was curated

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able summary (what tasks return and artifacts show)."""
        return {"output": self.folder, "manifest": self.manifest, "manifest_hash": self.manifest_hash,
                "rows_in": self.rows_in, "kept": self.kept, "rejected": dict(self.rejected),
                "elapsed_s": round(self.elapsed_s, 3), "reused": self.reused}


def source_storage(source: str, storage_cfg: StorageConfig) -> Storage:
    """The curation source (local folder or s3://) on the storage endpoint of params."""
    return Storage(source, endpoint_url=storage_cfg.endpoint_url, region=storage_cfg.region,
                   retries=storage_cfg.retries)


def manifest_rel(folder: str, name: str = "manifest.parquet") -> str:
    """The manifest (or another file `name`) of a curate output folder, relative to the storage root."""
    folder = folder.strip("/")
    return f"{folder}/{name}" if folder else name


def stored_output(storage: Storage, folder: str) -> CurateOutput | None:
    """The curation already stored in `folder` (its manifest, written last, is there), or None."""
    rel = manifest_rel(folder)
    if not storage.exists(rel):
        return None
    summary = json.loads(storage.read_text(manifest_rel(folder, "summary.json")))
    return CurateOutput(folder=folder.strip("/"), manifest=rel, manifest_hash=summary["manifest_hash"],
                        rows_in=summary["rows_in"], kept=summary["kept"], rejected=dict(summary["rejected"]),
                        elapsed_s=0.0, reused=True)


def run_curate(cfg: CurateConfig, *, source: Storage, storage: Storage, output: str, min_side: int,
               resolved_yaml: str, progress: ProgressFn | None = None) -> CurateOutput:
    """Curate `source` into `storage/output/` (manifest, rejections, summary, GX data docs)."""
    result = curate(source, storage, output, cfg, min_side=min_side, resolved_config=resolved_yaml,
                    progress=progress)
    return CurateOutput(folder=output.strip("/"), manifest=manifest_rel(output), manifest_hash=result.manifest_hash,
                        rows_in=result.rows_in, kept=result.kept, rejected=dict(result.rejected),
                        elapsed_s=result.elapsed_s)


def curate_for_base(params: Params, base_name: str, output: str | None = None,
                    progress: ProgressFn | None = None) -> tuple[CurateOutput, Storage]:
    """The stage for one base of params (its resolution is the minimum side): the CLI's inputs.

    By default the manifest goes where the flows put it, `storage.root/stages/curate/KEY`
    (components/stages/inputs.py), and a curation already stored there is reused. `output`
    (a folder or s3:// URL) replaces that folder and always curates. Returns the output and
    the storage it was written to.
    """
    from components.models.base_model import resolve_base
    from components.stages.inputs import curate_rel

    _, base = resolve_base(params, base_name)
    if output is not None:
        storage, out_rel = source_storage(output, params.storage), ""
    else:
        storage, out_rel = Storage.from_config(params.storage), curate_rel(params, base.resolution)
        stored = stored_output(storage, out_rel)
        if stored is not None:
            return stored, storage
    result = run_curate(params.curate, source=source_storage(params.curate.source, params.storage), storage=storage,
                        output=out_rel, min_side=base.resolution, resolved_yaml=params.to_yaml(), progress=progress)
    return result, storage
