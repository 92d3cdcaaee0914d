"""`lcmlora registry push-hub`: a pulled version's folder as the Hub would get it (the Hub itself is
unreachable here: only HfApi's network calls are replaced by a recorder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from typer.testing import CliRunner

from components.lineage import write_lineage
from components.paths import PROJECT_ROOT
from components.registry.manifest import RegistryError
from components.registry.registry import Registry
from components.storage.storage import Storage
from flows.cli import app
from tests.test_registry import make_lora_folder


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A registry holding one LoRA version (card generated from its lineage), and params pointing at it."""
    folder = make_lora_folder(tmp_path / "lora", card=False)
    write_lineage(folder, {"base": {"name": "toy", "reference": str(PROJECT_ROOT / "data/toy/base"),
                                    "family": "sd15"},
                           "resolved": {"base": {"hub_id": "org/toy-base", "license": "mit"}},
                           "inputs": {"latents": str(tmp_path / "latents/index.json")}})
    Registry(Storage(str(tmp_path / "reg")), cache_dir=tmp_path / "cache").publish(folder, "toy-lcm-lora",
                                                                                    alias="candidate")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"root": str(tmp_path / "reg"), "cache_dir": str(tmp_path / "cache")}}))
    return params


class RecordingHfApi:
    """Stands in for HfApi's two network calls; records what they got and what the folder held then."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    seen: ClassVar[dict[str, bytes]] = {}

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path: str, repo_id: str, **kwargs) -> str:
        self.calls.append(("upload_folder", {"folder_path": folder_path, "repo_id": repo_id, **kwargs}))
        root = Path(folder_path)
        RecordingHfApi.seen = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_dry_run_lists_the_pulled_version_s_files(published: Path) -> None:
    out = CliRunner().invoke(app, ["registry", "push-hub", "toy-lcm-lora@candidate", "me/toy-lcm-lora",
                                   "--dry-run", "--params", str(published)])
    assert out.exit_code == 0, out.output
    assert "would upload toy-lcm-lora:1" in out.output and "https://huggingface.co/me/toy-lcm-lora" in out.output
    listed = [line.strip() for line in out.output.splitlines() if line.startswith("  ")]
    assert {"README.md", "pytorch_lora_weights.safetensors", "lineage.json", "metrics.json"} <= set(listed)


def test_upload_gets_the_checked_folder_and_the_repo(published: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    out = CliRunner().invoke(app, ["registry", "push-hub", "toy-lcm-lora@candidate", "me/toy-lcm-lora",
                                   "--private", "--params", str(published)])
    assert out.exit_code == 0, out.output
    (kind1, create), (kind2, upload) = RecordingHfApi.calls
    assert kind1 == "create_repo" and create == {"repo_id": "me/toy-lcm-lora", "repo_type": "model",
                                                  "private": True, "exist_ok": True}
    assert kind2 == "upload_folder" and upload["repo_id"] == "me/toy-lcm-lora" and upload["repo_type"] == "model"
    assert "toy-lcm-lora:1" in upload["commit_message"]
    files = RecordingHfApi.seen
    assert "pytorch_lora_weights.safetensors" in files
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["base_model"] == "org/toy-base" and front["base_model_relation"] == "adapter"
    assert front["pipeline_tag"] == "text-to-image" and front["license"] == "mit"
    lineage = json.loads(files["lineage.json"])
    assert lineage["base"]["reference"] == "data/toy/base" and lineage["inputs"]["latents"] == "local:index.json"
    assert not Path(upload["folder_path"]).exists(), "the pulled copy is a temporary folder"


def test_a_folder_naming_local_paths_is_refused(tmp_path: Path) -> None:
    from components.lora.model_card import render_model_card
    from components.registry.hub_push import hub_upload_plan

    folder = make_lora_folder(tmp_path / "old", card=False)
    (folder / "README.md").write_text(render_model_card(base_model="org/base", title="old"))
    (folder / "config.yaml").write_text("storage:\n  root: /home/someone/artifacts\n")
    (folder / "README.md").write_text((folder / "README.md").read_text().replace("pipeline_tag: text-to-image\n", ""))
    with pytest.raises(RegistryError) as err:
        hub_upload_plan(folder)
    assert "config.yaml: storage.root names a local path '/home/someone/artifacts'" in str(err.value)
    assert "README.md: pipeline_tag" in str(err.value)
