"""The encode runner: VAE in the configured dtype, shards keyed by the float32 fingerprint."""

from __future__ import annotations

import json

from components.config import EncodeConfig, parse_params
from components.data.shards import read_index
from components.models.base_model import fingerprint_base
from components.stages.encode import run_encode
from components.storage.storage import Storage
from tests.test_encode import RES, tiny_vae, world  # noqa: F401 - the module fixture


def test_run_encode_uses_the_configured_dtype_and_the_base_fingerprint(world, tmp_path):  # noqa: F811
    import shutil

    from components.models.base_model import load_vae

    root = tmp_path / "root"
    shutil.copytree(world["storage"].url("curated"), root / "curated")
    world["vae"].save_pretrained(tmp_path / "base" / "vae")
    base = parse_params({"bases": {"b": {"reference": str(tmp_path / "base"), "family": "sd15",
                                         "resolution": RES}}}).bases["b"]
    reports = []
    out = run_encode(EncodeConfig(dtype="bfloat16", workers=1, batch_size=8, shard_size=16),
                     base=fingerprint_base("b", base, vae_only=True),
                     storage=Storage(str(root)), manifest_rel="curated/manifest.parquet",
                     source=world["source"], progress=reports.append)
    fp32_fingerprint = load_vae(tmp_path / "base")[1]
    assert out.vae_fingerprint == fp32_fingerprint and f"/{fp32_fingerprint}/" in out.index
    index = read_index(Storage(str(root)), out.index, vae_fingerprint=fp32_fingerprint, resolution=RES)
    assert index["count"] == out.samples > 0 and not out.reused
    pointer = json.loads((root / out.pointer).read_text())
    assert pointer["params"]["encode"]["dtype"] == "bfloat16" and pointer["index"] == out.index
    assert reports[0].step == 0 and reports[-1].step == reports[-1].total and reports[-1].stage == "encode"
