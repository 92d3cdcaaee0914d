"""The tables curation writes (DESIGN contract 2): the manifest, the candidates pass 1 hands
to pass 2, and the rejections both passes append to."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("shard", pa.string()),  # source tar, relative to the source root
    ("member", pa.string()),  # image member inside the tar (KEY.jpg)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("aesthetic", pa.float64()),
    ("pwatermark", pa.float64()),
    ("punsafe", pa.float64()),
    ("similarity", pa.float64()),
    ("image_sha256", pa.string()),
])
CANDIDATE_SCHEMA = pa.schema([f for f in MANIFEST_SCHEMA if f.name not in ("member", "image_sha256")])
REJECTED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("reason", pa.dictionary(pa.int32(), pa.string())),
    ("detail", pa.dictionary(pa.int32(), pa.string())),  # the threshold or error that rejected it
    ("value", pa.float64()),  # the offending value, where there is one
])
