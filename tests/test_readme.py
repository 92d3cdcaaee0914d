"""The README opens with exactly the two set-up commands, and .ci/run runs the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL)[:2]


def test_readme_opens_with_main_job_and_test_command():
    main_job, tests = _setup_commands()
    head = (ROOT / "README.md").read_text().split("```bash", 1)[0]
    assert head.strip() == "# lcmlora"  # nothing before the two commands but the title
    assert "python3 -m venv .venv" in main_job and main_job.endswith("lcmlora nightly")
    assert "python3 -m venv .venv" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
