"""One output layout (components/stages/keys.py, inputs.py): the CLI and the flows use the same keyed folders.

Every stage output lives at `storage.root/stages/STAGE/[BASE/]KEY`. The flows get a key from
what the previous task returned; the CLI recomputes it from what is stored. These tests check
that both roads reach the same folder for every stage, and that a stage one of them stored is
reused by the other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import parse_params
from components.lora.formats import LORA_WEIGHT_NAME
from components.models.base_model import ResolvedBase
from components.stages.inputs import (
    curate_rel,
    curated_manifest,
    distill_rel,
    distilled_lora,
    evaluation_rel,
    lora_sha256,
    merge_rel,
    stored_sha256,
)
from components.stages.keys import (
    curate_key,
    distill_key,
    encode_marker,
    evaluate_key,
    merge_key,
    output_rel,
)
from components.storage.folder_sync import push_folder, work_dir
from components.storage.storage import Storage

REPO = Path(__file__).resolve().parents[1]
FPS = {"unet": "u" * 64, "vae": "v" * 64, "text_encoder": "t" * 64}  # fingerprints as fingerprint_base returns them


def test_stage_keys_import_no_prefect():
    code = ("import sys, components.stages.keys, components.stages.inputs; "
            "sys.exit('prefect' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_cli_and_flow_compute_the_same_folder_for_every_stage(tmp_path):
    """curate, encode, distill, evaluate, merge: the flow's key (from task results) == the CLI's (from storage)."""
    from prefect.logging import disable_run_logger

    from tasks.curate import curate_manifest, fingerprint_source
    from tasks.distill import distill_lora

    source = tmp_path / "source"
    source.mkdir()
    (source / "meta.parquet").write_bytes(b"metadata")
    (source / "00000.tar").write_bytes(b"shard")
    cfg = parse_params({"storage": {"root": str(tmp_path / "root")}, "curate": {"source": str(source)},
                        "bases": {"toy": {"reference": "data/toy/base", "family": "sd15", "resolution": 32}}})
    storage, base = Storage.from_config(cfg.storage), cfg.bases["toy"]
    resolved = ResolvedBase(name="toy", config=base, fingerprints=FPS)
    with disable_run_logger():
        # 1. Curate: the flow keys the source digest the fingerprint task returns.
        key = curate_key(cfg, fingerprint_source.fn(cfg), base.resolution)  # as curate_flow does
        assert curate_rel(cfg, base.resolution) == output_rel("curate", key)
        folder = output_rel("curate", key)
        storage.write_bytes(f"{folder}/manifest.parquet", b"manifest")
        storage.write_text(f"{folder}/summary.json", json.dumps(
            {"rows_in": 3, "kept": 2, "rejected": {"low_aesthetic": 1},
             "manifest_hash": stored_sha256(storage, f"{folder}/manifest.parquet")}))
        curated = curate_manifest.fn(cfg, base.resolution, key)  # a stored curation is reused, not redone
        assert curated["reused"] and curated["manifest"] == curated_manifest(cfg, storage, base.resolution)

        # 2. Encode: content-addressed shards; the base's pointer names the index (what `lcmlora encode` writes).
        index = encode_marker(cfg, base, curated["manifest_hash"], FPS)
        storage.write_text(index, json.dumps({"count": 2}))
        storage.write_text("encoded/toy.json", json.dumps({"index": index}))

        # 3. Distill: the flow keys the index hash run_encode returns; the CLI follows the pointer.
        flow_distill = output_rel("distill", distill_key(cfg, "toy", base, FPS, stored_sha256(storage, index)), "toy")
        assert distill_rel(cfg, storage, resolved) == (flow_distill, index)
        lora = work_dir(storage, flow_distill)
        lora.mkdir(parents=True)
        _tiny_safetensors(lora / LORA_WEIGHT_NAME, 1.0)
        (lora / "metrics.json").write_text(json.dumps({"distill": {"steps": 1}}))
        push_folder(storage, lora, flow_distill)  # as `lcmlora distill` stores it
        distilled = distill_lora.fn(cfg, resolved, index, flow_distill.rsplit("/", 1)[-1])  # reused, not trained
        assert distilled["output"] == distilled_lora(cfg, storage, resolved) == flow_distill

    # 4. Evaluate and merge: keyed by the weights hash the distill task returns.
    weights = distilled["weights_sha256"]
    assert evaluation_rel(cfg, resolved, lora) == output_rel(
        "evaluate", evaluate_key(cfg, "toy", base, FPS, weights), "toy")
    style = tmp_path / "style" / LORA_WEIGHT_NAME
    style.parent.mkdir()
    _tiny_safetensors(style, 2.0)
    assert merge_rel(cfg, resolved, lora, style) == merge_rel(cfg, resolved, lora, style.parent) == \
        output_rel("merge", merge_key(cfg, "toy", base, FPS, weights, lora_sha256(style)), "toy")
    # another params section: another folder
    other = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"steps": [1]})})
    assert evaluation_rel(other, resolved, lora) != evaluation_rel(cfg, resolved, lora)


def test_missing_inputs_say_which_command_to_run(tmp_path):
    from components.stages.inputs import MissingInput

    cfg = parse_params({"storage": {"root": str(tmp_path)},
                        "bases": {"toy": {"reference": "data/toy/base", "family": "sd15", "resolution": 32}}})
    storage = Storage.from_config(cfg.storage)
    toy = ResolvedBase(name="toy", config=cfg.bases["toy"], fingerprints=FPS)
    with pytest.raises(MissingInput, match=r"encoded/toy.json: no encode pointer.*lcmlora encode --base toy"):
        distill_rel(cfg, storage, toy)
    storage.write_text("encoded/toy.json", json.dumps({"index": "latents/x/index.json"}))
    storage.write_text("latents/x/index.json", "{}")
    with pytest.raises(MissingInput, match=r"stages/distill/toy/distill-.*lcmlora distill --base toy"):
        distilled_lora(cfg, storage, toy)


@pytest.mark.integration
def test_cli_curate_then_the_flow_reuse_one_folder(tmp_path):
    """`lcmlora curate`, then the nightly's curate flow with the same params: same folder, nothing curated again."""
    from prefect.testing.utilities import prefect_test_harness
    from typer.testing import CliRunner

    from components.config import load_params
    from components.toy.source import write_toy_source
    from flows.cli import app
    from flows.stages import curate_flow

    write_toy_source(tmp_path / "source", seed=0)
    overrides = [f"curate.source={tmp_path / 'source'}", f"storage.root={tmp_path / 'root'}"]
    cli = CliRunner().invoke(app, ["curate", "--params", str(REPO / "params.yaml"),
                                   *[a for o in overrides for a in ("--set", o)]])
    assert cli.exit_code == 0, cli.output
    cfg = load_params(REPO / "params.yaml", overrides)
    folder = curate_rel(cfg, cfg.bases["toy"].resolution)
    manifest = tmp_path / "root" / folder / "manifest.parquet"
    written = manifest.stat().st_mtime_ns
    with prefect_test_harness(server_startup_timeout=120):
        flowed = curate_flow(cfg, min_side=cfg.bases["toy"].resolution)
    assert flowed["output"] == folder and flowed["reused"]
    assert manifest.stat().st_mtime_ns == written  # the flow did not curate again


def _tiny_safetensors(path: Path, value: float) -> None:
    """A readable .safetensors file (the LoRA readers check the header before hashing)."""
    import torch
    from safetensors.torch import save_file

    save_file({"unet.w.lora_A.weight": torch.full((1, 1), value)}, str(path))
