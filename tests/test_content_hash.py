"""components/storage/content_hash.py: tree digests follow content, not names of the root or mtimes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from components.storage.content_hash import canonical_digest, tree_digest
from components.storage.storage import Storage


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.parquet").write_bytes(b"metadata")
    (root / "sub" / "00000.tar").write_bytes(b"shard bytes")


def test_tree_digest_is_content_addressed(tmp_path: Path) -> None:
    _tree(tmp_path / "one")
    _tree(tmp_path / "two")
    one, two = Storage(str(tmp_path / "one")), Storage(str(tmp_path / "two"))
    assert tree_digest(one) == tree_digest(two), "same bytes, different place: same digest"
    os.utime(tmp_path / "two" / "a.parquet", (1, 1))
    assert tree_digest(one) == tree_digest(two), "mtimes do not matter"
    (tmp_path / "two" / "sub" / "00000.tar").write_bytes(b"shard bytes!")
    assert tree_digest(one) != tree_digest(two)
    before = tree_digest(one)
    (tmp_path / "one" / "sub" / "00000.tar").rename(tmp_path / "one" / "sub" / "00001.tar")
    assert tree_digest(one) != before, "a renamed file is a different tree"
    assert tree_digest(Storage(str(tmp_path)), "two/sub") == tree_digest(two, "sub")


def test_tree_digest_on_s3_matches_local(s3_bucket: str, tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    store = Storage(s3_bucket)
    for rel in ("a.parquet", "sub/00000.tar"):
        store.put_file(tmp_path / "src" / rel, f"src/{rel}")
    assert tree_digest(store, "src") == tree_digest(Storage(str(tmp_path / "src")))


def test_empty_tree_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no files to fingerprint"):
        tree_digest(Storage(str(tmp_path)), "missing")


def test_canonical_digest_ignores_key_order() -> None:
    assert canonical_digest({"a": 1, "b": [1, 2]}) == canonical_digest({"b": [1, 2], "a": 1})
    assert canonical_digest({"a": 1}) != canonical_digest({"a": 2})


def test_file_sha256_streams_a_file_larger_than_one_chunk(tmp_path) -> None:
    import hashlib

    from components.storage.content_hash import file_sha256

    data = bytes(range(256)) * (2**20 // 256 * 2 + 3)  # several of file_digest's buffers and a partial one
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(tmp_path / "blob")) == hashlib.sha256(data).hexdigest()
