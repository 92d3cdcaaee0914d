"""infra/: the files users deploy from parse, and every template placeholder is declared."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def test_prefect_yaml_deployments() -> None:
    doc = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in doc["deployments"]}
    assert set(deployments) == {"nightly", "base-pipeline", "new-base"}
    assert deployments["base-pipeline"]["concurrency_limit"] >= 1  # the fan-out's Prefect bound
    nightly, new_base = deployments["nightly"], deployments["new-base"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    trigger = new_base["triggers"][0]
    assert trigger["expect"] == ["lcmlora.base.registered"]
    assert trigger["parameters"]["reference"] == "{{ event.payload.reference }}"
    for d in deployments.values():  # entrypoints resolve from the repository root
        module, _, name = d["entrypoint"].partition(":")
        assert (REPO / module).is_file() and f"def {name.replace('-', '_')}(" in (REPO / module).read_text()


def test_k8s_gpu_job_template_declares_every_placeholder() -> None:
    template = json.loads((INFRA / "k8s-gpu-job-template.json").read_text())
    used = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used == declared, f"undeclared: {used - declared}, unused: {declared - used}"
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    env_defaults = template["variables"]["properties"]["env"]["default"]
    assert not any(k.startswith("AWS_") for k in env_defaults), "credentials come from a Secret, never the template"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ storage_secret }}", "optional": True}}]


@pytest.mark.parametrize("name, processes, machines", [
    ("single-gpu.yaml", 1, 1), ("multi-gpu.yaml", 8, 1), ("multi-node.yaml", 16, 2), ("cpu-2proc.yaml", 2, 1)])
def test_accelerate_configs_load(name: str, processes: int, machines: int) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(INFRA / "accelerate" / name))
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)


def test_distill_task_launches_only_for_several_processes() -> None:
    from tasks.distill import accelerate_processes

    assert accelerate_processes(None) == 1
    assert accelerate_processes(str(INFRA / "accelerate" / "single-gpu.yaml")) == 1
    assert accelerate_processes(str(INFRA / "accelerate" / "cpu-2proc.yaml"), gpus=0) == 2
    # One process per GPU the pod sees (the Kubernetes job's `gpus`), the file's count without GPUs.
    assert accelerate_processes(str(INFRA / "accelerate" / "multi-gpu.yaml"), gpus=4) == 4
    assert accelerate_processes(str(INFRA / "accelerate" / "multi-gpu.yaml"), gpus=0) == 8
    assert accelerate_processes(str(INFRA / "accelerate" / "multi-node.yaml"), gpus=4) == 16  # set per cluster
    with pytest.raises(FileNotFoundError, match="orchestrate.accelerate_config"):
        accelerate_processes("infra/accelerate/nope.yaml")
