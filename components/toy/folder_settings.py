"""A toy folder's record of the settings it was written with, read against the settings asked for.

The hard source (`toy_summary.json`) and the hard style set (`settings.json`) each record what they
were written with; a reader that asks for other settings refuses the folder by name instead of
training on the wrong data. A record without a key (written before the setting existed) holds that
key's default, and so does a missing record file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stale_settings(record: Path, expected: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, asked)} for each key of `expected` ({key: (asked, default)}) whose value in the
    JSON file `record` (default when absent) differs from the one asked for."""
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    return {key: (recorded.get(key, default), value) for key, (value, default) in expected.items()
            if recorded.get(key, default) != value}
