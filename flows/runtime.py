"""Where the `lcmlora` CLI's flows report to: a Prefect server if one is configured, else ephemeral.

A fresh clone has no Prefect server and no profile. Then the CLI keeps Prefect's state in
`./.prefect` (git-ignored) and runs flows against Prefect's ephemeral API (a temporary local
server started by the flow itself), so `lcmlora nightly` works with nothing set up. A user who
configured a server (`PREFECT_API_URL` in the environment or in a Prefect profile) or chose
their own `PREFECT_HOME` keeps it: runs then appear in that server's UI.
Must run before `prefect` is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

USER_PROFILES = Path("~/.prefect/profiles.toml").expanduser()


def has_configured_server(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when the user pointed Prefect somewhere: env vars or a profile with an API URL."""
    if any(environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH")):
        return True
    return USER_PROFILES.is_file() and "PREFECT_API_URL" in USER_PROFILES.read_text(errors="replace")


def prefect_environment(workdir: str | Path = ".") -> str:
    """Set Prefect's home and telemetry defaults for a CLI run; returns a line saying which API is used."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if has_configured_server():
        return f"Prefect API: {os.environ.get('PREFECT_API_URL') or 'from your Prefect profile'}"
    home = (Path(workdir) / ".prefect").absolute()
    os.environ["PREFECT_HOME"] = str(home)
    return f"Prefect API: ephemeral (state in {home}); set PREFECT_API_URL to report to a server"
