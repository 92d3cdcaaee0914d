"""components/registry/events.py: every alias move appends one create-only event object under the
registry root (read back here with plain boto3 on SeaweedFS) and sends `lcmlora.alias.moved` to
Prefect when an API is configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.registry.events import EVENT, event_key, read_events
from components.registry.registry import Registry
from components.storage.storage import Storage
from tests.test_registry import make_lora_folder

BACKENDS = pytest.mark.parametrize("root", ["local", "s3"], indirect=True)


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/registry"
    return str(tmp_path / "registry")


def _moves(reg: Registry, tmp_path: Path) -> list:
    v = [reg.publish(make_lora_folder(tmp_path / f"l{s}", seed=s), "ev", alias="production" if s == 0 else None)
         .manifest for s in range(3)]
    reg.alias_set("ev", "production", "2")
    reg.alias_set("ev", "production", "3")
    reg.alias_rollback("ev", "production", reason="latency regression")
    return v


@BACKENDS
def test_every_alias_move_is_one_create_only_event_object(root: str, tmp_path: Path) -> None:
    reg = Registry(Storage(root), cache_dir=tmp_path / "cache")
    v = _moves(reg, tmp_path)
    events = read_events(reg.storage, "ev", "production")
    assert [(e.sequence, e.from_version, e.to_version, e.kind) for e in events] == [
        (1, None, 1, "publish"), (2, 1, 2, "set"), (3, 2, 3, "set"), (4, 3, 2, "rollback")]
    assert [e.digest for e in events] == [v[0].digest, v[1].digest, v[2].digest, v[1].digest]
    assert events[-1].reason == "latency regression"
    assert [e.to_version for e in read_events(reg.storage, "ev", "latest")] == [1, 2, 3]
    assert [e.sequence for e in read_events(reg.storage, "ev", "production", after=2)] == [3, 4]
    assert reg.storage.ls("ev/events/production") == [f"{i:010d}.json" for i in range(1, 5)]
    assert event_key("ev", "production", 4) == "ev/events/production/0000000004.json"
    history = reg.alias_history("ev", "production")
    assert [(h.previous, h.version) for h in history] == [(e.from_version and str(e.from_version), str(e.to_version))
                                                          for e in events]


def test_a_consumer_tails_the_log_with_plain_boto3(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    reg = Registry(Storage(s3_bucket + "/team/registry"), cache_dir=tmp_path / "cache")
    v = _moves(reg, tmp_path)
    # What docs/registry.md tells a consumer: list PREFIX/NAME/events/ALIAS/ after the last key seen.
    s3 = boto3.client("s3")  # endpoint and credentials from the AWS_* environment
    bucket = s3_bucket.removeprefix("s3://")
    prefix = "team/registry/ev/events/production/"
    seen = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=prefix + "0000000002.json")["Contents"]
    bodies = [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in seen]
    assert [(b["event"], b["name"], b["alias"], b["sequence"], b["from"], b["to"], b["digest"]) for b in bodies] == [
        (EVENT, "ev", "production", 3, 2, 3, v[2].digest), (EVENT, "ev", "production", 4, 3, 2, v[1].digest)]
    # Create-only: an event object is never replaced.
    from components.registry.events import AliasEvent, write_event

    forged = AliasEvent("ev", "production", 4, 3, 1, v[0].digest, "set", None, "2020-01-01T00:00:00Z")
    assert write_event(reg.storage, forged) is False
    assert read_events(reg.storage, "ev", "production")[-1].to_version == 2


def test_a_lost_event_is_written_by_the_next_move(tmp_path: Path) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    _moves(reg, tmp_path)
    reg.storage.delete("ev/events/production/0000000004.json")  # its writer died after the CAS
    reg.alias_set("ev", "production", "1")
    assert [e.sequence for e in read_events(reg.storage, "ev", "production")] == [1, 2, 3, 4, 5]


def test_an_unreachable_prefect_api_logs_and_the_move_stands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A configured API that is down: the move and its log object stand, the lost event is logged.
    (Delivery to a real server: tests/test_deployments.py::test_alias_moves_reach_the_prefect_server_as_events.)"""
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.registry import events as registry_events

    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    reg.publish(make_lora_folder(tmp_path / "a"), "down")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), caplog.at_level("WARNING"):
        assert registry_events.prefect_api_configured() is True
        started = time.monotonic()
        reg.alias_set("down", "production", "1")
        elapsed = time.monotonic() - started
    assert reg.show("down@production").version == "1"
    assert [e.to_version for e in read_events(reg.storage, "down", "production")] == [1]
    assert any("not delivered" in r.getMessage() and "down@production" in r.getMessage() for r in caplog.records)
    assert elapsed < registry_events.DELIVERY_TIMEOUT_S + 5


def test_no_prefect_event_without_an_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.registry import events as registry_events

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        assert registry_events.prefect_api_configured() is False
        reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
        reg.publish(make_lora_folder(tmp_path / "a"), "quiet", alias="production")  # no API: the log only
    assert [e.to_version for e in read_events(reg.storage, "quiet", "production")] == [1]
