"""components/stages/merge.py: the merge stage runner on a tiny saved base (about 30 s on CPU).

The runner takes its own sections and explicit inputs (base, LoRAs, judges, prompts, resolved
params), loads the base from disk twice, and returns what it wrote: contract-4 merged folders
carrying the resolved params and lineage it was given, the report files, and progress on the
one channel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.config import BaseConfig, EvaluateConfig, MergeConfig, Params
from components.lineage import portable_yaml
from components.models.base_model import fingerprint_base
from components.stages.merge import MergeOutput, run_merge
from tests.tiny_merge_pipelines import (
    LCM_UNET,
    STYLE_UNET,
    random_lora,
    tiny_judges,
    tiny_sd15,
    write_peft,
)


def test_run_merge_writes_contract4_folders_and_reports_progress(tmp_path: Path) -> None:
    # 1. A tiny base saved as a diffusers folder, a style LoRA and an LCM-LoRA for it.
    base_folder = tmp_path / "base"
    tiny_sd15(tokenizer_dir=tmp_path / "tok").save_pretrained(base_folder, safe_serialization=True)
    style_unet, style_te = random_lora(tiny_sd15(), rank=4, alpha=2.0, unet_modules=STYLE_UNET,
                                       te_modules=["q_proj"], seed=1)
    style = write_peft(tmp_path / "style", style_unet, style_te, rank=4, alpha=2.0)
    lcm_unet, _ = random_lora(tiny_sd15(), rank=8, alpha=8.0, unet_modules=LCM_UNET, seed=2)
    lcm = write_peft(tmp_path / "lcm", lcm_unet, {}, rank=8, alpha=8.0).parent
    base = BaseConfig(reference=str(base_folder), family="sd15", resolution=16, guidance_scale=1.0)
    params = Params(bases={"tiny": base}, merge=MergeConfig(
        weights=[(0.8, 1.0), (1.0, 1.0)], samples_per_prompt=1, reference_steps=2, save_fused="none",
        min_style_retention=-1.0, min_adherence=0.5))  # FD-based retention of random LoRAs is near 0
    reports = []
    # 2. The runner, with only its sections and explicit inputs.
    out = run_merge(params.merge, params.evaluate, base=fingerprint_base("tiny", base), lcm_folder=lcm, style_file=style,
                    output=tmp_path / "out", judges=tiny_judges(), prompts=["a", "b"],
                    resolved_yaml=params.to_yaml(), params_digest=params.digest(), progress=reports.append)
    # 3. What it returns is what it wrote.
    assert isinstance(out, MergeOutput) and out.output == tmp_path / "out"
    assert out.passed, out.selection["violations"]
    assert out.doc["base"] == "tiny" and out.doc["seconds"] > 0
    assert out.best_folder is not None and out.best_folder.name in ("merged-0.8_1", "merged-1_1")
    assert {p.name for p in out.paths.values()} == {"report.md", "metrics.json", "grid.png"}
    assert json.loads(out.paths["metrics.json"].read_text())["selection"] == out.selection
    assert [(r.stage, r.step, r.total) for r in reports] == [("merge", i, 9) for i in range(1, 10)]
    for tag in ("0.8_1", "1_1"):
        folder = out.output / f"merged-{tag}"
        resolved = (folder / "params.resolved.yaml").read_text()  # local paths outside the repository by name
        assert resolved == portable_yaml(params.to_yaml()) and f"reference: local:{base_folder.name}" in resolved
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["params_digest"] == params.digest()
        assert lineage["base"] == {"name": "tiny", "reference": f"local:{base_folder.name}",
                                   "fingerprint": out.doc["base_fingerprint"]}
        card = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
        assert "base_model" not in card and card["pipeline_tag"] == "text-to-image"  # a local base: no hub id
        gate = json.loads((folder / "metrics.json").read_text())["gate"]
        assert gate["passed"] and gate["selected"] == (folder == out.best_folder)
    assert not list(out.output.glob("fused-*")), "save_fused=none writes no fused checkpoint"


def test_evaluate_section_device_is_used(tmp_path: Path) -> None:
    """The runner reads only `device` from the evaluate section: a bad device fails before sampling."""
    base_folder = tmp_path / "base"
    tiny_sd15(tokenizer_dir=tmp_path / "tok").save_pretrained(base_folder, safe_serialization=True)
    unet_sd, _ = random_lora(tiny_sd15(), rank=2, alpha=2.0, unet_modules=["to_q"], seed=1)
    lora = write_peft(tmp_path / "lora", unet_sd, {}, rank=2, alpha=2.0)
    base = BaseConfig(reference=str(base_folder), family="sd15", resolution=16, guidance_scale=1.0)
    with pytest.raises(RuntimeError, match="no_such_device|device"):
        run_merge(MergeConfig(), EvaluateConfig(device="no_such_device"), base=fingerprint_base("tiny", base),
                  lcm_folder=lora.parent, style_file=lora, output=tmp_path / "out", judges=tiny_judges(),
                  prompts=["a"], resolved_yaml="", params_digest="0" * 64)
    assert not (tmp_path / "out").exists()
