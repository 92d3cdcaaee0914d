"""`dvc exp run -S key=value` on the project's params.yaml: every setting survives DVC's rewrite.

DVC rewrites the whole params file when it applies `-S` (ruamel.yaml, YAML 1.2: quotes dropped
where 1.2 does not need them, so `mixed_precision: "no"` comes back as `mixed_precision: no`).
The test runs the real dvc executable in a git + DVC repo holding the project's params.yaml and a
stage that only loads them, then loads the rewritten file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import Params, load_params
from components.dvc_runner import dvc_executable
from tests.toy_short import REPO

pytestmark = pytest.mark.integration

# the stage: load params.yaml as every lcmlora command does, write what it read
LOAD = 'from components.config import load_params; open("loaded.json", "w").write(load_params("params.yaml").to_json())'


def _sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _experiment_repo(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A committed git + DVC repo: the project's params.yaml and one stage that loads it."""
    repo = tmp / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
                "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    stage = {"cmd": f"{shlex.quote(sys.executable)} -c {shlex.quote(LOAD)}", "params": ["distill", "merge"],
             "outs": [{"loaded.json": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"load": stage}}, sort_keys=False))
    (repo / ".gitignore").write_text("loaded.json\n")
    _sh(["git", "init", "-q"], repo, env)
    _sh([dvc_executable(), "init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "params"], repo, env)
    return repo, env


def _with(params: Params, section: str, key: str, value: object) -> Params:
    return params.model_copy(update={section: getattr(params, section).model_copy(update={key: value})})


@pytest.mark.parametrize(("override", "section", "key", "value"), [
    ("merge.reference_steps=30", "merge", "reference_steps", 30),
    ("distill.mixed_precision=no", "distill", "mixed_precision", "no"),  # a sweep's value, as DVC writes it
])
def test_exp_run_set_rewrites_params_yaml_and_every_setting_survives(
        tmp_path: Path, override: str, section: str, key: str, value: object) -> None:
    repo, env = _experiment_repo(tmp_path)
    original = load_params(REPO / "params.yaml")

    _sh([dvc_executable(), "exp", "run", "-S", override], repo, env)  # fails if the stage could not load params

    rewritten = (repo / "params.yaml").read_text()
    assert rewritten != (REPO / "params.yaml").read_text(), "DVC rewrote the file"
    assert "mixed_precision: no " in rewritten, "DVC's dump drops the quotes around 'no'"
    expected = _with(original, section, key, value)
    assert load_params(repo / "params.yaml").model_dump() == expected.model_dump()
    assert (repo / "loaded.json").read_text() == expected.to_json()  # what the stage itself read
