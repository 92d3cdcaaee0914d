"""components/registry/registry.py (+ registry_manifest.py) and `lcmlora registry` on local disk and on a real
SeaweedFS."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from components.lora.model_card import check_model_card
from components.registry import gc as registry_gc
from components.registry import registry as registry_module
from components.registry.aliases import GateRefused
from components.registry.manifest import Reference, RegistryError, parse_reference, validate_name
from components.registry.pull import VerificationError
from components.registry.registry import Registry
from components.storage.storage import Storage, StorageUnavailable

BACKENDS = pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
CARD = ("---\nbase_model: data/toy/base\nlibrary_name: diffusers\ntags: [lora, lcm]\n"
        "recommended:\n  num_inference_steps: 4\n  guidance_scale: 1.0\n---\n\n# test lora\n")


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh registry root: a temp dir, or a prefix in a fresh SeaweedFS bucket."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/registry"
    return str(tmp_path / "registry")


def make_lora_folder(folder: Path, *, seed: int = 0, card: bool = True, big: int = 0) -> Path:
    """A LoRA-shaped folder: safetensors weights, metrics with a passed gate, lineage."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"unet.down.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               "unet.down.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)},
              str(folder / "pytorch_lora_weights.safetensors"))
    if big:
        (folder / "big.safetensors").write_bytes(rng.bytes(big))
    (folder / "metrics.json").write_text(json.dumps({"fd_4_steps": 1.5 + seed, "gate": {"passed": True,
                                                                                        "violations": []}}))
    (folder / "lineage.json").write_text(json.dumps({"base": {"name": "toy", "reference": "data/toy/base",
                                                              "family": "sd15", "fingerprint": "f" * 64}}))
    (folder / "report").mkdir(exist_ok=True)
    (folder / "report" / "table.md").write_text(f"| steps | fd |\n| 4 | {1.5 + seed} |\n")
    if card:
        (folder / "README.md").write_text(CARD)
    return folder


def registry_at(root: str, tmp_path: Path) -> Registry:
    return Registry(Storage(root), cache_dir=tmp_path / "cache")


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- names and references ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../etc", "Upper", "-lead", ".hidden", "a b", "a\\b",
                                 "x" * 200, "na\u00efve"])
def test_invalid_names_rejected(bad: str, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        validate_name(bad)
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    with pytest.raises(RegistryError, match="invalid"):
        reg.publish(make_lora_folder(tmp_path / "lora"), bad)
    with pytest.raises(RegistryError, match="invalid"):
        reg.pull(f"{bad}@latest" if bad else "@latest", tmp_path / "out")
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").rglob("*.json"))


def test_reference_parsing() -> None:
    assert parse_reference("toy-lcm-lora") == Reference("toy-lcm-lora", alias="latest")
    assert parse_reference("toy-lcm-lora@production") == Reference("toy-lcm-lora", alias="production")
    assert parse_reference("toy-lcm-lora:12") == Reference("toy-lcm-lora", version="12")
    for bad in ["a@", "a:", "a:0", "a:01", "a:x", "a@b:1", "a@../b", "a:1/..", "@x"]:
        with pytest.raises(RegistryError):
            parse_reference(bad)


# --- publish / list / show / pull ---------------------------------------------------------


@BACKENDS
def test_publish_list_show_pull_roundtrip(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    src = make_lora_folder(tmp_path / "lora")
    m1 = reg.publish(src, "toy-lcm-lora", alias="candidate").manifest
    m2 = reg.publish(make_lora_folder(tmp_path / "lora2", seed=1), "toy-lcm-lora").manifest
    assert (m1.version, m2.version) == ("1", "2")
    assert reg.list() == ["toy-lcm-lora"]
    assert reg.list("toy-lcm-lora") == ["1", "2"]
    assert reg.aliases("toy-lcm-lora") == {"candidate": "1", "latest": "2"}
    assert reg.show("toy-lcm-lora").version == "2"
    assert reg.show("toy-lcm-lora@candidate").version == "1"
    shown = reg.show("toy-lcm-lora:1")
    assert shown.gate == {"passed": True, "violations": []}
    assert shown.metrics == {"fd_4_steps": 1.5}
    assert shown.base is not None and shown.base["fingerprint"] == "f" * 64
    assert set(shown.files) == set(folder_files(src))

    result = reg.pull("toy-lcm-lora@candidate", tmp_path / "out")
    pulled = folder_files(tmp_path / "out")
    assert pulled.pop("manifest.json") == reg.storage.read_bytes("toy-lcm-lora/versions/1/manifest.json")
    assert pulled == folder_files(src)
    assert result.downloaded == sorted(folder_files(src)) and result.cached == []
    # A second pull of the same version downloads nothing: every file comes from the cache.
    again = reg.pull("toy-lcm-lora:1", tmp_path / "out-again")
    assert again.downloaded == [] and again.cached == sorted(folder_files(src))
    assert folder_files(tmp_path / "out-again") == folder_files(tmp_path / "out")
    # A folder that exists and is not empty is never silently replaced.
    with pytest.raises(RegistryError, match="not empty"):
        reg.pull("toy-lcm-lora:2", tmp_path / "out")
    reg.pull("toy-lcm-lora:2", tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["version"] == 2
    # A pulled folder publishes again as is (its old manifest is replaced, not content).
    copy = reg.publish(tmp_path / "out", "toy-lcm-lora-copy").manifest
    assert "manifest.json" not in copy.files and copy.files == reg.show("toy-lcm-lora:2").files
    with pytest.raises(RegistryError, match="no such version"):
        reg.show("toy-lcm-lora:9")
    with pytest.raises(RegistryError, match="no alias 'production'"):
        reg.show("toy-lcm-lora@production")


def test_model_card_generated_when_missing_and_checked_when_present(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    m = reg.publish(make_lora_folder(tmp_path / "nocard", card=False), "gen-card").manifest
    assert "README.md" in m.files
    front = check_model_card(reg.storage.read_text("gen-card/versions/1/README.md"))
    assert "base_model" not in front and front["library_name"] == "diffusers"  # a local base: no base_model
    assert front["recommended"]["num_inference_steps"] == 4 and "lcm-lora" in front["tags"]

    bad = make_lora_folder(tmp_path / "badcard")
    (bad / "README.md").write_text("---\nlibrary_name: transformers\n---\nno card\n")
    with pytest.raises(RegistryError) as err:
        reg.publish(bad, "bad-card")
    for key in ("library_name", "tags", "recommended"):  # base_model is optional (a local base has none)
        assert key in str(err.value)
    nobase = make_lora_folder(tmp_path / "nobase", card=False)
    (nobase / "lineage.json").unlink()
    with pytest.raises(RegistryError, match="no README.md model card"):
        reg.publish(nobase, "no-base")
    assert reg.list() == ["gen-card"]


def test_base_read_from_distill_lineage_and_card(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    folder = make_lora_folder(tmp_path / "lora")
    (folder / "lineage.json").write_text(json.dumps({
        "stage": "distill", "inputs": {"base": {"name": "toy", "reference": "data/toy/base",
                                                "fingerprints": {"unet": "u" * 64, "vae": "v" * 64}}},
        "resolved": {"base": {"reference": "data/toy/base", "family": "sd15"}}}))
    base = reg.publish(folder, "from-lineage").manifest.base
    assert base is not None
    assert (base["name"], base["family"], base["fingerprint"]) == ("toy", "sd15", "u" * 64)
    (folder / "lineage.json").unlink()  # only the card: base_model and its lcm_lora entry
    (folder / "README.md").write_text(CARD.replace("tags:", "lcm_lora: {family: sdxl, base_fingerprint: abc}\ntags:"))
    assert reg.publish(folder, "from-card").manifest.base == {"reference": "data/toy/base", "family": "sdxl",
                                                     "fingerprint": "abc"}


def test_pickle_weights_and_failed_gate_refused(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    for suffix in (".ckpt", ".bin", ".pt", ".pth", ".pkl"):
        folder = make_lora_folder(tmp_path / f"lora{suffix}")
        (folder / f"extra{suffix}").write_bytes(b"\x80\x04not really a pickle")
        with pytest.raises(RegistryError, match=rf"pickle.*extra\{suffix}"):
            reg.publish(folder, "pickled")
    no_weights = make_lora_folder(tmp_path / "noweights")
    (no_weights / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(RegistryError, match="no .safetensors"):
        reg.publish(no_weights, "empty")
    (no_weights / "manifest.json").write_text("{}")
    with pytest.raises(RegistryError, match="reserved") as err:
        reg.publish(no_weights, "empty")
    assert "no .safetensors" in str(err.value)  # every problem listed at once
    failed = make_lora_folder(tmp_path / "failed")
    (failed / "metrics.json").write_text(json.dumps({"gate": {"passed": False, "violations": ["FD too high"]}}))
    with pytest.raises(RegistryError, match="FD too high"):
        reg.publish(failed, "failed")
    assert reg.list() == []


def test_credentials_never_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value-123")
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    folder = make_lora_folder(tmp_path / "lora")
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "b"}, "env": "super-secret-value-123"}))
    with pytest.raises(RegistryError, match="AWS_SECRET_ACCESS_KEY"):
        reg.publish(folder, "leaky")
    assert reg.list() == [] and not reg.storage.exists("leaky/claims/1.json")
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "b"}, "s3": {"secret_key": "abc"},
                                                     "text": {"tokenizer": "clip", "max_tokens": 77}}))
    m = reg.publish(folder, "redacted").manifest
    assert m.lineage == {"base": {"reference": "b"}, "s3": {"secret_key": "<redacted>"},
                         "text": {"tokenizer": "clip", "max_tokens": 77}}


# --- tampering ------------------------------------------------------------------------------


@BACKENDS
def test_tampered_or_truncated_file_fails_pull_and_writes_nothing(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    src = make_lora_folder(tmp_path / "lora")
    reg.publish(src, "victim")
    key = "victim/versions/1/pytorch_lora_weights.safetensors"
    original = reg.storage.read_bytes(key)
    tampered = bytearray(original)
    tampered[-1] ^= 0xFF
    for label, data in [("tampered", bytes(tampered)), ("truncated", original[: len(original) // 2])]:
        reg.storage.write_bytes(key, data)
        target = tmp_path / f"out-{label}"
        with pytest.raises(VerificationError, match="pytorch_lora_weights.safetensors") as err:
            reg.pull("victim", target)
        assert "nothing was written" in str(err.value)
        assert not target.exists()
        assert not list((tmp_path / "cache").rglob("pytorch*")) and not (tmp_path / "cache" / "sha256").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    reg.storage.write_bytes(key, original)  # restored: the pull verifies again and succeeds
    reg.pull("victim", tmp_path / "out-ok")
    assert (tmp_path / "out-ok" / "pytorch_lora_weights.safetensors").read_bytes() == original


@BACKENDS
def test_large_files_verified_part_by_part(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = 64 * 1024
    monkeypatch.setattr(registry_module, "PART_SIZE", part)  # 300 KB file -> 5 parts
    reg = registry_at(root, tmp_path)
    src = make_lora_folder(tmp_path / "lora", big=300 * 1024)
    entry = reg.publish(src, "parted").manifest.files["big.safetensors"]
    assert entry.part_size == part and len(entry.parts) == 5
    assert reg.show("parted").files["big.safetensors"] == entry
    reg.pull("parted", tmp_path / "ok")
    assert (tmp_path / "ok" / "big.safetensors").read_bytes() == (src / "big.safetensors").read_bytes()
    # A cache entry edited in place (here: its part 3) is caught by the part check and refetched.
    blob = next((tmp_path / "cache" / "sha256").rglob(entry.sha256))
    blob.chmod(0o644)
    with open(blob, "r+b") as fh:
        fh.seek(3 * part + 5)
        fh.write(b"X")
    assert reg.pull("parted", tmp_path / "again").downloaded == ["big.safetensors"]
    assert (tmp_path / "again" / "big.safetensors").read_bytes() == (src / "big.safetensors").read_bytes()

    key = "parted/versions/1/big.safetensors"
    original = reg.storage.read_bytes(key)
    middle = bytearray(original)
    middle[2 * part + 10] ^= 0xFF
    cases = [("tampered", bytes(middle), "part 2"), ("truncated", original[: 2 * part], "bytes"),
             ("extended", original + b"more", "part 4")]
    for label, data, detail in cases:
        reg.storage.write_bytes(key, data)
        shutil.rmtree(tmp_path / "cache")
        with pytest.raises(VerificationError, match="big.safetensors") as err:
            reg.pull("parted", tmp_path / f"out-{label}")
        assert detail in str(err.value) and "nothing was written" in str(err.value)
        assert not (tmp_path / f"out-{label}").exists() and not (tmp_path / "cache" / "sha256").exists()


def test_pulled_files_are_copies_and_a_corrupted_cache_entry_is_refetched(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    reg.publish(make_lora_folder(tmp_path / "lora"), "cached")
    reg.pull("cached", tmp_path / "a")
    reg.pull("cached", tmp_path / "b")
    # Editing one pulled folder changes neither the other nor the cache (issue 16 item 6).
    (tmp_path / "a" / "metrics.json").write_text("{}")
    for rel in folder_files(tmp_path / "b"):
        assert (tmp_path / "a" / rel).stat().st_ino != (tmp_path / "b" / rel).stat().st_ino
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["fd_4_steps"] == 1.5
    assert reg.pull("cached", tmp_path / "c").downloaded == []
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["fd_4_steps"] == 1.5
    blobs = [p for p in (tmp_path / "cache" / "sha256").rglob("*") if p.is_file()]
    assert blobs and all(p.stat().st_mode & 0o222 == 0 for p in blobs)  # cache entries are read-only
    # A cache entry corrupted anyway is re-verified before use and fetched again.
    metrics_sha = reg.show("cached").files["metrics.json"].sha256
    blob = next(p for p in blobs if p.name == metrics_sha)
    blob.chmod(0o644)
    blob.write_text("{}")
    result = reg.pull("cached", tmp_path / "d")
    assert result.downloaded == ["metrics.json"]
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["fd_4_steps"] == 1.5


# --- aliases and gc ---------------------------------------------------------------------------


@BACKENDS
def test_alias_moves_history_and_gc(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    for seed in range(4):
        reg.publish(make_lora_folder(tmp_path / f"lora{seed}", seed=seed), "lcm")
    reg.alias_set("lcm", "production", "1")
    reg.alias_set("lcm", "production", "2")
    reg.alias_set("lcm", "candidate", "3")
    history = reg.alias_history("lcm", "production")
    assert [(h.previous, h.version) for h in history] == [(None, "1"), ("1", "2")]
    assert [(h.previous, h.version) for h in reg.alias_history("lcm", "latest")] == [
        (None, "1"), ("1", "2"), ("2", "3"), ("3", "4")]
    with pytest.raises(RegistryError, match="no such version"):
        reg.alias_set("lcm", "production", "9")
    with pytest.raises(RegistryError, match="no such alias"):
        reg.alias_history("lcm", "staging")

    plan = reg.gc("lcm", keep=1)  # dry run by default: nothing deleted
    assert plan.dry_run and plan.delete == ["1"] and plan.keep == ["2", "3", "4"]
    assert plan.aliased == {"2": ["production"], "3": ["candidate"], "4": ["latest"]}
    assert reg.list("lcm") == ["1", "2", "3", "4"]
    plan = reg.gc("lcm", keep=0, dry_run=False)
    assert plan.delete == ["1"] and reg.list("lcm") == ["2", "3", "4"]
    assert reg.storage.ls("lcm/versions/1", recursive=True) == []
    assert reg.show("lcm@production").version == "2"
    # Ids are never reused after gc.
    assert reg.publish(make_lora_folder(tmp_path / "lora9", seed=9), "lcm").manifest.version == "5"


def test_latest_only_moves_forward(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    reg.publish(make_lora_folder(tmp_path / "a"), "fwd")
    reg.publish(make_lora_folder(tmp_path / "b", seed=1), "fwd")
    assert reg._move_alias("fwd", "latest", "1", forward_only=True) is None
    assert reg.show("fwd").version == "2"


# --- concurrency ------------------------------------------------------------------------------


def _publish_then_move(root: str, env: dict[str, str], folder: str, cache: str, start, barrier, results) -> None:
    os.environ.update(env)
    reg = Registry(Storage(root), cache_dir=cache)
    start.wait()
    manifest = reg.publish(folder, "racy").manifest
    barrier.wait()  # every publisher done: now all move one alias at the same moment
    move = reg.alias_set("racy", "production", manifest.version)
    results.put((manifest.version, move.previous))


def _publish_and_hang(root: str, env: dict[str, str], folder: str, started) -> None:
    os.environ.update(env)

    def stall(rel: str, size: int) -> None:
        started.set()
        time.sleep(120)  # killed here, mid-upload

    Registry(Storage(root)).publish(folder, "killed", progress=stall)


def _aws_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@BACKENDS
def test_eight_racing_publishers_and_alias_movers(root: str, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    n = 8
    folders = [make_lora_folder(tmp_path / f"lora{i}", seed=i) for i in range(n)]
    start, barrier, results = ctx.Event(), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_publish_then_move,
                         args=(root, _aws_env(), str(f), str(tmp_path / "cache"), start, barrier, results))
             for f in folders]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let the children import and wait on `start`
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    outcomes = [results.get(timeout=10) for _ in range(n)]
    versions = sorted((v for v, _ in outcomes), key=int)
    assert versions == [str(i) for i in range(1, n + 1)]  # 8 distinct ids
    reg = registry_at(root, tmp_path)
    assert reg.list("racy") == versions
    # Each version is complete and verifiable: it pulls, and its metrics are its own folder's.
    for v in versions:
        pulled = reg.pull(f"racy:{v}", tmp_path / f"out{v}")
        files = folder_files(pulled.path)
        files.pop("manifest.json")
        assert any(files == folder_files(f) for f in folders)
    # The alias ends on one of their versions; the history has 8 moves that chain.
    history = reg.alias_history("racy", "production")
    assert len(history) == n
    assert history[0].previous is None
    assert all(b.previous == a.version for a, b in itertools.pairwise(history))
    assert sorted((h.version for h in history), key=int) == versions
    assert reg.show("racy@production").version == history[-1].version
    assert reg.show("racy").version == str(n)  # latest only moved forward


@BACKENDS
def test_killed_publisher_leaves_no_version(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = mp.get_context("spawn")
    folder = make_lora_folder(tmp_path / "lora", big=512 * 1024)
    started = ctx.Event()
    proc = ctx.Process(target=_publish_and_hang, args=(root, _aws_env(), str(folder), started))
    proc.start()
    assert started.wait(60), "publisher never started uploading"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    reg = registry_at(root, tmp_path)
    assert reg.storage.exists("killed/claims/1.json")  # it had claimed id 1 and uploaded a file
    assert reg.list("killed") == [] and reg.list() == []
    with pytest.raises(RegistryError, match="no versions"):
        reg.show("killed")
    manifest = reg.publish(folder, "killed").manifest
    assert manifest.version == "2" and reg.list("killed") == ["2"]
    reg.pull("killed", tmp_path / "out")
    # gc clears the leftovers of the dead publisher once its claim is stale.
    assert reg.gc("killed", keep=1).incomplete == []
    monkeypatch.setattr(registry_gc, "STALE_CLAIM_S", 0.0)
    assert reg.gc("killed", keep=1, dry_run=False).incomplete == ["1"]
    assert reg.storage.ls("killed/versions/1", recursive=True) == []
    assert reg.list("killed") == ["2"]


# --- unreachable endpoint -------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_clear_error_after_bounded_retries(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-printed-secret")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    reg = Registry(Storage("s3://bucket/reg", endpoint_url=endpoint, retries=2, connect_timeout=1),
                   cache_dir=tmp_path / "cache")
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable after 2 attempts") as err:
        reg.pull("toy-lcm-lora@production", tmp_path / "out")
    assert endpoint in str(err.value) and time.monotonic() - t0 < 15
    # The CLI says the same in one line on stderr and exits non-zero; no secret printed.
    (tmp_path / "params.yaml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "registry", "list", "x", "--params", str(tmp_path / "params.yaml"),
         "--set", "registry.root=s3://bucket/reg", "--set", f"storage.endpoint_url={endpoint}",
         "--set", "storage.retries=2"],
        capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).parents[1],
        env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode != 0
    assert endpoint in proc.stderr and "unreachable" in proc.stderr
    assert "never-printed-secret" not in proc.stderr + proc.stdout


# --- digests, idempotent publish, protected manifests (issue 15 items 1-2, issue 16 items 4-5, 8) ---


@BACKENDS
def test_digest_references_and_identical_content_returns_the_existing_version(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    first = reg.publish(make_lora_folder(tmp_path / "a"), "dig")
    assert not first.existing and first.manifest.digest.startswith("sha256:")
    stored = json.loads(reg.storage.read_bytes("dig/versions/1/manifest.json"))
    assert stored["digest"] == first.manifest.digest and stored["version"] == 1 and stored["format"] == 2
    # The digest is the sha256 of the canonical content JSON, reproducible with json + hashlib alone.
    content = {k: stored[k] for k in ("format", "files", "base", "metrics", "gate", "lineage")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    assert "sha256:" + hashlib.sha256(canonical).hexdigest() == stored["digest"]
    # Same bytes again (a copy of the folder): the existing version, nothing uploaded, no new id.
    again = reg.publish(shutil.copytree(tmp_path / "a", tmp_path / "a-copy"), "dig", alias="candidate")
    assert again.existing and again.manifest.version == "1" and reg.list("dig") == ["1"]
    assert reg.aliases("dig") == {"latest": "1", "candidate": "1"}
    other = reg.publish(make_lora_folder(tmp_path / "b", seed=1), "dig").manifest
    assert other.version == "2" and other.digest != first.manifest.digest
    hexdigest = other.digest.removeprefix("sha256:")
    for ref in (f"dig@sha256:{hexdigest}", f"dig@sha256:{hexdigest[:12]}"):
        assert reg.resolve(ref) == ("dig", "2") and reg.show(ref).version == "2"
        assert reg.pull(ref, tmp_path / f"out-{len(ref)}").manifest.version == "2"
    with pytest.raises(RegistryError, match="12 to 64"):
        reg.resolve(f"dig@sha256:{hexdigest[:11]}")
    with pytest.raises(RegistryError, match="no version of dig has this digest"):
        reg.resolve("dig@sha256:" + "0" * 12)


def _publish_same(root: str, env: dict[str, str], folder: str, start, results) -> None:
    os.environ.update(env)
    start.wait()
    result = Registry(Storage(root)).publish(folder, "same")
    results.put((result.manifest.version, result.existing))


@BACKENDS
def test_racing_identical_publishers_end_with_one_version(root: str, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    folder = make_lora_folder(tmp_path / "lora", big=256 * 1024)
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_publish_same, args=(root, _aws_env(), str(folder), start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(2.0)
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    outcomes = [results.get(timeout=10) for _ in range(4)]
    reg = registry_at(root, tmp_path)
    assert reg.list("same") == ["1"] or len(reg.list("same")) == 1
    (version,) = reg.list("same")
    assert {v for v, _ in outcomes} == {version}
    assert sorted(existing for _, existing in outcomes) == [False, True, True, True]


@BACKENDS
def test_an_edited_manifest_is_refused_and_list_marks_it(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    for seed in range(3):
        reg.publish(make_lora_folder(tmp_path / f"l{seed}", seed=seed), "edit")
    key = "edit/versions/2/manifest.json"
    original = reg.storage.read_bytes(key)
    body = json.loads(original)
    body["metrics"]["fd_4_steps"] = 0.01  # a better number, typed in by hand
    reg.storage.write_bytes(key, json.dumps(body, indent=2).encode())
    with pytest.raises(RegistryError, match="edited after publish"):
        reg.show("edit:2")
    with pytest.raises(RegistryError, match="edited after publish"):
        reg.pull("edit:2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Swapping a file together with its sha256 and size in the manifest (and its digest field): refused.
    body = json.loads(original)
    weights = b"evil weights"
    body["files"]["pytorch_lora_weights.safetensors"] = {"sha256": hashlib.sha256(weights).hexdigest(),
                                                         "size": len(weights)}
    from components.registry.manifest import content_digest
    body["digest"] = "sha256:" + content_digest({k: body[k] for k in ("format", "files", "base", "metrics",
                                                                       "gate", "lineage")})
    reg.storage.write_bytes("edit/versions/2/pytorch_lora_weights.safetensors", weights)
    reg.storage.write_bytes(key, json.dumps(body).encode())
    with pytest.raises(RegistryError, match="edited after publish"):
        reg.pull("edit:2", tmp_path / "out")
    reg.storage.write_bytes("edit/versions/3/manifest.json", b"{not json")
    statuses = reg.versions("edit")
    assert [s.version for s in statuses] == ["1", "2", "3"]
    assert statuses[0].manifest is not None and statuses[0].error is None
    assert statuses[1].manifest is None and "edited after publish" in (statuses[1].error or "")
    assert statuses[2].manifest is None and "malformed manifest" in (statuses[2].error or "")


def test_eleven_versions_order_numerically(tmp_path: Path) -> None:
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    for seed in range(11):
        reg.publish(make_lora_folder(tmp_path / f"l{seed}", seed=seed), "many")
    expected = [str(i) for i in range(1, 12)]
    assert reg.list("many") == expected and [s.version for s in reg.versions("many")] == expected
    assert reg.show("many").version == "11" and reg.aliases("many")["latest"] == "11"
    assert json.loads(reg.storage.read_bytes("many/aliases/latest.json"))["version"] == 11  # a JSON integer
    plan = reg.gc("many", keep=3)
    assert plan.keep == ["9", "10", "11"] and plan.delete == expected[:8]


# --- gated promotion, rollback (issue 15 item 3, issue 16 item 9) --------------------------


@BACKENDS
def test_gated_promotion_force_with_reason_and_rollback(root: str, tmp_path: Path) -> None:
    reg = registry_at(root, tmp_path)
    passed = [reg.publish(make_lora_folder(tmp_path / f"p{s}", seed=s), "gated").manifest for s in range(3)]
    never = make_lora_folder(tmp_path / "never", seed=7)
    (never / "metrics.json").unlink()
    with pytest.raises(GateRefused, match="never evaluated"):
        reg.publish(never, "gated", alias="candidate")  # refused before anything is written
    assert reg.list("gated") == ["1", "2", "3"]
    unevaluated = reg.publish(never, "gated").manifest  # without an alias it publishes, gate missing
    assert unevaluated.gate is None and unevaluated.gate_status == "missing"
    failed = make_lora_folder(tmp_path / "failed", seed=8)
    (failed / "metrics.json").write_text(json.dumps({"gate": {"passed": False, "violations": ["fd_4 > 3.0",
                                                                                            "psnr < 20"]}}))
    with pytest.raises(RegistryError, match="fd_4 > 3.0"):
        reg.publish(failed, "gated")
    bad = reg.publish(failed, "gated", force_reason="keep the failed run for the post-mortem").manifest
    assert bad.gate_status == "failed"

    reg.alias_set("gated", "production", passed[0].version)
    reg.alias_set("gated", "production", passed[1].version)
    with pytest.raises(GateRefused, match=r"gate failed: fd_4 > 3.0; psnr < 20"):
        reg.alias_set("gated", "production", bad.version)
    with pytest.raises(GateRefused, match="never evaluated"):
        reg.alias_set("gated", "production", unevaluated.version)
    assert reg.show("gated@production").version == passed[1].version
    move = reg.alias_set("gated", "production", unevaluated.version, force_reason="hotfix, evaluated by hand")
    assert (move.kind, move.reason) == ("force", "hotfix, evaluated by hand")
    history = reg.alias_history("gated", "production")
    assert [(h.version, h.kind, h.reason) for h in history][-1] == (unevaluated.version, "force",
                                                                      "hotfix, evaluated by hand")
    assert history[-1].digest == unevaluated.digest
    # Rollback walks back the moves: 1 -> 2 -> 4, rollback -> 2, rollback -> 1, then nothing left.
    assert reg.alias_rollback("gated", "production").version == passed[1].version
    assert reg.alias_rollback("gated", "production", reason="bad again").version == passed[0].version
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.alias_rollback("gated", "production")
    assert [h.kind for h in reg.alias_history("gated", "production")] == ["set", "set", "force", "rollback",
                                                                          "rollback"]


# --- gc of dead publishers (issue 16 item 7) ---------------------------------------------------


def test_gc_removes_abandoned_claims_and_incomplete_multipart_uploads(s3_bucket: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reg = registry_at(s3_bucket + "/registry", tmp_path)
    reg.publish(make_lora_folder(tmp_path / "ok"), "dead")
    # A dead publisher: claim 2 and half a multipart upload of its big file, never completed.
    reg.storage.write_bytes("dead/claims/2.json", json.dumps({"version": 2, "claimed_at": time.time(),
                                                              "digest": "sha256:" + "e" * 64}).encode())
    reg.storage.write_bytes("dead/digests/" + "e" * 64 + ".json", json.dumps({"version": 2}).encode())
    reg.storage.write_bytes("dead/versions/2/metrics.json", b"{}")
    client = reg.storage._backend.client  # plain boto3, as the killed upload used it
    key = reg.storage.key("dead/versions/2/big.safetensors")
    upload = client.create_multipart_upload(Bucket=reg.storage.bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=reg.storage.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    plan = reg.gc("dead", keep=5)  # inside the grace period: nothing to do
    assert plan.incomplete == [] and plan.uploads == []
    plan = reg.gc("dead", keep=5, grace_s=0.0)  # dry run: listed, nothing removed
    assert plan.dry_run and plan.incomplete == ["2"] and plan.uploads == [f"dead/versions/2/big.safetensors ({upload})"]
    assert reg.storage.exists("dead/claims/2.json")
    plan = reg.gc("dead", keep=5, grace_s=0.0, dry_run=False)
    assert plan.incomplete == ["2"] and len(plan.uploads) == 1
    assert not reg.storage.exists("dead/claims/2.json") and reg.storage.ls("dead/versions/2", recursive=True) == []
    assert reg.storage.ls("dead/digests") == [reg.show("dead").digest.removeprefix("sha256:") + ".json"]
    assert reg.storage.multipart_uploads("dead") == []
    assert reg.storage.exists("dead/tombstones/2.json")
    assert reg.publish(make_lora_folder(tmp_path / "next", seed=3), "dead").manifest.version == "3"  # id not reused
    assert reg.list("dead") == ["1", "3"]
