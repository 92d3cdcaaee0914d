"""Artifact folders are complete or absent and get the umask's permissions
(components/storage/atomic_dir.py and its writers, issue 16 item 2)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from components.models.base_model import fingerprint_base
from components.storage.atomic_dir import FolderNotReplaceable, atomic_dir, write_text_atomic
from tests.test_distill_artifact import lora_sd, write  # noqa: F401 - lora_sd is a fixture

OWNS = ("*.txt", "keep")


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def enospc_after_first(real):
    """A writer that does its first call and then finds the disk full."""
    calls = []

    def writer(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    return writer


def test_clean_exit_renames_the_staging_folder_into_place(tmp_path):
    with atomic_dir(tmp_path / "out", owns=OWNS) as staging:
        assert staging.name == f".out.tmp-{os.getpid()}" and staging.parent == tmp_path
        (staging / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # nothing visible until complete
    assert entries(tmp_path) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "a"


def test_failure_leaves_the_previous_folder_and_no_sibling(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous run")
    with pytest.raises(OSError, match="No space left"), atomic_dir(tmp_path / "out", owns=OWNS) as staging:
        (staging / "new.txt").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert entries(tmp_path) == ["out"] and entries(tmp_path / "out") == ["old.txt"]


def test_replaces_the_previous_folder_whole_carrying_named_entries(tmp_path):
    (tmp_path / "out" / "keep").mkdir(parents=True)
    (tmp_path / "out" / "keep" / "state").write_text("resume me")
    (tmp_path / "out" / "stale.txt").write_text("describes the previous run")
    with atomic_dir(tmp_path / "out", owns=OWNS, carry=("keep",)) as staging:
        (staging / "new.txt").write_text("new")
    assert entries(tmp_path) == ["out"] and entries(tmp_path / "out") == ["keep", "new.txt"]
    assert (tmp_path / "out" / "keep" / "state").read_text() == "resume me"


def test_never_replaces_a_folder_holding_what_the_writer_does_not_own(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.py").write_text("mine")
    with pytest.raises(FolderNotReplaceable, match=r"out: holds notes.py"), atomic_dir(tmp_path / "out", owns=OWNS):
        pytest.fail("must refuse before yielding")
    assert entries(tmp_path / "out") == ["notes.py"]


def test_files_get_the_umask_permissions(tmp_path, umask_022):
    with atomic_dir(tmp_path / "out", owns=OWNS) as staging:
        (staging / "private.txt").write_text("x")
        (staging / "private.txt").chmod(0o600)  # what safetensors' save_file leaves
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "tool").write_text("#!/bin/sh\n")
        (staging / "sub" / "tool").chmod(0o700)
    out = tmp_path / "out"
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert oct((out / "private.txt").stat().st_mode & 0o777) == "0o644"
    assert oct((out / "sub").stat().st_mode & 0o777) == "0o755"
    assert oct((out / "sub" / "tool").stat().st_mode & 0o777) == "0o755"


def test_write_text_atomic_keeps_old_text_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("components.storage.atomic_dir.os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and entries(tmp_path) == ["metrics.json"]


# --- distill's artifact folder -----------------------------------------------------------


def test_distill_artifact_enospc_after_the_first_file_leaves_no_folder(tmp_path, lora_sd, monkeypatch):  # noqa: F811
    from components.lora import formats as lora_formats

    monkeypatch.setattr(lora_formats, "save_file", enospc_after_first(lora_formats.save_file))
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "art", lora_sd)
    assert entries(tmp_path) == []  # no half folder, no staging sibling


def test_distill_artifact_enospc_keeps_the_previous_complete_folder(tmp_path, lora_sd, monkeypatch):  # noqa: F811
    from components.lora import formats as lora_formats

    write(tmp_path / "art", lora_sd)
    before = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()}
    monkeypatch.setattr(lora_formats, "save_file", enospc_after_first(lora_formats.save_file))
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "art", lora_sd, config_yaml="distill:\n  lora_rank: 8\n")
    assert entries(tmp_path) == ["art"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()} == before


def test_distill_safetensors_follow_the_umask(tmp_path, lora_sd, umask_022):  # noqa: F811
    paths, _ = write(tmp_path / "art", lora_sd)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "art").iterdir()}
    assert modes[paths["diffusers"].name] == modes[paths["kohya"].name] == "0o644", modes
    assert set(modes.values()) == {"0o644"}


# --- evaluation's output folder and the LoRA folder's evaluation/ ------------------------


def test_evaluation_enospc_mid_report_keeps_previous_outputs(tmp_path, monkeypatch):
    from components.evaluate import evaluation as ev

    out, lora = tmp_path / "runs" / "evaluate" / "toy", tmp_path / "lora"
    (lora / "evaluation").mkdir(parents=True)
    (lora / "evaluation" / "report.md").write_text("previous report")
    (lora / "metrics.json").write_text('{"distill": {}}')
    out.mkdir(parents=True)
    (out / "report.md").write_text("previous report")

    def report_then_full_disk(doc, prompts, grid_images, folder):
        (folder / "report.md").write_text("half of a new report")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ev, "write_report", report_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        ev.write_evaluation(ev.Evaluation(doc={"gate": {"passed": True}}, prompts=[], grid_images=[]), out, lora)
    assert entries(out.parent) == ["toy"] and entries(out) == ["report.md"]
    assert (out / "report.md").read_text() == "previous report"
    assert (lora / "evaluation" / "report.md").read_text() == "previous report"
    assert (lora / "metrics.json").read_text() == '{"distill": {}}'  # no gate for a report that was not written


def test_evaluation_refuses_to_replace_a_lora_folder_passed_as_output(tmp_path, lora_sd):  # noqa: F811
    from components.evaluate.evaluation import Evaluation, write_evaluation

    write(tmp_path / "art", lora_sd)
    before = entries(tmp_path / "art")
    with pytest.raises(FolderNotReplaceable, match=r"art: holds config.yaml, lora_kohya.safetensors"):
        write_evaluation(Evaluation(doc={}, prompts=[], grid_images=[]), tmp_path / "art")
    assert entries(tmp_path / "art") == before


# --- the merge stage's output folder -------------------------------------------------------


def test_merge_output_follows_the_umask_and_survives_enospc_in_the_report(tmp_path, monkeypatch, umask_022):
    from components.config import BaseConfig, MergeConfig, Params
    from components.stages import merge as stage
    from tests.tiny_merge_pipelines import (
        LCM_UNET,
        STYLE_UNET,
        random_lora,
        tiny_judges,
        tiny_sd15,
        write_peft,
    )

    base_folder = tmp_path / "base"
    tiny_sd15(tokenizer_dir=tmp_path / "tok").save_pretrained(base_folder, safe_serialization=True)
    style_unet, _ = random_lora(tiny_sd15(), rank=4, alpha=2.0, unet_modules=STYLE_UNET, seed=1)
    style = write_peft(tmp_path / "style", style_unet, {}, rank=4, alpha=2.0)
    lcm_unet, _ = random_lora(tiny_sd15(), rank=8, alpha=8.0, unet_modules=LCM_UNET, seed=2)
    lcm = write_peft(tmp_path / "lcm", lcm_unet, {}, rank=8, alpha=8.0).parent
    base = BaseConfig(reference=str(base_folder), family="sd15", resolution=16, guidance_scale=1.0)
    params = Params(bases={"tiny": base}, merge=MergeConfig(
        weights=[(1.0, 1.0)], samples_per_prompt=1, reference_steps=2, save_fused="none",
        min_style_retention=-1.0, min_adherence=0.5))
    out = tmp_path / "runs" / "merge"

    def merge():
        return stage.run_merge(params.merge, params.evaluate, base=fingerprint_base("tiny", base), lcm_folder=lcm,
                               style_file=style, output=out, judges=tiny_judges(), prompts=["a", "b"],
                               resolved_yaml=params.to_yaml(), params_digest=params.digest())

    # 1. A complete run: every file 0644 under umask 022, the recorded paths name the final folder.
    done = merge()
    weights = sorted((out / "merged-1_1").glob("*.safetensors"))
    assert len(weights) == 2 and {oct(p.stat().st_mode & 0o777) for p in weights} == {"0o644"}
    assert done.doc["files"]["merged-1_1"]["diffusers"] == str(out / "merged-1_1" / weights[1].name)
    assert json.loads((out / "metrics.json").read_text())["files"] == done.doc["files"]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # 2. The disk fills while the report is written: the previous run's folder stays as it was.
    def full_disk(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stage, "write_merge_report", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge()
    assert entries(out.parent) == ["merge"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
