"""merge.fallback: where the training-free merge loses the style, the style variant is distilled for the style model.

The nightly on the toy (short settings, `prefect_test_harness`), on one storage root, in order:
(1) a style that merges (merge.min_style_retention 0): the merge's variant is published and no
fallback runs; (2) the same style with a retention no merge meets: the merge picks nothing, the
style model (base + style fused) gets its own LCM-LoRA on its own samples, evaluated by the same
judges, and that is published as the style variant, its card and lineage naming base and style LoRA;
(3) `merge.fallback: none`: no variant at all. The style-distill stage's report puts its row beside
the merged rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.toy_short import prefect_harness, toy_workdir, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANT = "toy-lcm-lora-style-lora"
# the fallback, short: 16 own samples at 4 DPM-Solver++ steps (curation keeps them all)
FALLBACK = ["synthesize.count=16", "synthesize.steps=4", "curate.min_rows=16"]
LOST = ["merge.min_style_retention=1000"]  # no (l1, l2) keeps this much style


harness = pytest.fixture(scope="module")(prefect_harness)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_workdir(tmp_path_factory, "fallback")


def _run(params: Path) -> dict:
    from flows.nightly import nightly

    state = nightly(str(params), [], return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_completed(), summary
    return summary["bases"]["toy"]


def _registry(params: Path):
    from components.config import load_params
    from components.registry.registry import Registry

    return Registry.from_params(load_params(params))


def test_a_style_that_merges_keeps_the_merge_variant_and_runs_no_fallback(harness, workdir: Path) -> None:
    params = write_params(workdir, FALLBACK, name="merges.yaml")
    toy = _run(params)

    assert [s["stage"] for s in toy["stages"]] == ["curate", "encode", "distill", "evaluate", "merge", "publish"]
    (variant,) = toy["published"]["variants"]
    assert variant["name"] == VARIANT and "method" not in variant
    manifest = _registry(params).show(f"{VARIANT}@candidate")
    assert manifest.gate["rule"] == "merge selection"
    assert not (workdir / "artifacts/stages/style_distill").exists()


def test_a_style_the_merge_loses_gets_a_distilled_variant(harness, workdir: Path) -> None:
    params = write_params(workdir, FALLBACK + LOST, name="lost.yaml")
    before = _registry(params).list(VARIANT)
    toy = _run(params)

    # 1. The decision: the merge ran and picked nothing; the fallback ran after it, then publish.
    rows = {s["stage"]: s for s in toy["stages"]}
    assert list(rows) == ["curate", "encode", "distill", "evaluate", "merge", "style-distill", "publish"]
    assert rows["distill"]["skipped"], "the base's own LCM-LoRA is the cached one"
    assert "no variant met the merge rule" in rows["merge"]["note"]
    assert not rows["style-distill"]["skipped"]
    # 2. Published as the style variant: a new version of the same name, gated by its evaluation.
    (variant,) = toy["published"]["variants"]
    assert variant["name"] == VARIANT and variant["method"] == "distilled"
    assert variant["version"] not in before
    manifest = _registry(params).show(f"{VARIANT}@candidate")
    assert manifest.version == variant["version"]
    assert manifest.gate["passed"] and manifest.gate["rule"] == "evaluation gate on the style model"
    assert manifest.metrics["variant"] == "distilled" and manifest.metrics["style_retention"] is not None
    # 3. Its card and lineage name the base and the style LoRA.
    pulled = workdir / "pulled"
    _registry(params).pull(f"{VARIANT}@candidate", pulled)
    front = yaml.safe_load((pulled / "README.md").read_text().split("---")[1])
    style = front["style_variant"]
    assert style["base"] == "toy" and style["style_lora"] == "style-lora" and style["method"] == "distilled"
    assert style["style_weight"] == 1.0 and style["fused_fingerprint"] != style["base_fingerprint"]
    assert "base_model" not in front, "a local base: no hub id on the card"
    lineage = json.loads((pulled / "lineage.json").read_text())
    assert lineage["stage"] == "style_distill"
    assert lineage["base"]["name"] == "toy" and lineage["base"]["fingerprint"] == style["base_fingerprint"]
    assert lineage["style"]["sha256"] == style["style_sha256"]
    assert lineage["inputs"]["fused"]["fingerprints"]["vae"] == toy["fingerprints"]["vae"], "a UNet-only style LoRA"
    assert lineage["distill"]["stage"] == "distill", "the distillation's own record is kept"
    # 4. The report: the merged rows and the distilled one side by side.
    report = (workdir / "artifacts" / rows_output(toy) / "report.md").read_text()
    assert "| merged LoRA (0.8, 1) |" in report and "| style-distilled lcm-4 |" in report
    assert "stage seconds (device)" in report
    # 5. How users run it (issue 28, item 3), from the same noise: the fused model at 2, 4 and 8 steps, and the
    #    unfused base with the style LoRA at l1 and this LoRA as two adapters at runtime.
    doc = json.loads((workdir / "artifacts" / rows_output(toy) / "metrics.json").read_text())
    uses = {row["label"]: row for row in doc["use_rows"]}
    assert list(uses) == ["style-distilled lcm-2", "style-distilled lcm-4", "style-distilled lcm-8",
                          "base + style x1 + style-distilled LoRA at runtime, lcm-4"]
    assert uses["style-distilled lcm-4"] == doc["row"]
    assert all(row["style_retention"] is not None and 0.0 <= row["adherence"] <= 1.0 for row in uses.values())
    assert len({row["fd"] for row in uses.values()}) == 4, "four different samplings"
    assert "| base + style x1 + style-distilled LoRA at runtime, lcm-4 |" in report


def rows_output(toy: dict) -> str:
    """The style-distill stage's folder, from its key in the summary."""
    key = next(s["key"] for s in toy["stages"] if s["stage"] == "style-distill")
    return f"stages/style_distill/toy/{key}"


def test_fallback_none_publishes_no_variant(harness, workdir: Path) -> None:
    params = write_params(workdir, FALLBACK + LOST + ["merge.fallback=none"], name="none.yaml")
    toy = _run(params)

    assert "style-distill" not in [s["stage"] for s in toy["stages"]]
    assert toy["published"]["variants"] == []
