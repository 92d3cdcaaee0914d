"""The LAION/img2dataset source layout, written: what curation reads (components/data/curate.py).

    NNNNN.tar            webdataset shard: KEY.jpg or KEY.png, KEY.txt (the caption), KEY.json (the row)
    NNNNN_stats.json     img2dataset per-shard statistics
    *.parquet            metadata, one row per sample: LAION's column names (`METADATA_COLUMNS`); one
                         file for the whole source, or one per shard (NNNNN.parquet) as img2dataset writes

The bytes depend only on the content (fixed tar headers, sorted JSON), so the same rows write the same
files. The toy worlds (components/toy/source.py) and the synthesize stage (components/data/synthesize.py)
both write through these functions.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterable, Mapping
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

# The metadata columns: LAION's, img2dataset's status and original size, key and shard.
METADATA_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(), "shard": pa.string(), "URL": pa.string(), "TEXT": pa.string(), "WIDTH": pa.int64(),
    "HEIGHT": pa.int64(), "similarity": pa.float64(), "punsafe": pa.float64(), "pwatermark": pa.float64(),
    "AESTHETIC_SCORE": pa.float64(), "status": pa.string(), "original_width": pa.int64(),
    "original_height": pa.int64(),
}


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so the tar bytes depend only on the content."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar(fh: IO[bytes], members: Iterable[tuple[str, bytes]]) -> None:
    """A webdataset shard of `members` (name, bytes), in order, to an open binary file."""
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar_add(tar, name, data)


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The bytes of `write_tar`'s shard."""
    buf = io.BytesIO()
    write_tar(buf, members)
    return buf.getvalue()


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def sample_json(record: Mapping[str, Any]) -> bytes:
    """KEY.json of a metadata row: its columns (less `shard` and `_`-private keys; NaN as null) and
    img2dataset's url, caption and error_message."""
    meta = {k: _json_value(v) for k, v in record.items() if not k.startswith("_") and k != "shard"}
    meta.update(url=record["URL"], caption=record["TEXT"], error_message=None)
    return json.dumps(meta, sort_keys=True).encode()


def shard_stats(count: int) -> str:
    """NNNNN_stats.json of a shard of `count` downloaded samples, as img2dataset writes it."""
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": count}}
    return json.dumps(stats, sort_keys=True, indent=1) + "\n"


def metadata_table(records: list[Mapping[str, Any]],
                   columns: Mapping[str, pa.DataType] = METADATA_COLUMNS) -> pa.Table:
    """The metadata rows as a table of `columns` (name -> type), in that order."""
    return pa.table({name: pa.array([r[name] for r in records], kind, from_pandas=False)
                     for name, kind in columns.items()})


def write_metadata(table: pa.Table, where: str | IO[bytes]) -> None:
    """The metadata parquet (zstd), to a path or an open binary file."""
    pq.write_table(table, where, compression="zstd")


def metadata_bytes(table: pa.Table) -> bytes:
    """The bytes of `write_metadata`'s parquet."""
    buf = io.BytesIO()
    write_metadata(table, buf)
    return buf.getvalue()
