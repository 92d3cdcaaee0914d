"""components/registry/registry.py: an OSError while publishing (full disk, no permission) names the path
being written, at the `lcmlora registry publish` entry point."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

import components.storage.local
from tests.test_registry import make_lora_folder


@pytest.mark.parametrize("writer, target", [
    ("put_file", "pytorch_lora_weights.safetensors"),  # a file of the folder
    ("write_bytes", "manifest.json"),  # the manifest, written last
])
def test_no_space_left_names_the_path_being_written(lcmlora_cli, tmp_path: Path, monkeypatch, writer, target) -> None:
    """It used to say only "OSError: [Errno 28] No space left on device"."""
    root = tmp_path / "registry"
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  root: {root}\n  cache_dir: {tmp_path / 'cache'}\n")
    folder = make_lora_folder(tmp_path / "lora")
    original = getattr(components.storage.local.LocalBackend, writer)

    def disk_full_at_target(self, *args):  # the disk fills up when `target` is written
        rel = args[0] if writer == "write_bytes" else args[1]  # (rel, data, ...) / (local, rel, ...)
        if rel.endswith(f"/{target}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args)

    monkeypatch.setattr(components.storage.local.LocalBackend, writer, disk_full_at_target)

    code, err = lcmlora_cli("registry", "publish", str(folder), "--name", "full-disk", "--params", str(params))

    assert code != 0
    written = root / "full-disk" / "versions" / "1" / target
    assert re.search(rf"\[Errno 28\] {re.escape(str(written))}: No space left on device while publishing "
                     r"full-disk version 1", err), err
