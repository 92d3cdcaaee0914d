"""The evaluation report: files exist, Markdown holds the table, the HTML is self-contained and
opens in headless Chromium without console errors, its images decoded."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from components.evaluate.report import REPORT_FILES, sample_grid, table_rows, write_report


def synthetic_doc() -> dict:
    methods = []
    for sampler, lora, guidance in (("lcm", True, 1.0), ("ddim", False, 2.0), ("dpmpp", False, 2.0)):
        for steps in ((1, 2, 4) if lora else (1, 2, 4, 50)):
            methods.append({"label": f"{sampler}-{steps}", "sampler": sampler, "steps": steps,
                            "guidance_scale": guidance, "lora": lora, "gamma": None,
                            "fd": 1.0 / steps + (0.0 if lora else 0.3), "adherence": 0.9,
                            "psnr": None if (sampler, steps) == ("ddim", 50) else 18.0 + steps,
                            "ssim": None if (sampler, steps) == ("ddim", 50) else 0.5,
                            "unet_evals_per_image": steps * (1 if lora else 2), "seconds_per_image": 0.01 * steps})
    return {"base": "toy", "lora": "runs/distill/toy", "methods": methods,
            "info": {"images_per_method": 20, "feature_backbone": "digit classifier features",
                     "adherence": "digit accuracy", "agreement_reference": "ddim-50"},
            "gate": {"passed": False, "violations": ["evaluate.lcm4_fd_below_dpm4: lcm-4 fd 0.3 exceeds <dpmpp-4> 0.2"],
                     "checks": [], "skipped": ["evaluate.lcm1_psnr_min"]}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    doc = synthetic_doc()
    prompts = [f"a handwritten digit {w}" for w in ("zero", "one", "two")]
    g = torch.Generator().manual_seed(0)
    grid = [torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for _ in doc["methods"]]
    out = tmp_path_factory.mktemp("report")
    return doc, write_report(doc, prompts, grid, out), out


def test_report_files_exist_and_markdown_holds_the_table(report):
    doc, _paths, out = report
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "**Gate: FAILED**" in md and "evaluate.lcm4_fd_below_dpm4" in md
    assert "| method | CFG | FD |" in md
    for row in doc["methods"]:
        assert f"| {row['label']} |" in md
    assert "| ddim-50 | 2 | 0.32 | 0.9 | - | - | 100 |" in md  # the reference's own agreement reads '-'


def test_html_is_self_contained(report):
    _, paths, _ = report
    html = paths["report.html"].read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "src=\"http" not in html and "<script" not in html
    assert "&lt;dpmpp-4&gt;" in html  # text is escaped


def test_sample_grid_size():
    grid = sample_grid([torch.zeros(4, 3, 32, 32), torch.ones(4, 3, 32, 32)], ["lcm-1", "ddim-1"])
    assert grid.size == (90 + 4 * (64 + 2), 2 * (64 + 2))
    assert grid.getpixel((90, 0)) == (128, 128, 128) and grid.getpixel((90, 70)) == (255, 255, 255)


def test_table_rows_format_missing_values():
    rows = table_rows(synthetic_doc())
    assert rows[0]["method"] == "lcm-1" and rows[0]["FD"] == "1"


# --- headless Chromium ------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; installs Debian's `chromium` when missing, skips (with the reason) if it cannot."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    steps = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                              env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if proc.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install chromium succeeded but no chromium binary is on PATH")
    return found


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page target's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 20.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, name: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == name:
                return ev
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == name:
                return msg
        raise TimeoutError(name)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, deadline - time.monotonic()))))
            except TimeoutError:
                break

    def close(self) -> None:
        self.ws.close()


def _start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen, int]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
           "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("chromium did not write DevToolsActivePort within 60 s")


def open_in_chromium(binary: str, html: Path, profile: Path) -> tuple[list[dict], dict]:
    """Load a page in headless Chromium: (console/log/exception error events, page state)."""
    proc, port = _start_chromium(binary, profile)
    try:
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            tools.call(domain)
        tools.call("Page.navigate", url=html.resolve().as_uri())
        tools.wait_event("Page.loadEventFired")
        tools.drain(0.5)
        check = tools.call("Runtime.evaluate", returnByValue=True, expression=(
            "JSON.stringify({title: document.title, rows: document.querySelectorAll('tbody tr').length,"
            " images: Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth])})"))
        tools.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    errors = [ev for ev in tools.events if ev.get("method") == "Runtime.exceptionThrown"
              or (ev.get("method") == "Runtime.consoleAPICalled" and ev["params"].get("type") in ("error", "assert"))
              or (ev.get("method") == "Log.entryAdded" and ev["params"]["entry"].get("level") == "error")]
    return errors, json.loads(check["result"]["value"])


def test_html_opens_in_headless_chromium_without_console_errors(report, chromium, tmp_path):
    _, paths, _ = report
    errors, page_state = open_in_chromium(chromium, paths["report.html"], tmp_path / "profile")
    assert errors == []
    assert page_state["title"] == "LCM-LoRA evaluation: toy"
    assert page_state["rows"] == len(synthetic_doc()["methods"])
    assert [img[0] for img in page_state["images"]] == ["samples", "plot"]
    assert all(img[1] and img[2] > 0 for img in page_state["images"]), page_state["images"]


def test_the_chromium_check_sees_errors(chromium, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><title>t</title></head><body>'
                      '<img id="gone" src="missing.png"><script>throw new Error("boom")</script></body></html>')
    errors, page_state = open_in_chromium(chromium, broken, tmp_path / "profile")
    methods = {ev["method"] for ev in errors}
    assert "Runtime.exceptionThrown" in methods and "Log.entryAdded" in methods
    assert page_state["images"] == [["gone", True, 0]]
