"""The evaluate task publishes the report as Prefect artifacts (markdown + table) of its flow run."""

from __future__ import annotations

import pytest

from tasks.artifacts import artifact_key
from tasks.evaluate import publish_report_artifacts
from tests.test_report import synthetic_doc


def test_artifact_keys_are_prefect_safe():
    assert artifact_key("evaluate-report", "SD_1.5 fine tune") == "evaluate-report-sd-1-5-fine-tune"


@pytest.mark.integration
def test_report_artifacts_are_published_in_a_flow_run():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    doc = synthetic_doc()

    @flow
    def publish() -> None:
        publish_report_artifacts(doc, "# LCM-LoRA evaluation: toy\n", "toy")

    with prefect_test_harness(server_startup_timeout=120):  # a loaded 2-core machine needs more than 30 s
        publish()
        with get_client(sync_client=True) as client:
            found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["evaluate-report-toy", "evaluate-metrics-toy"])))}
    assert found["evaluate-report-toy"].type == "markdown"
    assert found["evaluate-report-toy"].data.startswith("# LCM-LoRA evaluation: toy")
    assert "FAILED (1 violations)" in found["evaluate-report-toy"].description
    table = found["evaluate-metrics-toy"]
    assert table.type == "table" and "lcm-1" in str(table.data) and "dpmpp-50" in str(table.data)
