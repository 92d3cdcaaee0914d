"""Latent pre-encoding: contract 3, rejections, resume after a kill, reuse, two ranks, embeddings."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.config import CurateConfig, parse_params
from components.data.curate import curate
from components.data.encode import EncodeError, encode_dataset
from components.data.image_prep import resize_and_crop, to_model_input
from components.data.shards import ResolutionMismatch, read_index
from components.data.text_embeddings import pipeline_text_embedder, text_encoder_fingerprint
from components.models.base_model import module_fingerprint, resolved_base
from components.stages.encode import encode_stage
from components.storage.storage import Storage
from components.toy.source import write_toy_source

REPO = Path(__file__).resolve().parents[1]
RES = 32
CLEAN, CORRUPT = 32, 4  # manifest subset used by these tests


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         norm_num_groups=4, layers_per_block=1, sample_size=RES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy source, curated, then cut to CLEAN clean rows plus CORRUPT undecodable images."""
    tmp = tmp_path_factory.mktemp("encode")
    summary = write_toy_source(tmp / "source", seed=0)
    storage = Storage(str(tmp / "root"))
    curate(Storage(str(tmp / "source")), storage, "curated", CurateConfig(), min_side=RES)
    manifest = pq.read_table(storage.url("curated/manifest.parquet")).sort_by("key")
    corrupt = summary["defect_keys"]["corrupt_image"][:CORRUPT]
    clean = [k for k in manifest["key"].to_pylist() if k not in summary["defect_keys"]["corrupt_image"]][:CLEAN]
    subset = manifest.filter(pc.is_in(manifest["key"], pa.array(clean + corrupt)))
    buf = io.BytesIO()
    pq.write_table(subset, buf)
    storage.write_bytes("curated/manifest.parquet", buf.getvalue())
    vae = tiny_vae()
    return {"tmp": tmp, "source": Storage(str(tmp / "source")), "storage": storage, "corrupt": corrupt,
            "clean": clean, "vae": vae, "fp": module_fingerprint(vae)}


def _encode(world, output: str, **kw):
    args = {"resolution": RES, "output": output, "batch_size": 8, "shard_size": 9}
    args.update(kw)
    return encode_dataset(world["storage"], "curated/manifest.parquet", world["source"], world["vae"], world["fp"],
                          **args)


def _samples(storage: Storage, index_rel: str) -> dict[str, dict[str, bytes]]:
    folder = index_rel.rsplit("/", 1)[0]
    out: dict[str, dict[str, bytes]] = {}
    for shard in read_index(storage, index_rel)["shards"]:
        with tarfile.open(storage.url(f"{folder}/{shard['name']}")) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                assert ext not in out.setdefault(key, {}), f"{m.name} twice"
                out[key][ext] = tar.extractfile(m).read()
    return out


def test_resize_and_crop_records_micro_conditioning():
    wide = Image.new("RGB", (96, 32), (255, 0, 0))
    pixels, original, crop = resize_and_crop(wide, RES)
    assert pixels.shape == (RES, RES, 3) and original == (32, 96) and crop == (0, 32)
    tall = Image.new("RGB", (20, 50))
    pixels, original, crop = resize_and_crop(tall, RES)
    assert pixels.shape == (RES, RES, 3) and original == (50, 20) and crop == (24, 0)  # 32 x 80 after resize
    x = to_model_input(np.stack([pixels]))
    assert x.shape == (1, 3, RES, RES) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_shards_and_index_follow_contract_3(world):
    storage = world["storage"]
    result = _encode(world, "latents-contract")
    assert not result.reused and result.samples == CLEAN and result.shards == 4
    assert result.index_rel == f"latents-contract/{world['fp']}/{RES}px-{read_index(storage, result.index_rel)['manifest_hash'][:16]}/index.json"
    index = read_index(storage, result.index_rel, vae_fingerprint=world["fp"], resolution=RES)
    assert index["scaling_factor"] == world["vae"].config.scaling_factor and index["latent_size"] == RES // 4
    assert index["manifest_hash"] == __import__("hashlib").sha256(storage.read_bytes("curated/manifest.parquet")).hexdigest()
    folder = result.index_rel.rsplit("/", 1)[0]
    for shard in index["shards"]:
        assert __import__("hashlib").sha256(storage.read_bytes(f"{folder}/{shard['name']}")).hexdigest() == shard["sha256"]
    samples = _samples(storage, result.index_rel)
    assert sorted(samples) == sorted(world["clean"]) and sum(s["count"] for s in index["shards"]) == CLEAN
    # One sample against a direct VAE encode of the same image (fp16 storage tolerance).
    key = world["clean"][0]
    sample = samples[key]
    latent = np.load(io.BytesIO(sample["latent.npy"]))
    assert latent.dtype == np.float16 and latent.shape == (4, RES // 4, RES // 4)
    meta = json.loads(sample["json"])
    assert meta["original_size"] == [32, 32] and meta["crop_top_left"] == [0, 0] and meta["target_size"] == [RES, RES]
    assert sample["txt"].decode().startswith("a handwritten digit ")
    with tarfile.open(world["source"].url(meta["source_shard"])) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
    pixels, _, _ = resize_and_crop(image, RES)
    with torch.no_grad():
        expected = world["vae"].encode(to_model_input(pixels[None])).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(latent.astype(np.float32), expected, atol=2e-3, rtol=1e-2)
    # Undecodable images: rejected with the decoder's error, in the index and in rejected.parquet.
    assert {r["key"] for r in index["rejected"]} == set(world["corrupt"])
    assert all(r["reason"] == "corrupt_image" and "Error" in r["detail"] for r in index["rejected"])
    rejected = pq.read_table(storage.url("curated/rejected.parquet"))
    corrupt_rows = rejected.filter(pc.equal(rejected["reason"], "corrupt_image"))
    assert sorted(corrupt_rows["key"].to_pylist()) == sorted(world["corrupt"])


def test_unchanged_rerun_does_no_work(world):
    first = _encode(world, "latents-rerun")
    folder = Path(world["storage"].url(first.index_rel)).parent
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    rejected_before = Path(world["storage"].url("curated/rejected.parquet")).stat().st_mtime_ns
    again = _encode(world, "latents-rerun")
    assert again.reused and again.encoded_shards == 0 and again.index_rel == first.index_rel
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert Path(world["storage"].url("curated/rejected.parquet")).stat().st_mtime_ns == rejected_before


KILLED_RUN = """
import glob, sys, time, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from test_encode import tiny_vae
from components.models.base_model import module_fingerprint
from components.data.encode import encode_dataset
from components.storage.storage import Storage


def hold_after_first_shard(_report):  # a barrier, not a clock: the test kills the run while it waits here
    if glob.glob({root!r} + "/latents-kill/*/*/*.tar"):  # shards land by rename: a .tar there is complete
        time.sleep(3600)


vae = tiny_vae()
encode_dataset(Storage({root!r}), "curated/manifest.parquet", Storage({source!r}), vae, module_fingerprint(vae),
               resolution={res}, output="latents-kill", batch_size=8, shard_size=9,
               progress=hold_after_first_shard)
"""


def test_killed_run_resumes_with_missing_shards_only(world):
    storage = world["storage"]
    script = KILLED_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), root=storage.url(),
                               source=world["source"].url(), res=RES)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = Path(storage.url("latents-kill"))
    # Wait on the child's own barrier condition (a complete shard: it then holds forever); the
    # deadline only guards a hang (the first shard took 33 s at load 12 on two cores).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(root.glob("*/*/*.tar")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    tars = sorted(root.glob("*/*/*.tar"))
    assert tars, output
    assert not list(root.glob("*/*/index.json"))  # killed before the index: not complete
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tars}

    result = _encode(world, "latents-kill")
    assert result.encoded_shards == 4 - len(tars) and not result.reused
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tars} == before  # finished shards untouched
    samples = _samples(storage, result.index_rel)
    assert sorted(samples) == sorted(world["clean"])  # every kept sample exactly once


def test_bad_resolution_and_wrong_index(world):
    with pytest.raises(ResolutionMismatch, match="resolution 30 is not a positive multiple of the VAE's downsample factor 4"):
        _encode(world, "latents-bad", resolution=30)
    result = _encode(world, "latents-contract")
    with pytest.raises(ResolutionMismatch, match="latents are for resolution 32, the base wants 64"):
        read_index(world["storage"], result.index_rel, resolution=64)
    with pytest.raises(ResolutionMismatch, match="not this base's VAE"):
        read_index(world["storage"], result.index_rel, vae_fingerprint="0" * 16)
    with pytest.raises(EncodeError, match="no curated manifest; run `lcmlora curate` first"):
        encode_dataset(world["storage"], "nowhere/manifest.parquet", world["source"], world["vae"], world["fp"],
                       resolution=RES)


def _params(world, root: Path, bases: dict) -> object:
    return parse_params({
        "storage": {"root": str(root)},
        "curate": {"source": world["source"].url()},
        "encode": {"batch_size": 8, "shard_size": 9},
        "bases": {n: {"reference": str(ref), "family": "sd15", "resolution": RES} for n, ref in bases.items()},
    })


def encode_base(params, name: str):
    """The encode stage as `lcmlora encode --base NAME --manifest curated/manifest.parquet` calls it."""
    base = resolved_base(params, name, vae_only=not params.encode.text_embeddings)
    return encode_stage(params, base, Storage.from_config(params.storage), manifest="curated/manifest.parquet")


def test_bases_sharing_a_vae_share_shards(world, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(Path(world["storage"].url("curated")), root / "curated")
    world["vae"].save_pretrained(tmp_path / "a" / "vae")
    shutil.copytree(tmp_path / "a" / "vae", tmp_path / "b" / "vae")  # a fine-tune with the same VAE
    tiny_vae(seed=1).save_pretrained(tmp_path / "c" / "vae")  # another VAE
    params = _params(world, root, {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"})
    first = encode_base(params, "a")
    second = encode_base(params, "b")
    third = encode_base(params, "c")
    assert not first.reused and second.reused and second.index == first.index
    assert not third.reused and third.index != first.index
    stored = json.loads((root / second.pointer).read_text())
    assert second.pointer == "encoded/b.json"
    assert stored["index"] == second.index == first.index and stored["count"] == CLEAN


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_embeddings_per_text_encoder(world, tmp_path, family):
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_pipeline

    from components.models.base_model import fingerprints_of

    pipe = tiny_pipeline(family, tmp_path)
    te_fp = text_encoder_fingerprint(fingerprints_of(pipe))
    result = _encode(world, f"latents-emb-{family}", text_embedder=pipeline_text_embedder(pipe, family),
                     text_encoder_fingerprint=te_fp, shard_size=64)
    assert result.index_rel.split("/")[-2].endswith(f"-te{te_fp}")
    index = read_index(world["storage"], result.index_rel)
    assert index["text_encoder_fingerprint"] == te_fp and index["embeddings"]
    sample = _samples(world["storage"], result.index_rel)[world["clean"][0]]
    emb = np.load(io.BytesIO(sample["emb.npy"]))
    with torch.no_grad():
        direct = pipeline_text_embedder(pipe, family)([sample["txt"].decode()])["emb"][0]
    np.testing.assert_allclose(emb.astype(np.float32), direct, atol=2e-3, rtol=1e-2)
    assert ("pooled.npy" in sample) == (family == "sdxl")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_under_accelerate_encode_disjoint_shards(world, tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank its own shards, rank 0 the index."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(Path(world["storage"].url("curated")), root / "curated")
    world["vae"].save_pretrained(tmp_path / "base" / "vae")
    params = tmp_path / "params.yaml"
    params.write_text(_params(world, root, {"tiny": tmp_path / "base"}).to_yaml())
    # On CPU-only machines accelerate's torchrun launcher (--multi_gpu) falls back to MULTI_CPU (gloo);
    # plain --cpu would start a single process.
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "flows.cli", "encode", "--base", "tiny", "--params", str(params), "--manifest", "curated/manifest.parquet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "encoded 2 new shard(s) of 4" in run.stdout  # rank 0 did half; rank 1 the rest
    pointer = json.loads((root / "encoded" / "tiny.json").read_text())
    samples = _samples(Storage(str(root)), pointer["index"])
    assert sorted(samples) == sorted(world["clean"])


def test_truncated_source_tar_is_a_counted_rejection(world, tmp_path):
    """A source tar cut short after curation: its missing members are rejected, the rest encoded."""
    import shutil

    shutil.copytree(world["source"].url(), tmp_path / "source")
    tar = tmp_path / "source" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: 40 * 1024 + 100])  # about the first dozen samples
    result = encode_dataset(world["storage"], "curated/manifest.parquet", Storage(str(tmp_path / "source")),
                            world["vae"], world["fp"], resolution=RES, output="latents-truncated",
                            batch_size=8, shard_size=9)
    missing = [r for r in result.rejected if r["reason"] == "missing_image"]
    assert missing and all("00000.tar: truncated or corrupt tar" in r["detail"] for r in missing)
    assert result.samples + len(result.rejected) == CLEAN + CORRUPT
    assert 0 < result.samples < CLEAN


def test_cli_path_with_text_embeddings_loads_the_whole_base(world, tmp_path):
    """`encode.text_embeddings: true` loads the base (load_base) and stores its prompt embeddings."""
    import shutil

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_pipeline

    tiny_pipeline("sd15", tmp_path / "build").save_pretrained(tmp_path / "base", safe_serialization=True)
    root = tmp_path / "root"
    shutil.copytree(Path(world["storage"].url("curated")), root / "curated")
    params = parse_params({
        "storage": {"root": str(root)}, "curate": {"source": world["source"].url()},
        "encode": {"batch_size": 8, "shard_size": 64, "text_embeddings": True},
        "bases": {"tiny": {"reference": str(tmp_path / "base"), "family": "sd15", "resolution": RES}},
    })
    result = encode_base(params, "tiny")
    assert result.text_encoder_fingerprint and result.index.split("/")[-2].endswith(
        f"-te{result.text_encoder_fingerprint}")
    sample = _samples(Storage(str(root)), result.index)[world["clean"][0]]
    assert np.load(io.BytesIO(sample["emb.npy"])).dtype == np.float16


def test_shards_written_to_s3(world, s3_env):
    """Source and storage on a real SeaweedFS: create-only shard writes, index last."""
    bucket = s3_env.make_bucket()
    source = s3_env.storage(bucket, "source")
    for name in sorted(Path(world["source"].url()).glob("*.tar")):
        source.put_file(name, name.name)
    remote = s3_env.storage(bucket, "artifacts")
    remote.write_bytes("curated/manifest.parquet", world["storage"].read_bytes("curated/manifest.parquet"))
    result = encode_dataset(remote, "curated/manifest.parquet", source, world["vae"], world["fp"], resolution=RES,
                            output="latents", batch_size=8, shard_size=9)
    assert result.samples == CLEAN and remote.exists(result.index_rel)
    assert encode_dataset(remote, "curated/manifest.parquet", source, world["vae"], world["fp"], resolution=RES,
                          output="latents", batch_size=8, shard_size=9).reused
    assert {r["key"] for r in pq.read_table(io.BytesIO(remote.read_bytes("curated/rejected.parquet")))
            .to_pylist()} == set(world["corrupt"])
