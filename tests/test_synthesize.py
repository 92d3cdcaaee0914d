"""The synthesize stage on a tiny random-init SD-1.5 base (32 px, 2 DPM-Solver++ steps): keyed reuse,
resume after a kill with the bytes of an uninterrupted run, per-image prompts and seeds, a fused style
model's own key, and the source it writes going through the real curate and encode stages."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import components.stages.synthesize as stage_module
from components.config import Params
from components.models.base_model import fingerprint_base
from components.stages.synthesize import synthesize_stage
from components.storage.storage import Storage
from tests.tiny_pipeline import random_lora_folder, single_thread, tiny_sd_pipeline

PROMPTS = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three", "a digit"]
COUNT, BATCH = 6, 2  # three batches (three shards)

single_thread = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("synth-base")
    pipe = tiny_sd_pipeline(tmp)
    pipe.save_pretrained(tmp / "base", safe_serialization=True)
    random_lora_folder(pipe, tmp / "style", scale=0.5)
    return tmp


def params_for(root: Path, **synthesize) -> Params:
    return Params.model_validate({
        "storage": {"root": str(root)},
        "bases": {"tiny": {"reference": "", "family": "sd15", "resolution": 32, "guidance_scale": 2.0}},
        "synthesize": {"count": COUNT, "batch_size": BATCH, "steps": 2, **synthesize},
        "curate": {"min_rows": COUNT},
    })


def resolved(base_folder: Path, params: Params):
    config = params.bases["tiny"].model_copy(update={"reference": str(base_folder / "base")})
    return fingerprint_base("tiny", config)


@pytest.fixture
def sampled(monkeypatch) -> list[int]:
    """The number of images of every sampled batch (sample_batch, counted where the stage calls it)."""
    calls: list[int] = []
    real = stage_module.sample_batch

    def counting(pipe, images, settings):
        calls.append(len(images))
        return real(pipe, images, settings)

    monkeypatch.setattr(stage_module, "sample_batch", counting)
    return calls


def folder_bytes(storage: Storage, rel: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(f"{rel}/{name}") for name in storage.ls(rel, recursive=True)}


def test_a_rerun_reuses_the_keyed_source_without_sampling(tmp_path, base_folder, sampled) -> None:
    params = params_for(tmp_path / "store")
    storage = Storage(params.storage.root)
    base = resolved(base_folder, params)
    first = synthesize_stage(params, base, storage, prompts=PROMPTS)
    assert (first.reused, first.count, first.shards, first.sampled_batches) == (False, COUNT, 3, 3)
    assert sampled == [2, 2, 2]
    assert first.source == f"stages/synthesize/tiny/{first.key}" and first.key.startswith("synthesize-")
    assert storage.exists(f"{first.source}/synthesize.json") and not storage.exists(f"{first.source}.claim.json")

    again = synthesize_stage(params, base, storage, prompts=PROMPTS)
    assert (again.reused, again.key, again.source, again.sampled_batches) == (True, first.key, first.source, 0)
    assert sampled == [2, 2, 2]  # no pipeline call the second time

    # Any setting that changes the images is another key (another folder); the count too.
    other = synthesize_stage(params_for(tmp_path / "store", count=4), base, storage, prompts=PROMPTS)
    assert other.key != first.key and not other.reused and sampled[3:] == [2, 2]


# Run in a subprocess that the test kills with SIGKILL once batch 0 is stored and batch 1 sampled.
KILLED_WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from components.stages.synthesize import synthesize_stage
from components.storage.storage import Storage
from tests.test_synthesize import PROMPTS, params_for, resolved

root, base_folder, marker = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
params = params_for(root)

def hold(p):
    if p.note.startswith("batch 1/"):
        marker.write_text("batch 0 stored")
        time.sleep(600)

synthesize_stage(params, resolved(base_folder, params), Storage(str(root)), prompts=PROMPTS, progress=hold)
"""


def test_a_killed_run_resumes_and_writes_the_bytes_of_an_uninterrupted_run(tmp_path, base_folder, sampled) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    params = params_for(tmp_path / "killed")
    storage = Storage(params.storage.root)
    base = resolved(base_folder, params)
    # 1. kill -9 between batches: batch 0 complete, its claim left behind by a dead process.
    marker = tmp_path / "held"
    repo = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(repo), str(tmp_path / "killed"),
                               str(base_folder), str(marker)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert worker.poll() is None, f"the worker ended early (exit {worker.returncode})"
            assert time.monotonic() < deadline, "the worker never reached batch 1"
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    rel = f"stages/synthesize/tiny/{next(iter(storage.ls('stages/synthesize/tiny')))}"
    rel = rel.removesuffix(".claim.json")
    assert storage.exists(f"{rel}.claim.json") and storage.exists(f"{rel}/00000.parquet")
    assert not storage.exists(f"{rel}/synthesize.json")
    # A kill mid-batch leaves whole files only (atomic writes), but maybe a tar without its metadata.
    storage.write_bytes(f"{rel}/00001.tar", b"a tar of a batch killed before its metadata")

    # 2. The rerun takes over the dead claim and samples only the two batches missing.
    notes: list[str] = []
    resumed = synthesize_stage(params, base, storage, prompts=PROMPTS, progress=lambda p: notes.append(p.note))
    assert sampled == [2, 2] and resumed.sampled_batches == 2 and not resumed.reused
    assert notes[0] == "resumed: 1 of 3 batches there" and not storage.exists(f"{rel}.claim.json")

    # 3. Byte for byte what an uninterrupted run writes.
    clean_params = params_for(tmp_path / "clean")
    clean_storage = Storage(clean_params.storage.root)
    clean = synthesize_stage(clean_params, base, clean_storage, prompts=PROMPTS)
    assert clean.key == resumed.key
    ours, theirs = folder_bytes(storage, resumed.source), folder_bytes(clean_storage, clean.source)
    assert sorted(ours) == sorted(theirs) == sorted(
        ["params.yaml", "plan.json", "synthesize.json",
         *(f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", "_stats.json"))])
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert differ == ["params.yaml"]  # storage.root differs; every file of the source is byte-identical


def test_every_image_records_its_prompt_and_seed(tmp_path, base_folder) -> None:
    params = params_for(tmp_path / "store", seed=7)
    storage = Storage(params.storage.root)
    out = synthesize_stage(params, resolved(base_folder, params), storage, prompts=PROMPTS)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out.source}/00001.parquet"))).to_pylist()
    assert [(r["key"], r["TEXT"], r["seed"], r["shard"]) for r in rows] == [
        ("000000002", PROMPTS[2], 9, "00001.tar"), ("000000003", PROMPTS[3], 10, "00001.tar")]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{out.source}/00002.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert sorted(members) == ["000000004.json", "000000004.png", "000000004.txt",
                               "000000005.json", "000000005.png", "000000005.txt"]
    assert members["000000004.txt"].decode() == PROMPTS[0]  # the prompts cycle
    meta = json.loads(members["000000005.json"])
    assert (meta["seed"], meta["caption"], meta["WIDTH"], meta["HEIGHT"]) == (12, PROMPTS[1], 32, 32)
    assert meta["synthesize"] == {"model": out.fingerprints["unet"], "scheduler": "dpmsolver++", "steps": 2,
                                  "guidance_scale": 2.0, "resolution": 32, "timestep_spacing": None}
    done = json.loads(storage.read_text(f"{out.source}/synthesize.json"))
    assert done["sampler"]["guidance_scale"] == 2.0 and done["count"] == COUNT and done["seed"] == 7


def test_a_fused_style_model_has_its_own_fingerprint_and_key(tmp_path, base_folder, sampled) -> None:
    params = params_for(tmp_path / "store", count=2)
    storage = Storage(params.storage.root)
    base = resolved(base_folder, params)
    plain = synthesize_stage(params, base, storage, prompts=PROMPTS)
    styled = synthesize_stage(params, base, storage, prompts=PROMPTS, style=base_folder / "style", style_weight=0.8)
    assert styled.fingerprints["unet"] != base.fingerprints["unet"] == plain.fingerprints["unet"]
    assert styled.fingerprints["vae"] == base.fingerprints["vae"]
    assert styled.key != plain.key and not styled.reused
    again = synthesize_stage(params, base, storage, prompts=PROMPTS, style=base_folder / "style", style_weight=0.8)
    assert again.reused and again.key == styled.key and len(sampled) == 2
    assert json.loads(storage.read_text(f"{styled.source}/plan.json"))["style"]["weight"] == 0.8


def test_an_output_folder_of_another_synthesis_is_refused(tmp_path, base_folder) -> None:
    params = params_for(tmp_path / "store", count=2)
    storage = Storage(params.storage.root)
    base = resolved(base_folder, params)
    synthesize_stage(params, base, storage, prompts=PROMPTS, output="mine")
    assert synthesize_stage(params, base, storage, prompts=PROMPTS, output="mine").reused
    with pytest.raises(FileExistsError, match="holds the synthesis synthesize-"):
        synthesize_stage(params_for(tmp_path / "store", count=2, seed=1), base, storage, prompts=PROMPTS,
                         output="mine")


def test_the_source_goes_through_curate_and_encode_and_feeds_on_its_captions(tmp_path, base_folder) -> None:
    from components.stages.curate import curate_stage
    from components.stages.encode import encode_stage

    params = params_for(tmp_path / "store")
    storage = Storage(params.storage.root)
    base = resolved(base_folder, params)
    out = synthesize_stage(params, base, storage, prompts=PROMPTS)
    # 1. The real curate stage, default filters and gate, on the written source: every row kept.
    params = params.model_copy(update={"curate": params.curate.model_copy(
        update={"source": storage.url(out.source)})})
    curated = curate_stage(params, storage, min_side=32)
    assert (curated.rows_in, curated.kept, curated.rejected) == (COUNT, COUNT, {})
    # 2. The real encode stage on its manifest.
    encoded = encode_stage(params, resolved(base_folder, params), storage)
    assert (encoded.samples, encoded.rejected) == (COUNT, 0)
    # 3. Without prompts the stage samples the curated manifest's captions, in its order.
    captions = stage_module.synthesis_prompts(params, storage, base)
    assert captions == [PROMPTS[i % len(PROMPTS)] for i in range(COUNT)]
    again = synthesize_stage(params, base, storage)
    assert again.reused and again.key == out.key  # the same prompts, image for image: the same source


def test_the_command_prints_its_resolved_config_and_checks_the_section(lcmlora_cli) -> None:
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    run = CliRunner().invoke(app, ["synthesize", "--dry-run", "--set", "synthesize.count=12", "--style", "my/style",
                                   "--style-weight", "0.5"])
    assert run.exit_code == 0, run.output
    printed = yaml.safe_load(run.stdout)["synthesize"]
    assert (printed["count"], printed["style"], printed["style_weight"], printed["steps"]) == (12, "my/style", 0.5, 25)
    assert printed["scheduler"] == "dpmsolver++" and printed["guidance_scale"] is None
    code, err = lcmlora_cli("synthesize", "--dry-run", "--set", "synthesize.counts=12")
    assert code == 2 and "synthesize.counts: unknown key" in err
