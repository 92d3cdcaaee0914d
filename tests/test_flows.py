"""The nightly flow on the toy world under `prefect_test_harness` (short settings, tmp roots).

One storage root is shared by the runs, in order, so the second run can find the first run's
cache: (1) two bases, one of them broken: the toy base goes through every stage and is
published while the broken one fails, and the flow ends failed naming it; (2) nothing
changed: every stage is skipped, nothing is trained or published again, and the flow says
so; (3) a gate that cannot pass: the flow fails on the gate and the (fresh) registry stays
empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.toy_short import NEVER_MET_PSNR, prefect_harness, toy_workdir, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["curate", "encode", "distill", "evaluate", "merge", "publish"]


harness = pytest.fixture(scope="module")(prefect_harness)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_workdir(tmp_path_factory, "nightly")


def _run(params: Path):
    from flows.nightly import nightly

    state = nightly(str(params), [], return_state=True)
    return state, state.result(raise_on_failure=False)


def _registry(params: Path):
    from components.config import load_params
    from components.registry.registry import Registry

    return Registry.from_params(load_params(params))


def test_nightly_runs_every_stage_and_a_broken_base_does_not_stop_it(harness, workdir: Path) -> None:
    from flows.nightly import BasesFailed

    broken = workdir / "broken.ckpt"
    broken.write_bytes(b"not loaded: pickle checkpoints are refused by name")
    params = write_params(workdir, [f"bases.broken.reference={broken}", "bases.broken.family=sd15",
                                    "bases.broken.resolution=32", "bases.broken.judges=toy"],  # passes preflight:
                          name="two-bases.yaml")  # its checkpoint fails at run time
    state, result = _run(params)

    assert state.is_failed()
    assert isinstance(result, BasesFailed) and "broken" in str(result) and "toy" not in str(result).split(":")[-1]
    toy, bad = result.summary["bases"]["toy"], result.summary["bases"]["broken"]
    assert bad["status"] == "failed" and "PickleRefused" in bad["error"]
    assert toy["status"] == "completed"
    assert [s["stage"] for s in toy["stages"]] == STAGES
    assert not any(s["skipped"] for s in toy["stages"] if s["stage"] != "merge")
    published = toy["published"]
    assert published["reference"] == f"toy-lcm-lora:{published['version']}"
    manifest = _registry(params).show("toy-lcm-lora@candidate")
    assert manifest.version == published["version"] and manifest.gate["passed"] is True
    assert (workdir / "source").is_dir(), "the toy source is written in-flow when missing"


def test_second_nightly_skips_everything_and_says_so(harness, workdir: Path) -> None:
    params = write_params(workdir, name="toy-only.yaml")
    before = _registry(params).list("toy-lcm-lora")
    state, summary = _run(params)

    assert state.is_completed(), summary
    toy = summary["bases"]["toy"]
    assert all(s["skipped"] for s in toy["stages"]), toy["stages"]
    assert summary["verdict"].startswith("Nothing changed since the last run") and "no training" in summary["verdict"]
    assert _registry(params).list("toy-lcm-lora") == before, "an unchanged LoRA is not published again"


def test_flow_runs_are_named_after_base_and_stage_and_publish_logs_the_pull(harness, workdir: Path) -> None:
    """The runs above and a new-base run (served from the cache) read back from the test server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.new_base import new_base

    state = new_base("toy", params_file=str(write_params(workdir, name="toy-only.yaml")), return_state=True)
    assert state.is_completed(), state.result(raise_on_failure=False)
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        by_id = {r.id: r for r in runs}
        parent_of = {r.id: client.read_task_run(r.parent_task_run_id).flow_run_id
                     for r in runs if r.parent_task_run_id}
        publish = [r for r in runs if r.name == "publish-toy"]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in publish])), limit=200)

    def names_under(parent_name: str) -> set[str]:
        return {r.name for r in runs if r.id in parent_of and by_id[parent_of[r.id]].name == parent_name}

    assert "base-toy" in names_under("new-base-toy"), "the new-base subflow is named after its base"
    assert {"base-toy", "base-broken"} <= {r.name for r in runs if r.id in parent_of}, "the nightly's base subflows"
    stages = names_under("base-toy")
    assert {"encode-toy", "distill-toy", "evaluate-toy", "merge-toy", "publish-toy"} <= stages, stages
    assert any(name.startswith("curate-") for name in stages), stages
    messages = [log.message for log in logs]
    assert any("published toy-lcm-lora:" in m and "pull it with: lcmlora registry pull toy-lcm-lora@candidate"
               in m for m in messages), messages


def test_both_objectives_share_the_shards_and_each_is_gated_and_published_under_its_own_name(
        harness, workdir: Path) -> None:
    """bases.toy.objectives [lcm, pcm] after the runs above: data and the LCM-LoRA come from the
    cache; the PCM-LoRA is distilled on the same shards, evaluated on its own rows and published."""
    params = write_params(workdir, ["bases.toy.objectives=[lcm,pcm]"], name="objectives.yaml")
    before = _registry(params).list("toy-lcm-lora")
    state, summary = _run(params)

    assert state.is_completed(), summary
    toy = summary["bases"]["toy"]
    rows = {s["stage"]: s for s in toy["stages"]}
    assert list(rows) == ["curate", "encode", "distill lcm", "evaluate lcm", "merge", "publish lcm",
                          "distill pcm", "evaluate pcm", "publish pcm"], list(rows)
    assert rows["encode"]["skipped"] and rows["distill lcm"]["skipped"], "the LCM run and its data are reused"
    assert not rows["distill pcm"]["skipped"] and not rows["publish pcm"]["skipped"]
    assert _registry(params).list("toy-lcm-lora") == before, "the unchanged LCM-LoRA is not published again"
    pcm = _registry(params).show("toy-pcm-lora@candidate")
    assert pcm.gate["passed"] is True
    evaluation = workdir / "artifacts" / toy["objectives"]["pcm"]["evaluation"] / "metrics.json"
    labels = [m["label"] for m in json.loads(evaluation.read_text())["methods"]]
    assert labels[:2] == ["pcm-1", "pcm-4"], labels


def test_a_base_without_data_distills_on_its_own_samples(harness, workdir: Path) -> None:
    """bases.toy.data synthesize (issue 28): the toy samples the curated captions, that source is curated and
    encoded, and the LoRA is distilled on it and published."""
    import pyarrow.parquet as pq

    from components.stages.keys import output_rel

    params = write_params(workdir, ["bases.toy.data=synthesize", "synthesize.count=32", "synthesize.steps=4",
                                    "synthesize.batch_size=16", "curate.min_rows=16",
                                    f"registry.root={workdir / 'registry-synthesize'}"], name="synthesize.yaml")
    state, summary = _run(params)

    assert state.is_completed(), summary
    toy = summary["bases"]["toy"]
    rows = {s["stage"]: s for s in toy["stages"]}
    assert list(rows)[:4] == ["curate", "synthesize", "curate synthesized", "encode"], list(rows)
    assert not any(rows[s]["skipped"] for s in ("synthesize", "curate synthesized", "encode", "distill"))
    manifest = workdir / "artifacts" / output_rel("curate", rows["curate synthesized"]["key"]) / "manifest.parquet"
    assert pq.read_metadata(manifest).num_rows == 32, "the distillation set is the 32 samples"
    assert _registry(params).show("toy-lcm-lora@candidate").gate["passed"] is True


def test_failing_gate_fails_the_flow_and_publishes_nothing(harness, workdir: Path) -> None:
    from flows.nightly import BasesFailed

    params = write_params(workdir, [f"evaluate.lcm1_psnr_min={NEVER_MET_PSNR}",
                                    f"registry.root={workdir / 'registry-gate'}"], name="gate.yaml")
    state, result = _run(params)

    assert state.is_failed()
    assert isinstance(result, BasesFailed)
    error = result.summary["bases"]["toy"]["error"]
    assert error.startswith("GateFailed") and "nothing published" in error, error
    assert "lcm-1 psnr" in error, "the violation is listed"
    assert _registry(params).list() == []
