"""components/storage/storage.py on local disk and on a real SeaweedFS (tests/conftest.py `s3_server`)."""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from components.storage.storage import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    StorageUnavailable,
)

BACKENDS = pytest.mark.parametrize("root", ["local", "s3"], indirect=True)


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh storage root: a temp dir, or a fresh bucket on SeaweedFS (AWS_* env set)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/some/prefix"
    return str(tmp_path / "root")


# --- workers for the multi-process races (module level so `spawn` can import them) -------


def _race_writer(root: str, env: dict[str, str], rel: str, payload: bytes, start, results) -> None:
    os.environ.update(env)
    store = Storage(root)
    start.wait()
    try:
        store.write_bytes(rel, payload, create_only=True)
        results.put(("won", payload[:8]))
    except AlreadyExists:
        results.put(("lost", payload[:8]))


def _race_reader(root: str, env: dict[str, str], rel: str, payloads: list[bytes], start, stop, results) -> None:
    os.environ.update(env)
    store = Storage(root)
    start.wait()
    seen, bad = 0, 0
    while not stop.is_set():
        try:
            data = store.read_bytes(rel)
        except NotFound:
            continue
        seen += 1
        bad += data not in payloads
    results.put(("reader", seen, bad))


def _cas_incrementer(root: str, env: dict[str, str], rel: str, times: int, start, results) -> None:
    os.environ.update(env)
    store = Storage(root)
    start.wait()
    conflicts = 0
    for _ in range(times):
        while True:
            data, tag = store.read_with_etag(rel)
            try:
                store.write_if_match(rel, str(int(data) + 1).encode(), tag)
                break
            except PreconditionFailed:
                conflicts += 1
    results.put(conflicts)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


# --- basics ------------------------------------------------------------------------------


@BACKENDS
def test_write_read_ls_exists_delete(root: str) -> None:
    store = Storage(root)
    assert store.ls() == [] and not store.exists("a/b.txt")
    store.write_bytes("a/b.txt", b"hello")
    store.write_text("a/c/d.json", "{}")
    assert store.read_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a")  # folders are not objects
    assert store.ls() == ["a"]
    assert store.ls("a") == ["b.txt", "c"]
    assert store.ls("a", recursive=True) == ["b.txt", "c/d.json"]
    assert store.size("a/b.txt") == 5
    with pytest.raises(NotFound, match="missing.txt"):
        store.read_bytes("missing.txt")
    # .fs/.path give the same bytes to fsspec-based libraries.
    with store.fs.open(store.path("a/b.txt"), "rb") as fh:
        assert fh.read() == b"hello"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a", recursive=True)
    assert store.ls(recursive=True) == []  # SeaweedFS may list the emptied folder "a" a while


@BACKENDS
def test_put_get_file_with_digest(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from components.storage import s3 as storage_s3
    from components.storage import storage as storage_module

    # Small parts and window: the S3 download runs 4 ranged GETs, written out of order.
    monkeypatch.setattr(storage_module, "PART_SIZE", 1024 * 1024)
    monkeypatch.setattr(storage_s3, "WINDOW", 2)
    store = Storage(root)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    store.put_file(src, "blobs/x.bin")
    digest = hashlib.sha256()
    store.get_file("blobs/x.bin", tmp_path / "dst.bin", digest=digest)
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert digest.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    # Per-part hashes arrive from the download threads, in any order, one per part.
    parts: dict[int, str] = {}
    store.get_file("blobs/x.bin", tmp_path / "dst2.bin", part_sha256=parts.__setitem__, part_size=1024 * 1024)
    data = src.read_bytes()
    assert parts == {s: hashlib.sha256(data[s:s + 1024 * 1024]).hexdigest() for s in range(0, len(data), 1024 * 1024)}
    assert (tmp_path / "dst2.bin").read_bytes() == data
    with pytest.raises(AlreadyExists):
        store.put_file(src, "blobs/x.bin", create_only=True)


@BACKENDS
def test_failed_write_leaves_nothing(root: str) -> None:
    store = Storage(root)
    store.write_bytes("f.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"), store.open("f.bin", "wb") as fh:
        fh.write(b"partial new content")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), store.open("g.bin", "wb") as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert store.read_bytes("f.bin") == b"old"
    assert not store.exists("g.bin")
    assert store.ls(recursive=True) == ["f.bin"]  # no temp files visible
    if not store.is_s3:
        assert [p.name for p in Path(root).iterdir()] == ["f.bin"]


@BACKENDS
def test_create_only(root: str) -> None:
    store = Storage(root)
    store.write_bytes("k", b"first", create_only=True)
    with pytest.raises(AlreadyExists, match="k"):
        store.write_bytes("k", b"second", create_only=True)
    assert store.read_bytes("k") == b"first"
    store.write_bytes("k", b"third")  # a plain write still overwrites
    assert store.read_bytes("k") == b"third"


@BACKENDS
def test_compare_and_swap(root: str) -> None:
    store = Storage(root)
    store.write_if_match("alias.json", b"1", None)  # None: only if absent
    with pytest.raises(PreconditionFailed):
        store.write_if_match("alias.json", b"x", None)
    _, tag = store.read_with_etag("alias.json")
    new_tag = store.write_if_match("alias.json", b"2", tag)
    with pytest.raises(PreconditionFailed):
        store.write_if_match("alias.json", b"3", tag)  # stale tag
    assert store.read_bytes("alias.json") == b"2"
    assert store.read_with_etag("alias.json")[1] == new_tag
    with pytest.raises(PreconditionFailed):
        store.write_if_match("never-written.json", b"x", tag)


def test_paths_outside_root_refused(tmp_path: Path) -> None:
    store = Storage(str(tmp_path))
    for bad in ("../x", "a/../../x", "a//b", "./a"):
        with pytest.raises(StorageError, match="segment"):
            store.write_bytes(bad, b"x")


# --- races across processes --------------------------------------------------------------


@BACKENDS
def test_racing_create_only_writers_one_wins_readers_never_see_partial(root: str) -> None:
    ctx = mp.get_context("spawn")
    n = 4
    payloads = [bytes([i]) * (4 * 1024 * 1024) for i in range(n)]  # 4 MiB each: a torn read shows
    start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_race_writer, args=(root, _env(), "race/key.bin", p, start, results))
               for p in payloads]
    reader = ctx.Process(target=_race_reader, args=(root, _env(), "race/key.bin", payloads, start, stop, results))
    for p in [*writers, reader]:
        p.start()
    time.sleep(1.5 if Storage(root).is_s3 else 0.8)  # let every child import and block on `start`
    start.set()
    for p in writers:
        p.join(60)
    stop.set()
    reader.join(60)
    outcomes = [results.get(timeout=10) for _ in range(n + 1)]
    won = [o for o in outcomes if o[0] == "won"]
    assert len(won) == 1, outcomes
    assert sum(o[0] == "lost" for o in outcomes) == n - 1
    _, seen, bad = next(o for o in outcomes if o[0] == "reader")
    assert seen > 0 and bad == 0, f"reader saw {bad} partial or foreign contents in {seen} reads"
    assert Storage(root).read_bytes("race/key.bin")[:8] == won[0][1]


@BACKENDS
def test_racing_compare_and_swap_loses_no_update(root: str) -> None:
    ctx = mp.get_context("spawn")
    store = Storage(root)
    store.write_bytes("counter", b"0")
    procs, times = 4, 5
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_cas_incrementer, args=(root, _env(), "counter", times, start, results))
               for _ in range(procs)]
    for p in workers:
        p.start()
    time.sleep(1.5 if store.is_s3 else 0.8)
    start.set()
    for p in workers:
        p.join(120)
    conflicts = [results.get(timeout=10) for _ in range(procs)]
    assert int(store.read_bytes("counter")) == procs * times, conflicts


# --- failures ----------------------------------------------------------------------------


def test_unreachable_endpoint_fails_clearly_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-log-this-secret")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = Storage("s3://bucket/prefix", endpoint_url=endpoint, retries=2, connect_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        store.read_bytes("x.json")
    assert time.monotonic() - t0 < 15
    assert endpoint in str(err.value) and "after 2 attempts" in str(err.value)
    assert "do-not-log-this-secret" not in str(err.value)


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert Storage("s3://b/p").endpoint_url == "http://127.0.0.1:9"
    assert Storage("s3://b/p", endpoint_url="http://e:1").endpoint_url == "http://e:1"
    assert Storage("s3://b/p").url("x/y") == "s3://b/p/x/y"


def _forked_reader(store: Storage, inherited_client, rel: str, results) -> None:
    with store.open(rel) as fh:
        data = fh.read()
    results.put((store._backend.client is inherited_client, hashlib.sha256(data).hexdigest()))


def test_forked_processes_get_their_own_s3_connections(s3_bucket: str) -> None:
    """DataLoader workers are forked: sharing the parent's pooled sockets truncated streams."""
    store = Storage(s3_bucket + "/fork")
    payload = os.urandom(3 << 20)
    store.write_bytes("blob", payload)
    assert store.read_bytes("blob") == payload  # the parent now holds a pooled connection
    inherited = store._backend.client
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_forked_reader, args=(store, inherited, "blob", results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [shared for shared, _ in got] == [False] * 3
    assert {digest for _, digest in got} == {hashlib.sha256(payload).hexdigest()}
    assert store._backend.client is inherited  # the parent keeps its own
