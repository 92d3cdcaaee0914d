"""The Kubernetes GPU pool accepted for real: a Prefect server takes the job template, the deployments.

A Prefect server (127.0.0.1, temporary PREFECT_HOME, stopped also on failure) creates the
`lcmlora-gpu` pool with `prefect work-pool create --type kubernetes --base-job-template
infra/k8s-gpu-job-template.json`, `prefect deploy --all --prefect-file infra/prefect-k8s.yaml`
deploys nightly-gpu and base-pipeline-gpu to it, and the Job manifest rendered from what the
server stored (pool defaults + deployment job variables + what a worker fills in) is validated
against the `kubernetes` client's V1Job model: it deserializes with client-side validation
and serializes back to the same manifest (a field the API does not know would be dropped).
No cluster is reachable here: the worker's own submission is not exercised.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_deployments import PrefectStack, _free_port, _stop, _wait_healthy

pytestmark = [pytest.mark.integration]

POOL = "lcmlora-gpu"


@pytest.fixture(scope="module")
def gpu_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    pytest.importorskip("kubernetes", reason="the kubernetes client validates the manifest (dev extra)")
    tmp = tmp_path_factory.mktemp("k8s")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"})
    server = None
    try:
        with open(tmp / "server.log", "wb") as log:
            server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                       "127.0.0.1", "--port", str(port), "--no-ui"], cwd=tmp, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(api_url, server, tmp / "server.log")
        stack = PrefectStack(api_url, env, tmp, tmp / "unused.yaml", tmp)
        stack.cli("work-pool", "create", POOL, "--type", "kubernetes",
                  "--base-job-template", "infra/k8s-gpu-job-template.json")
        stack.cli("deploy", "--all", "--prefect-file", "infra/prefect-k8s.yaml", timeout=180)
        yield stack
    finally:
        _stop(server)


def _read(stack: PrefectStack, monkeypatch: pytest.MonkeyPatch, deployment: str):
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        return client.read_work_pool(POOL), client.read_deployment_by_name(deployment)


def render_job(base_job_template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest a Kubernetes worker submits: template defaults, the deployment's variables,
    what the worker fills in (name, command, env, labels), env as a list and args split as it does."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in base_job_template["variables"]["properties"].items() if "default" in v}
    values = {**defaults, **job_variables, "name": "base-pipeline-gpu-abc12", "command": "prefect flow-run execute"}
    values["env"] = {**values.get("env", {}), "PREFECT_API_URL": "http://prefect:4200/api",
                     "PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000"}
    values["labels"] = {**values.get("labels", {}), "prefect.io/flow-run-id": "00000000-0000-0000-0000-000000000000"}
    config = apply_values(base_job_template["job_configuration"], values)
    manifest = config["job_manifest"]
    for container in manifest["spec"]["template"]["spec"]["containers"]:
        container["env"] = [{"name": k, "value": str(v)} for k, v in container["env"].items()]
        container["args"] = shlex.split(container["args"])
        for kind in ("requests", "limits"):
            container["resources"][kind] = {k: str(v) for k, v in container["resources"][kind].items()}
    return manifest


def _validated(manifest: dict[str, Any]) -> dict[str, Any]:
    """V1Job from the manifest (client-side validation on), serialized back."""
    from kubernetes.client import ApiClient, Configuration

    config = Configuration()
    config.client_side_validation = True
    api = ApiClient(configuration=config)
    job = api._ApiClient__deserialize(manifest, "V1Job")  # the client's own dict -> model path
    return api.sanitize_for_serialization(job)


@pytest.mark.parametrize("deployment, gpus", [("base-pipeline/base-pipeline-gpu", "8"), ("nightly/nightly-gpu", "0")])
def test_rendered_job_is_a_valid_kubernetes_job(gpu_pool: PrefectStack, monkeypatch: pytest.MonkeyPatch,
                                                deployment: str, gpus: str) -> None:
    pool, dep = _read(gpu_pool, monkeypatch, deployment)
    assert pool.type == "kubernetes" and dep.work_pool_name == POOL
    manifest = render_job(pool.base_job_template, dep.job_variables)
    assert _validated(manifest) == manifest, "a field of the manifest is unknown to the Kubernetes API"
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert manifest["spec"]["parallelism"] == 1 and pod["restartPolicy"] == "Never"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert not any(e["name"].startswith("AWS_") for e in container["env"]), "credentials only from the Secret"


def test_a_wrong_field_is_caught(gpu_pool: PrefectStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is real: the template's old mistake (parallelism in the pod spec) is refused."""
    pool, dep = _read(gpu_pool, monkeypatch, "base-pipeline/base-pipeline-gpu")
    manifest = render_job(pool.base_job_template, dep.job_variables)
    manifest["spec"]["template"]["spec"]["parallelism"] = 1
    assert _validated(manifest) != manifest
    del manifest["spec"]["template"]["spec"]["parallelism"]
    del manifest["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        _validated(manifest)
