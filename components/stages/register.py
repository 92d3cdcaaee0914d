"""The new-base registration: a record of each base a storage root has seen, with its parent.

    record = record_base(storage, base, parent="toy")   # storage.root/bases/NAME/UNET_FP.json
"""

from __future__ import annotations

import json
from typing import Any

from components.lineage import utc_now
from components.models.base_model import ResolvedBase
from components.storage.storage import Storage


def base_record_rel(base: ResolvedBase) -> str:
    """`bases/NAME/UNET_FP.json`: one record per name and UNet (a retrained fine-tune gets another)."""
    return f"bases/{base.name}/{base.fingerprint}.json"


def record_base(storage: Storage, base: ResolvedBase, parent: str | None) -> dict[str, Any]:
    """Write the base's record (settings, fingerprints, parent, time) and return it with its path."""
    record = {"name": base.name, **base.config.model_dump(mode="json"), "fingerprints": base.fingerprints,
              "parent": parent, "registered_at": utc_now()}
    rel = base_record_rel(base)
    storage.write_text(rel, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return {**record, "record": rel}
