"""The nightly fanned out over a real Prefect server and a process work pool with two workers.

A module fixture starts `prefect server start`, creates the process pool, deploys
infra/prefect.yaml (nightly, base-pipeline, new-base) and starts two workers (one flow run
each), all on 127.0.0.1 with a temporary PREFECT_HOME, and stops them at the end, also on
failure. The nightly runs in the test process against that server with
`orchestrate.fan_out=deployment`: it submits one `base-pipeline` run per base to the pool and
waits. The bases are the toy and a toy fine-tune (a copy of data/toy/base under another name).

One nightly (a module fixture) serves both tests: one run of two bases instead of two keeps the
suite short.
1. The two base runs run at once on the two workers (both RUNNING when the toy's first
   checkpoint is on disk; their start-end spans overlap), share one encode, and both publish.
2. The toy's worker is killed (SIGKILL to its process group, as when a node goes away: the flow
   run in it dies without reporting) while that base is distilling with a checkpoint written; its heartbeats stop, the
   nightly marks the run Crashed and puts it back to AwaitingRetry, the other worker resumes it
   from the checkpoint (step > 0), and it publishes the same LoRA as the uninterrupted base
   (same weights, seed and shards: equal tensors).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deployments import POOL, PrefectStack, _free_port, _stop, _wait_healthy
from tests.toy_short import REPO, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    tmp = tmp_path_factory.mktemp("fanout")
    logs = tmp / "logs"
    logs.mkdir()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
    })
    prefect = str(Path(sys.executable).parent / "prefect")
    procs: list[subprocess.Popen] = []
    try:
        with open(logs / "server.log", "wb") as log:
            procs.append(subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], cwd=tmp,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_healthy(api_url, procs[0], logs / "server.log")
        s = PrefectStack(api_url, env, tmp, tmp / "unused.yaml", logs)
        s.cli("work-pool", "create", POOL, "--type", "process")
        s.cli("deploy", "--all", "--prefect-file", "infra/prefect.yaml", timeout=180)
        s.workers = []  # type: ignore[attr-defined]
        for i in range(WORKERS):
            with open(logs / f"worker{i}.log", "wb") as log:
                w = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--limit", "1", "--name", f"w{i}"],
                                     cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(w)
            s.workers.append(w)  # type: ignore[attr-defined]
        yield s
    finally:
        _drain_prefect_clients()  # while the server is up: nothing left to send at exit
        for p in reversed(procs):
            _stop(p)


def _drain_prefect_clients() -> None:
    """Deliver this process's queued Prefect events and logs (the in-process nightly's) now.

    Left queued, they are sent at interpreter exit to a server that is gone, and the failure is
    logged to pytest's closed stream: a traceback after the test summary.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)


def _bases(tmp: Path) -> list[str]:
    """The toy and its fine-tune: a copy of data/toy/base under another name (same VAE, same weights)."""
    ft = tmp / "toy-ft"
    if not ft.exists():
        shutil.copytree(REPO / "data/toy/base", ft)
    return [f"bases.toy-ft.reference={ft}", "bases.toy-ft.family=sd15", "bases.toy-ft.resolution=32",
            "bases.toy-ft.guidance_scale=2.0", "bases.toy-ft.judges=toy"]


def _nightly(stack: PrefectStack, monkeypatch: pytest.MonkeyPatch, params: Path, on_running=None):
    """Run the nightly here against the stack's server; returns (state, result, flow runs by base)."""
    for key, value in stack.env.items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        errors: list[BaseException] = []
        if on_running is not None:  # beside the nightly, in a thread; the nightly keeps the main thread
            import contextvars
            import threading

            def watch() -> None:
                try:
                    on_running()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the test below
                    errors.append(exc)

            # A new thread starts without this context: its Prefect client would read the settings
            # of import time (no API URL: a temporary server of its own) instead of the stack's.
            watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True)
            watcher.start()
        state = nightly(str(params), ["orchestrate.fan_out=deployment"], return_state=True)
        if on_running is not None:
            watcher.join(timeout=60)
            if errors:
                raise errors[0]
        result = state.result(raise_on_failure=False)
        with get_client(sync_client=True) as client:
            bases = result["bases"] if isinstance(result, dict) else result.summary["bases"]
            runs = {n: client.read_flow_run(b["flow_run"]) for n, b in bases.items() if "flow_run" in b}
    return state, result, runs


def _checkpoint_steps(root: Path, base: str) -> list[int]:
    done = root.glob(f"stages/distill/{base}/*/checkpoints/checkpoint-*/trainer_state_rank0.json")
    return sorted(int(p.parent.name.split("-")[1]) for p in done)


@pytest.fixture(scope="module")
def killed_nightly(stack: PrefectStack) -> dict:
    """ONE nightly of the toy and its fine-tune, the toy's worker killed during distillation.

    Both tests below read it: one nightly instead of two keeps the suite short.
    """
    work = stack.tmp / "kill"
    work.mkdir()
    # Both distillations hold at their first checkpoint while this file exists (distill.hold_file): the
    # kill happens while the toy is certainly distilling, however fast or loaded the machine is.
    hold = work / "hold-at-checkpoint"
    hold.touch()
    params = write_params(work, _bases(stack.tmp) + ["distill.max_steps=20", "distill.checkpoint_every=4",
                                                     "distill.checkpoints_keep=2", f"distill.hold_file={hold}",
                                                     "orchestrate.base_heartbeat_timeout_s=75"], name="kill.yaml")
    root = work / "artifacts"
    killed: dict[str, object] = {}

    def kill_during_distillation() -> None:
        try:
            kill_at_the_barrier()
        finally:
            hold.unlink(missing_ok=True)  # the fine-tune and the toy's retry go on

    def kill_at_the_barrier() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not _checkpoint_steps(root, "toy"):
            time.sleep(0.5)
        steps = _checkpoint_steps(root, "toy")
        assert steps, "no checkpoint of toy within 600 s"
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterName,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        running = FlowRunFilter(name=FlowRunFilterName(any_=["base-toy", "base-toy-ft"]),
                                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
        names: dict[str, object] = {}
        deadline = time.monotonic() + 60  # the runs' states may lag the first checkpoint
        with get_client(sync_client=True) as client:
            while len(names) < 2 and time.monotonic() < deadline:
                names = {r.name: r for r in client.read_flow_runs(flow_run_filter=running)}
                if len(names) < 2:
                    time.sleep(0.5)
            seen = {r.name: r.state_type for r in client.read_flow_runs()}
        killed["running_at_kill"] = sorted(names)
        killed["seen"] = seen
        run = names.get("base-toy")
        assert run is not None, f"no running base-toy flow run: {seen}"
        pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
        worker = next(w for w in stack.workers if os.getpgid(pid) == w.pid or _parent(pid) == w.pid)
        killed.update(step=steps[-1], worker=worker.pid, run=run.id)
        # SIGKILL, as when a node or pod goes away: nothing in the worker or the flow run can report
        # the end; only its heartbeats stop.
        os.killpg(worker.pid, signal.SIGKILL)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    with pytest.MonkeyPatch.context() as monkeypatch:
        state, result, runs = _nightly(stack, monkeypatch, params, on_running=kill_during_distillation)
    return {"state": state, "result": result, "runs": runs, "killed": killed, "root": root}


def failure_report(result, stack) -> str:
    """Why a nightly failed: each failed base's error from the summary, then the workers' log tails."""
    bases = getattr(result, "summary", {}).get("bases", {}) if hasattr(result, "summary") else {}
    errors = "\n".join(f"{name}: {b.get('error')}" for name, b in bases.items() if b.get("status") != "completed")
    return f"{result!r}\n{errors}\n--- worker0\n{stack.log_tail('worker0', 120)}\n--- worker1\n{stack.log_tail('worker1', 120)}"


def test_two_bases_run_in_parallel_on_two_workers(stack: PrefectStack, killed_nightly: dict) -> None:
    state, result, runs, killed = (killed_nightly[k] for k in ("state", "result", "runs", "killed"))
    # Both base runs were RUNNING at once (when the toy's first checkpoint was on disk).
    assert killed.get("running_at_kill") == ["base-toy", "base-toy-ft"], killed.get("seen")
    assert state.is_completed(), failure_report(result, stack)
    assert set(runs) == {"toy", "toy-ft"}
    for name, run in runs.items():
        assert run.state.is_completed() and run.deployment_id is not None, (name, run.state)
        assert result["bases"][name]["published"]["reference"].startswith(f"{name}-lcm-lora:")
    a, b = runs["toy"], runs["toy-ft"]
    overlap = (min(a.end_time, b.end_time) - max(a.start_time, b.start_time)).total_seconds()
    assert overlap > 0, f"base runs did not overlap: {a.start_time}-{a.end_time} vs {b.start_time}-{b.end_time}"
    # One of the two encoded the shared latents; the other reused them (same VAE).
    encodes = [next(s for s in result["bases"][n]["stages"] if s["stage"] == "encode") for n in runs]
    assert len({e["key"] for e in encodes}) == 1


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(stack: PrefectStack,
                                                                     killed_nightly: dict) -> None:
    import json

    from safetensors.torch import load_file

    state, result, runs, killed, root = (killed_nightly[k] for k in ("state", "result", "runs", "killed", "root"))
    assert killed.get("run"), f"the worker was not killed: {killed}"
    assert state.is_completed(), failure_report(result, stack)
    toy = runs["toy"]
    assert toy.id == killed["run"] and toy.run_count >= 2, "the same flow run was retried"
    lineage = json.loads((root / result["bases"]["toy"]["lora"] / "lineage.json").read_text())
    resumed = lineage["run"]["resumed_from"]
    assert resumed and int(Path(resumed).name.split("-")[1]) > 0, lineage
    # The same LoRA as the uninterrupted fine-tune (same weights, seed, shards).
    loras = {n: load_file(root / result["bases"][n]["lora"] / "pytorch_lora_weights.safetensors") for n in runs}
    assert loras["toy"].keys() == loras["toy-ft"].keys()
    diff = max((loras["toy"][k] - loras["toy-ft"][k]).abs().max().item() for k in loras["toy"])
    assert diff <= 1e-6, diff


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.environ.get("LCMLORA_BENCH"), reason="measurement for docs/orchestration.md: LCMLORA_BENCH=1")
@pytest.mark.parametrize("n_bases", [2, 4])
def test_wall_time_sequential_vs_fanned_out(stack: PrefectStack, monkeypatch: pytest.MonkeyPatch, n_bases: int) -> None:
    """Nightly over N toy bases (the toy + N-1 fine-tune copies), fresh storage each: in-process vs fanned out."""
    from flows.nightly import nightly

    extra = []
    for i in range(1, n_bases):
        ft = stack.tmp / f"toy-ft{i}"
        if not ft.exists():
            shutil.copytree(REPO / "data/toy/base", ft)
        extra += [f"bases.toy-ft{i}.reference={ft}", f"bases.toy-ft{i}.family=sd15", f"bases.toy-ft{i}.resolution=32",
                  f"bases.toy-ft{i}.guidance_scale=2.0", f"bases.toy-ft{i}.judges=toy"]
    for key, value in stack.env.items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seconds = {}
    for mode in ("in-process", "deployment"):
        work = stack.tmp / f"bench-{n_bases}-{mode}"
        work.mkdir()
        params = write_params(work, extra, name="bench.yaml")
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            t0 = time.monotonic()
            state = nightly(str(params), [f"orchestrate.fan_out={mode}"], return_state=True)
            seconds[mode] = time.monotonic() - t0
        assert state.is_completed(), state
    line = (f"BENCH bases={n_bases} sequential={seconds['in-process']:.0f}s fanned_out={seconds['deployment']:.0f}s "
            f"(2 workers x 1 run, max_parallel_bases=2, load {os.getloadavg()[0]:.1f})")
    print(line)  # run with -s: the figures of docs/orchestration.md
