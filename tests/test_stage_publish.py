"""The publish runner: a gated folder becomes a version, the alias moves, the pull command is right."""

from __future__ import annotations

from components.config import PublishConfig
from components.registry.registry import Registry
from components.stages.publish import pull_command, registry_name, run_publish
from components.storage.storage import Storage
from tests.test_registry import make_lora_folder


def test_run_publish_creates_a_version_and_moves_the_alias(tmp_path):
    registry = Registry(Storage(str(tmp_path / "reg")), cache_dir=tmp_path / "cache")
    folder = make_lora_folder(tmp_path / "lora")
    cfg = PublishConfig(alias="candidate")
    first = run_publish(cfg, registry=registry, folder=folder, name="toy-lcm-lora", registry_root=str(tmp_path / "reg"))
    again = run_publish(cfg, registry=registry, folder=folder, name="toy-lcm-lora", registry_root="registry")
    assert (again.version, again.existing, again.digest) == (first.version, True, first.digest), \
        "identical content returns the existing version"
    retrained = make_lora_folder(tmp_path / "lora2", seed=1)
    second = run_publish(cfg, registry=registry, folder=retrained, name="toy-lcm-lora", registry_root="registry")
    assert (first.version, second.version, second.existing) == ("1", "2", False)
    assert second.digest != first.digest and second.digest.startswith("sha256:")
    assert second.reference == f"toy-lcm-lora:{second.version}"
    assert registry.aliases("toy-lcm-lora")["candidate"] == second.version
    assert first.pull.endswith(f"--set registry.root={tmp_path / 'reg'}")
    assert second.pull == "lcmlora registry pull toy-lcm-lora@candidate --to DIR"


def test_names_and_pull_commands():
    assert registry_name(PublishConfig(), "toy") == "toy-lcm-lora"
    assert registry_name(PublishConfig(name="mine"), "toy") == "mine"
    assert registry_name(PublishConfig(), "toy", "pcm") == "toy-pcm-lora"
    assert registry_name(PublishConfig(name="mine"), "toy", "pcm") == "mine-pcm"
    assert pull_command("n", "prod", "s3://b/r") == "lcmlora registry pull n@prod --to DIR --set registry.root=s3://b/r"
