"""components/storage/folder_sync.py: artifact folders to and from the storage root (local and S3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.storage.folder_sync import COMPLETE, is_complete, pull_folder, push_folder, work_dir
from components.storage.storage import Storage


def _folder(path: Path) -> Path:
    (path / "evaluation").mkdir(parents=True)
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 1000)
    (path / "evaluation" / "report.md").write_text("# report\n")
    return path


def test_local_root_copies_nothing(tmp_path: Path) -> None:
    store = Storage(str(tmp_path / "root"))
    local = work_dir(store, "stages/distill/toy/k1")
    assert local == tmp_path / "root" / "stages/distill/toy/k1"
    _folder(local)
    assert not is_complete(store, "stages/distill/toy/k1")
    names = push_folder(store, local, "stages/distill/toy/k1")
    assert names == ["evaluation/report.md", "pytorch_lora_weights.safetensors"]
    assert is_complete(store, "stages/distill/toy/k1")
    assert pull_folder(store, "stages/distill/toy/k1") == local


def test_s3_round_trip_through_the_cache(s3_bucket: str, tmp_path: Path) -> None:
    store = Storage(s3_bucket)
    src = _folder(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match=COMPLETE):
        pull_folder(store, "stages/x/k", cache=tmp_path / "cache")
    push_folder(store, src, "stages/x/k")
    assert store.exists("stages/x/k/evaluation/report.md") and is_complete(store, "stages/x/k")
    local = pull_folder(store, "stages/x/k", cache=tmp_path / "cache")
    assert local == work_dir(store, "stages/x/k", tmp_path / "cache")
    assert (local / "pytorch_lora_weights.safetensors").read_bytes() == b"\x00" * 1000
    assert (local / "evaluation" / "report.md").read_text() == "# report\n"


def test_push_of_a_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no folder to store"):
        push_folder(Storage(str(tmp_path)), tmp_path / "nope", "x")
