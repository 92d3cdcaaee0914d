"""The merge stage end to end on a tiny pipeline: every variant sampled and measured, the rule applied,
contract-4 folders, fused checkpoints and the report written (about 20 s on an idle 2-core CPU)."""

from __future__ import annotations

import json

from components.config import MergeConfig, Params
from components.evaluate.merge_eval import evaluate_merge, select_best, write_merge_report
from components.stages.merge import finalize_merged_folders
from components.toy.style_metric import toy_style_metric
from tests.tiny_merge_pipelines import (
    LCM_UNET,
    STYLE_UNET,
    random_lora,
    tiny_judges,
    tiny_sd15,
    write_peft,
)

TOY_STYLE_NAME = "toy style strength (LDA over colour statistics)"


def test_merge_stage_on_a_tiny_pipeline(tmp_path):
    pipe = tiny_sd15()
    style_unet, style_te = random_lora(pipe, rank=4, alpha=2.0, unet_modules=STYLE_UNET, te_modules=["q_proj"], seed=1)
    style = write_peft(tmp_path / "style", style_unet, style_te, rank=4, alpha=2.0)
    lcm_unet, _ = random_lora(tiny_sd15(), rank=8, alpha=8.0, unet_modules=LCM_UNET, seed=2)
    lcm = write_peft(tmp_path / "lcm", lcm_unet, {}, rank=8, alpha=8.0)
    pipe, fused = tiny_sd15(tokenizer_dir=tmp_path / "tok"), tiny_sd15(tokenizer_dir=tmp_path / "tok")
    judges = tiny_judges(toy_style_metric(count=60), TOY_STYLE_NAME)
    cfg = MergeConfig(weights=[(0.8, 1.0)], samples_per_prompt=2, reference_steps=3, svd_rank=4,
                      min_style_retention=0.0, min_adherence=0.5, save_fused="best")
    out = tmp_path / "out"
    reports = []
    result = evaluate_merge(pipe, fused, "sd15", style, lcm.parent, cfg, judges, ["a", "b"], teacher_guidance=1.0,
                            resolution=16, output=out, base_meta={"name": "tiny", "family": "sd15"},
                            progress=reports.append)
    rows = {r["label"]: r for r in result.doc["rows"]}
    for weights in ("0.8, 1",):
        assert rows[f"merged LoRA ({weights})"]["max_abs_diff_vs_adapters"] < 1e-4
        assert rows[f"fused ({weights})"]["max_abs_diff_vs_adapters"] < 1e-4
        assert rows[f"svd-4 ({weights})"]["svd_relative_error"] > 0  # rank 4 < 4 + 8: lossy
    assert rows["merged LoRA (0.8, 1)"]["rank"] == 12
    assert result.doc["selection"]["passed"]
    assert result.doc["info"]["style_metric"] == TOY_STYLE_NAME
    # one progress report per measured row, in order, on the one channel
    assert [(r.stage, r.step, r.total) for r in reports] == [("merge", i, 7) for i in range(1, 8)]
    assert [r.note for r in reports] == [row["label"] for row in result.doc["rows"]]
    assert reports[0].metrics["style_strength"] == rows["style-alone dpmpp-3"]["style_strength"]
    params = Params()
    finalize_merged_folders(result, out, params.merge, base_reference="tiny-base", started_at="2026-01-01T00:00:00Z",
                            resolved_yaml=params.to_yaml(), params_digest=params.digest())
    paths = write_merge_report(result, out)
    for name in ("merged-0.8_1",):
        folder = out / name
        for file in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md", "metrics.json",
                     "lineage.json", "params.resolved.yaml"):
            assert (folder / file).is_file(), (name, file)
        assert json.loads((folder / "metrics.json").read_text())["gate"]["passed"]
    best = result.doc["selection"]["best"]
    fused_folder = out / f"fused-{best['l1']:g}_{best['l2']:g}"
    assert (fused_folder / "model_index.json").is_file() and (out / f"{fused_folder.name}.safetensors").is_file()
    assert "| merged LoRA (0.8, 1) |" in paths["report.md"].read_text()
    assert paths["grid.png"].stat().st_size > 0
    # fused weights were taken back out: the second pipeline is the base again
    base_state = tiny_sd15().unet.state_dict()
    assert max((fused.unet.state_dict()[k] - v).abs().max().item() for k, v in base_state.items()) < 1e-5


def test_without_a_style_metric_retention_comes_from_frechet_distance(tmp_path):
    pipe = tiny_sd15()
    style_unet, _ = random_lora(pipe, rank=4, alpha=4.0, unet_modules=STYLE_UNET, seed=1)
    style = write_peft(tmp_path / "style", style_unet, {}, rank=4, alpha=4.0)
    lcm_unet, _ = random_lora(tiny_sd15(), rank=4, alpha=4.0, unet_modules=LCM_UNET, seed=2)
    lcm = write_peft(tmp_path / "lcm", lcm_unet, {}, rank=4, alpha=4.0)
    pipe, fused = tiny_sd15(tokenizer_dir=tmp_path / "tok"), tiny_sd15(tokenizer_dir=tmp_path / "tok")
    judges = tiny_judges()
    cfg = MergeConfig(weights=[(1.0, 1.0)], samples_per_prompt=3, reference_steps=2, save_fused="none",
                      min_style_retention=0.0)
    result = evaluate_merge(pipe, fused, "sd15", style, lcm, cfg, judges, ["a", "b"], teacher_guidance=1.0,
                            resolution=16, output=tmp_path / "out", base_meta={"name": "tiny"})
    rows = {r["label"]: r for r in result.doc["rows"]}
    assert rows["lcm-alone lcm-4"]["style_retention"] == 0.0
    merged = rows["merged LoRA (1, 1)"]
    assert merged["style_strength"] is None
    assert merged["style_retention"] == 1.0 - merged["fd"] / rows["lcm-alone lcm-4"]["fd"]
    assert "FD" in result.doc["info"]["style_metric"]


def test_selection_rule_fails_closed_and_lists_every_violation():
    def row(l1, retention, adherence, fd):
        return {"label": f"merged LoRA ({l1}, 1)", "variant": "merged", "l1": l1, "l2": 1.0,
                "style_retention": retention, "adherence": adherence, "fd": fd}

    rows = [row(0.6, 0.7, 0.95, 1.0), row(0.8, 0.85, 0.9, 2.0), row(1.0, 0.95, 0.7, 0.5),
            {**row(0.8, 0.99, 0.99, 0.1), "variant": "adapters"}]  # only merged rows compete
    best, violations = select_best(rows, MergeConfig(min_style_retention=0.8, min_adherence=0.8))
    assert best["l1"] == 0.8
    assert len(violations) == 2 and any("(0.6, 1)" in v and "retention" in v for v in violations)
    none, violations = select_best(rows, MergeConfig(min_style_retention=0.99, min_adherence=0.8))
    assert none is None and len(violations) == 4  # 3 retention + 1 adherence
