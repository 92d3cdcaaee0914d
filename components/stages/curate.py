"""The curate stage: a LAION-style source -> curated manifest behind the GX gate (contract 2).

    output = curate_stage(params, storage, min_side=base.resolution)   # the one call of every caller

`curate_stage` finds the keyed folder (`stages/curate/KEY`), reuses a curation stored there and
otherwise runs `run_curate`, the runner over the curate section alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from components.claims import claim_work, default_owner, refresh_claim
from components.config import CurateConfig, Params
from components.data.curate import curate
from components.progress import Progress, ProgressFn
from components.stages.inputs import curate_rel, manifest_rel, source_storage
from components.stages.keys import output_rel
from components.storage.storage import Storage

CLAIM_STALE_S = 600.0  # a claim not refreshed for this long belongs to a dead process


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
                 key: str | None = None, claim_owner: str | None = None,
                 progress: ProgressFn | None = None) -> CurateOutput:
    """The curate stage's one call: params' source -> a manifest of sides >= `min_side` in `storage`.

    By default the manifest goes to the keyed folder `stages/curate/KEY` (`key` when the caller
    has computed it, else from the source's digest), and a curation already stored there is
    reused. Two runs of one key at once (two bases of a fanned-out nightly) curate it once: the
    first claims `stages/curate/KEY.claim.json` (components/claims.py; `claim_owner` names it,
    default host:pid), the other waits and reuses its manifest. `output` (a folder of `storage`,
    "" for its root) curates there, always.
    """
    source = source_storage(params.curate.source, params.storage)
    if output is not None:
        return run_curate(params.curate, source=source, storage=storage, output=output, min_side=min_side,
                          resolved_yaml=params.to_yaml(), progress=progress)
    # 1. The keyed folder, claimed (a curation stored there, or finished by the claim's holder, is reused).
    output = output_rel("curate", key) if key else curate_rel(params, min_side)
    claim_rel, owner = f"{output}.claim.json", claim_owner or default_owner()

    def waiting(holder: str) -> None:
        if progress is not None:
            progress(Progress(stage="curate", step=0, total=0, note=f"waiting for {holder}"))

    if not claim_work(storage, claim_rel, manifest_rel(output), owner, stale_s=CLAIM_STALE_S, on_wait=waiting):
        return stored_output(storage, output)

    def report(p: Progress) -> None:  # every report refreshes the claim
        refresh_claim(storage, claim_rel, owner)
        if progress is not None:
            progress(p)

    # 2. The curation; the claim goes once the manifest is there (a failed run's claim goes stale).
    try:
        return run_curate(params.curate, source=source, storage=storage, output=output, min_side=min_side,
                          resolved_yaml=params.to_yaml(), progress=report)
    finally:
        if storage.exists(manifest_rel(output)):
            storage.delete(claim_rel)
