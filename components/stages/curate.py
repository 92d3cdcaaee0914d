"""The curate stage: a LAION-style source -> curated manifest behind the GX gate (contract 2).

    output = curate_stage(params, storage, min_side=base.resolution)   # the one call of every caller

`curate_stage` finds the keyed folder (`stages/curate/KEY`), reuses a curation stored there and
otherwise runs `run_curate`, the runner over the curate section alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from components.config import CurateConfig, Params
from components.data.curate import curate
from components.progress import ProgressFn
from components.stages.inputs import curate_rel, manifest_rel, source_storage
from components.stages.keys import output_rel
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


def curate_stage(params: Params, storage: Storage, *, min_side: int, output: str | None = None,
                 key: str | None = None, progress: ProgressFn | None = None) -> CurateOutput:
    """The curate stage's one call: params' source -> a manifest of sides >= `min_side` in `storage`.

    By default the manifest goes to the keyed folder `stages/curate/KEY` (`key` when the caller
    has computed it, else from the source's digest), and a curation already stored there is
    reused. `output` (a folder of `storage`, "" for its root) curates there, always.
    """
    if output is None:
        output = output_rel("curate", key) if key else curate_rel(params, min_side)
        stored = stored_output(storage, output)
        if stored is not None:
            return stored
    return run_curate(params.curate, source=source_storage(params.curate.source, params.storage), storage=storage,
                      output=output, min_side=min_side, resolved_yaml=params.to_yaml(), progress=progress)
