"""flows/registry_cli.py (`lcmlora registry ...`) on a real SeaweedFS and on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.registry_cli import registry_app
from tests.test_registry import make_lora_folder


@pytest.fixture
def cli(tmp_path: Path):
    def make(root: str):
        params = tmp_path / "params.yaml"
        params.write_text(f"registry:\n  root: {root}\n  cache_dir: {tmp_path / 'cache'}\n")
        runner = CliRunner()

        def run(*args: str, ok: bool = True) -> str:
            result = runner.invoke(registry_app, [*args, "--params", str(params)])
            if ok:
                assert result.exit_code == 0, result.output
                return result.output
            assert result.exit_code != 0, result.output
            return result.output + str(result.exception or "")
        return run
    return make


def test_cli_registry_commands_on_s3(s3_bucket: str, tmp_path: Path, cli) -> None:
    run = cli(f"{s3_bucket}/reg")
    folder = make_lora_folder(tmp_path / "lora")
    out = run("publish", str(folder), "--name", "cli-lora", "--alias", "candidate")
    assert "published cli-lora:1" in out and "digest cli-lora@sha256:" in out
    digest = out.split("digest cli-lora@")[1].split()[0]
    again = run("publish", str(folder), "--name", "cli-lora")
    assert "already published: cli-lora:1 has identical content" in again and digest in again
    assert "published cli-lora:2" in run("publish", str(make_lora_folder(tmp_path / "l2", seed=1)), "--name",
                                         "cli-lora")
    assert run("list").split() == ["cli-lora"]
    listing = run("list", "cli-lora")
    assert "cli-lora:1" in listing and "candidate" in listing and "gate passed" in listing and digest[:19] in listing
    shown = json.loads(run("show", f"cli-lora@{digest[:7 + 12]}"))
    assert shown["version"] == 1 and shown["aliases"] == ["candidate"] and shown["digest"] == digest
    pulled = run("pull", "cli-lora", "--to", str(tmp_path / "out"))
    assert "pulled cli-lora:2" in pulled and "5 files downloaded, 0 from cache, all verified" in pulled
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "1 -> 2" in run("alias", "set", "cli-lora", "candidate", "2")
    assert "rolled back 2 -> 1" in run("alias", "rollback", "cli-lora", "candidate", "--reason", "regressed")
    history = run("alias", "history", "cli-lora", "candidate")
    assert "(new) -> 1" in history and "rollback\tregressed" in history
    assert "would delete" in run("gc", "cli-lora", "--keep", "0") and run("list", "cli-lora").count("cli-lora:") == 2
    bad = run("show", "cli-lora:7", ok=False)
    assert "no such version" in bad


def test_cli_gate_refusal_force_reason_and_broken_listing(tmp_path: Path, cli) -> None:
    run = cli(str(tmp_path / "reg"))
    run("publish", str(make_lora_folder(tmp_path / "good")), "--name", "g", "--alias", "production")
    never = make_lora_folder(tmp_path / "never", seed=1)
    (never / "metrics.json").unlink()
    assert "never evaluated" in run("publish", str(never), "--name", "g", "--alias", "production", ok=False)
    assert "gate missing" in run("publish", str(never), "--name", "g")
    assert "never evaluated" in run("alias", "set", "g", "production", "2", ok=False)
    assert "--force needs --reason" in run("alias", "set", "g", "production", "2", "--force", ok=False)
    out = run("alias", "set", "g", "production", "2", "--force", "--reason", "checked by hand")
    assert "1 -> 2 (forced: checked by hand)" in out
    assert "force\tchecked by hand" in run("alias", "history", "g", "production")
    for seed in range(2, 4):
        run("publish", str(make_lora_folder(tmp_path / f"l{seed}", seed=seed)), "--name", "g")
    manifest = tmp_path / "reg" / "g" / "versions" / "3" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"passed": true', '"passed": false'))
    lines = run("list", "g").splitlines()  # one edited manifest hides nothing and exits 0
    assert [line.split("\t")[0] for line in lines] == ["g:1", "g:2", "g:3", "g:4"]
    assert "BROKEN" in lines[2] and "edited after publish" in lines[2]
    assert "gate passed" in lines[0] and "gate missing" in lines[1] and "gate passed" in lines[3]
