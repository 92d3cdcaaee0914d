"""components/registry/manifest.py: the stored manifest's bytes, and its validation on read."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from components.registry.manifest import FileEntry, Manifest, RegistryError


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sample_manifest() -> Manifest:
    """Every shape a manifest holds: a part-listed file, floats, a NaN, a big int, non-ASCII text."""
    files = {"pytorch_lora_weights.safetensors": FileEntry(_sha("w"), 20_000_000, 8_388_608,
                                                           (_sha("p0"), _sha("p1"), _sha("p2"))),
             "README.md": FileEntry(_sha("card"), 312), "report/table.md": FileEntry(_sha("t"), 0)}
    return Manifest(name="toy-lcm-lora", version="3", files=files,
                    base={"name": "toy", "reference": "data/toy/base", "family": "sd15", "fingerprint": "f" * 64},
                    metrics={"fd_4_steps": 1.25, "clip": 0.1 + 0.2, "tiny": 1e-07, "big": 10**20,
                             "ratio": float("nan"), "note": "café ✓", "per_step": [3.5, 2, None]},
                    gate={"passed": True, "violations": []}, lineage={"run": {"id": "r1", "steps": 4}},
                    created_at="2025-01-02T03:04:05.678+00:00")


# What the hand-written parser's release wrote for `sample_manifest()`: registry versions are immutable,
# so the same content must give these bytes (and this digest) forever.
STORED = r'''{
  "format": 2,
  "name": "toy-lcm-lora",
  "version": 3,
  "created_at": "2025-01-02T03:04:05.678+00:00",
  "digest": "sha256:2ced1b019ef750106a7ec61da9d5d36002d4bf9c3b3ef30842ef6e346bc0a093",
  "files": {
    "README.md": {
      "sha256": "8367cd66fdd136bba8ba23f8805bb050dd6289401c8ec3b0be44a3c233eef90d",
      "size": 312
    },
    "pytorch_lora_weights.safetensors": {
      "sha256": "50e721e49c013f00c62cf59f2163542a9d8df02464efeb615d31051b0fddc326",
      "size": 20000000,
      "part_size": 8388608,
      "parts": [
        "169b5b823c62b64ca7e5f8456a13c8d5d06f4ece522a58bc2b8a784dcf3609b0",
        "f64551fcd6f07823cb87971cfb91446425da18286b3ab1ef935e0cbd7a69f68a",
        "3946ca64ff78d93ca61090a437cbb6b3d2ca0d488f5f9ccf3059608368b27693"
      ]
    },
    "report/table.md": {
      "sha256": "e3b98a4da31a127d4bde6e43033f66ba274cab0eb7eb1c70ec41402bf6273dd8",
      "size": 0
    }
  },
  "base": {
    "name": "toy",
    "reference": "data/toy/base",
    "family": "sd15",
    "fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
  },
  "metrics": {
    "fd_4_steps": 1.25,
    "clip": 0.30000000000000004,
    "tiny": 1e-07,
    "big": 100000000000000000000,
    "ratio": NaN,
    "note": "caf\u00e9 \u2713",
    "per_step": [
      3.5,
      2,
      null
    ]
  },
  "gate": {
    "passed": true,
    "violations": []
  },
  "lineage": {
    "run": {
      "id": "r1",
      "steps": 4
    }
  }
}
'''


def test_written_bytes_match_the_released_format_and_read_back_unchanged() -> None:
    manifest = sample_manifest()
    assert manifest.to_json() == STORED
    read = Manifest.from_json(STORED.encode(), "fixture")
    assert read.to_json() == STORED and read.digest == read.stored_digest == manifest.digest
    assert read.raw == STORED.encode() and read.version == "3" and read.files == manifest.files
    assert math.isnan(read.metrics["ratio"]) and read.metrics["big"] == 10**20 and read.metrics["note"] == "café ✓"


def _edited(edit) -> str:
    body = json.loads(STORED)
    edit(body)
    return json.dumps(body, indent=2)


@pytest.mark.parametrize(("edit", "path", "why"), [
    # The hand-written parser converted these with int()/str() and accepted them.
    (lambda b: b["files"]["README.md"].update(size="312"), "files['README.md'].size", "valid integer"),
    (lambda b: b["files"]["README.md"].update(size=True), "files['README.md'].size", "valid integer"),
    (lambda b: b.update(version="3"), "version", "valid integer"),
    (lambda b: b["files"]["README.md"].update(sha256=12), "files['README.md'].sha256", "valid string"),
    (lambda b: b["files"]["report/table.md"].update(part_size=4), "files['report/table.md']", "without parts"),
    (lambda b: b.update(gate=["passed"]), "gate", "should be an object"),
    (lambda b: b.update(extra=1), "extra", "Extra inputs"),
    # Refused before too, but without the field's path.
    (lambda b: b["files"]["README.md"].pop("sha256"), "files['README.md'].sha256", "Field required"),
    (lambda b: b["files"]["pytorch_lora_weights.safetensors"]["parts"].pop(),
     "files['pytorch_lora_weights.safetensors']", "2 part hashes do not cover 20000000 bytes"),
    (lambda b: b["files"].update({"../escape": {"sha256": _sha("x"), "size": 1}}), "files['../escape']", "'..'"),
])
def test_a_wrong_field_is_refused_naming_the_source_and_its_path(edit, path: str, why: str) -> None:
    with pytest.raises(RegistryError) as info:
        Manifest.from_json(_edited(edit), "s3://bucket/reg/toy/versions/3/manifest.json")
    message = str(info.value)
    assert message.startswith("s3://bucket/reg/toy/versions/3/manifest.json: malformed manifest: ")
    assert f"{path}: " in message or f"{path} (the key): " in message
    assert why in message


def test_every_bad_field_is_named_at_once() -> None:
    def two(body: dict) -> None:
        body["files"]["README.md"]["size"] = "312"
        del body["files"]["report/table.md"]["sha256"]
    message = str(pytest.raises(RegistryError, Manifest.from_json, _edited(two), "m.json").value)
    assert "files['README.md'].size" in message and "files['report/table.md'].sha256" in message


@pytest.mark.parametrize(("text", "expected"), [
    (json.dumps({"format": 1, "name": "x", "version": "v1"}), "manifest format 1, this lcmlora reads format 2"),
    ("{}", "manifest format None, this lcmlora reads format 2"),
    ("{not json", "malformed manifest: Invalid JSON"),
    ("[]", "malformed manifest: Input should be an object"),
])
def test_older_formats_and_non_manifests_are_refused(text: str, expected: str) -> None:
    with pytest.raises(RegistryError, match=rf"^m\.json: {expected}"):
        Manifest.from_json(text, "m.json")
