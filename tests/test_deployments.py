"""infra/prefect.yaml against a real Prefect server and a real process worker.

A module fixture starts `prefect server start` and `prefect worker start` on free ports with a
temporary PREFECT_HOME, deploys with `prefect deploy --all --prefect-file infra/prefect.yaml`
from the repository root (exactly what docs/orchestration.md tells users to run), and stops
both processes at the end, also when a test fails. The deployments' default parameters are
pointed at a short-settings params file under tmp so that runs write nothing into the repo.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.toy_short import REPO, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = "lcmlora-process"
SERVER_START_S = 120.0
RUN_TIMEOUT_S = 420.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group we started, SIGKILL after a grace period."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class PrefectStack:
    api_url: str
    env: dict[str, str]
    tmp: Path
    params_file: Path
    logs: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args], cwd=REPO,
                             env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out

    def log_tail(self, name: str, n: int = 60) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _wait_healthy(api_url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    tmp = tmp_path_factory.mktemp("prefect-stack")
    logs = tmp / "logs"
    logs.mkdir()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
    })
    prefect = str(Path(sys.executable).parent / "prefect")
    server = worker = None
    try:
        with open(logs / "server.log", "wb") as log:
            server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                      cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(api_url, server, logs / "server.log")
        stack = PrefectStack(api_url, env, tmp, write_params(tmp), logs)
        stack.cli("work-pool", "create", POOL, "--type", "process")
        stack.cli("deploy", "--all", "--prefect-file", "infra/prefect.yaml", timeout=180)
        with open(logs / "worker.log", "wb") as log:
            worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--limit", "2"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield stack
    finally:
        _stop(worker)
        _stop(server)


def _client(stack: PrefectStack, monkeypatch: pytest.MonkeyPatch):
    for key, value in stack.env.items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True)


def _wait_final(client, flow_run_id, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s}s (last state {run.state})")


def test_nightly_deployment_has_its_schedule(prefect_stack: PrefectStack, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, client = _client(prefect_stack, monkeypatch)
    with settings, client:
        deployment = client.read_deployment_by_name("nightly/nightly")
        crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert crons == [("0 2 * * *", "UTC", True)]
        assert deployment.work_pool_name == POOL
        assert deployment.parameters["params_file"] == "params.yaml"
        new_base = client.read_deployment_by_name("new-base/new-base")
        assert new_base.work_pool_name == POOL
        assert not new_base.schedules


def test_new_base_deployment_publishes_a_version(prefect_stack: PrefectStack, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.deployments import run_deployment

    from components.config import load_params
    from components.registry.registry import Registry

    settings, client = _client(prefect_stack, monkeypatch)
    with settings, client:
        run = run_deployment("new-base/new-base", timeout=0, parameters={
            "reference": str(REPO / "data/toy/base"), "name": "toy-ft", "params_file": str(prefect_stack.params_file)})
        final = _wait_final(client, run.id, RUN_TIMEOUT_S)
        assert final.state.is_completed(), (f"new-base run ended {final.state}:\n"
                                            f"{prefect_stack.log_tail('worker')}")
    registry = Registry.from_params(load_params(prefect_stack.params_file))
    versions = registry.list("toy-ft-lcm-lora")
    assert versions, f"no registry version of toy-ft-lcm-lora under {registry}"
    manifest = registry.show("toy-ft-lcm-lora@candidate")
    assert manifest.gate["passed"] is True


EVENT_RUN_TIMEOUT_S = 180  # event -> trigger evaluation -> flow run; generous for a loaded 2-core machine


def test_event_starts_a_new_base_run(prefect_stack: PrefectStack, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    settings, client = _client(prefect_stack, monkeypatch)
    with settings, client:
        deployment = client.read_deployment_by_name("new-base/new-base")
        # Short settings for whatever the trigger starts: the deployment's default params file.
        client.update_deployment(deployment.id, _deployment_update(prefect_stack))
        seen = {r.id for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))}
        payload = {"reference": str(REPO / "data/toy/base"), "name": "toy-event"}
        emitted = subprocess.run([sys.executable, "-m", "flows.cli", "new-base", payload["reference"], "--name",
                                  payload["name"], "--emit"], cwd=REPO, env=prefect_stack.env, capture_output=True,
                                 text=True, timeout=120, check=False)
        assert emitted.returncode == 0 and "emitted lcmlora.base.registered" in emitted.stdout, emitted.stderr
        # The trigger is the behaviour under test: no run within the timeout is a failure, not a skip.
        deadline = time.monotonic() + EVENT_RUN_TIMEOUT_S
        new = []
        while time.monotonic() < deadline and not new:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            new = [r for r in runs if r.id not in seen]
            time.sleep(1)
        assert new, (f"the lcmlora.base.registered event started no new-base run within {EVENT_RUN_TIMEOUT_S} s; "
                     f"server log:\n{prefect_stack.log_tail('server', 30)}")
        assert new[0].parameters["reference"] == payload["reference"]
        assert new[0].parameters["name"] == "toy-event"


def _deployment_update(stack: PrefectStack):
    from prefect.client.schemas.actions import DeploymentUpdate

    return DeploymentUpdate(parameters={"reference": str(REPO / "data/toy/base"), "params_file": str(stack.params_file),
                                        "overrides": []})


ALIAS_EVENT_TIMEOUT_S = 90  # the server persists received events in batches


def test_alias_moves_reach_the_prefect_server_as_events(prefect_stack: PrefectStack, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One move by a short-lived CLI process (`registry alias set`), one in-process, both with the
    stack's API configured: the server's event store holds one `lcmlora.alias.moved` per move, with
    the payload docs/registry.md gives. (Prefect's background events worker lost the CLI's event on
    this box: the process exited before its queue drained.)"""
    import httpx

    from components.registry.registry import Registry
    from components.storage.storage import Storage
    from tests.test_registry import make_lora_folder

    root = tmp_path / "registry"
    reg = Registry(Storage(str(root)), cache_dir=tmp_path / "cache")
    digests = {v: reg.publish(make_lora_folder(tmp_path / f"v{v}", seed=v), "evt").manifest.digest for v in (1, 2)}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "alias", "set", "evt", "production", "1",
                          "--params", str(prefect_stack.params_file), "--set", f"registry.root={root}"], cwd=REPO,
                         env=prefect_stack.env, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, f"registry alias set failed:\n{out.stdout}\n{out.stderr}"
    settings, _ = _client(prefect_stack, monkeypatch)
    with settings:
        reg.alias_set("evt", "production", "2")
    body = {"filter": {"event": {"name": ["lcmlora.alias.moved"]}, "any_resource": {"id": ["lcmlora.model.evt"]},
                       "order": "ASC"}, "limit": 50}
    # Wait for the two `production` moves themselves: the publishes above move `latest` too, and
    # those events (sent whenever this process already has an API configured) arrive first, so
    # counting every event of the model stopped the wait before the production ones were stored.
    events: list[dict] = []
    moves: list[tuple] = []
    deadline = time.monotonic() + ALIAS_EVENT_TIMEOUT_S
    while time.monotonic() < deadline and len(moves) < 2:
        time.sleep(0.5)
        resp = httpx.post(f"{prefect_stack.api_url}/events/filter", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        events = resp.json()["events"]
        moves = sorted(((e["payload"]["from"], e["payload"]["to"], e["payload"]["digest"]) for e in events
                        if e["payload"]["alias"] == "production"), key=lambda move: move[1])
    assert moves == [(None, 1, digests[1]), (1, 2, digests[2])], (
        f"events on the server: {events}\nCLI stderr:\n{out.stderr[-2000:]}\n"
        f"server log:\n{prefect_stack.log_tail('server', 30)}")
    assert all(e["resource"]["prefect.resource.id"] == "lcmlora.model.evt" for e in events)
