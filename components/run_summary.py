"""What a nightly or new-base run did, as text: a Markdown report and terminal lines (pure).

A run summary is the dict the flows build:

    {"bases": {NAME: {"status": "completed" | "failed", "error": str,
                      "stages": [{"stage", "skipped", "key", "note"}, ...],
                      "published": {"reference", "alias", "registry", "pull", "skipped",
                                    "variants": [...]}}},
     "verdict": str}
"""

from __future__ import annotations

from typing import Any


def stage_row(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """One stage's line in the summary: name, whether the cache served it, its key, a note."""
    return {"stage": name, "skipped": outcome["skipped"], "key": outcome["key"], "note": outcome.get("note")}


def stage_verdict(stage: dict[str, Any]) -> str:
    """`ran`, `skipped (unchanged)`, or the stage's own note."""
    return stage.get("note") or ("skipped (unchanged)" if stage["skipped"] else "ran")


def published_entries(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The base's published LoRAs (one per objective) and their published style variants, in that order."""
    runs = [base, *(base.get("objectives") or {}).values()]
    entries, seen = [], set()
    for run in runs:
        published = run.get("published")
        if published and published.get("reference") not in seen:
            seen.add(published.get("reference"))
            entries += [published, *published.get("variants", [])]
    return entries


def verdict(summary: dict[str, Any]) -> str:
    """One sentence: what this run trained, or that nothing changed; failed bases first."""
    failed = [n for n, b in summary["bases"].items() if b["status"] == "failed"]
    ran = [f"{n}/{s['stage']}" for n, b in summary["bases"].items() for s in b.get("stages", []) if not s["skipped"]]
    trained = [r.split("/")[0] for r in ran if r.endswith("/distill")]
    prefix = f"FAILED: {', '.join(failed)}. " if failed else ""
    if not ran:
        if failed:
            return f"{prefix}No other stage ran and no training was done."
        return "Nothing changed since the last run: every stage was skipped, no training was done."
    if not trained:
        return f"{prefix}No training was done (distillation unchanged); ran: {', '.join(ran)}."
    return f"{prefix}Trained: {', '.join(trained)}; ran: {', '.join(ran)}."


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run's report: one row per base and stage, then what was published, then the verdict."""
    lines = ["# lcmlora nightly", "", "| base | stage | result | key |", "|---|---|---|---|"]
    for name, base in summary["bases"].items():
        if base["status"] == "failed":
            lines.append(f"| {name} | - | **failed**: {base['error']} | |")
        for stage in base.get("stages", []):
            lines.append(f"| {name} | {stage['stage']} | {stage_verdict(stage)} | `{stage['key']}` |")
    lines.append("")
    for name, base in summary["bases"].items():
        for p in published_entries(base):
            lines.append(f"- **{name}**: {p['reference']} (alias `{p['alias']}`); pull with `{p['pull']}`")
    lines.append("")
    lines.append(summary["verdict"])
    return "\n".join(lines) + "\n"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The same report as plain lines for the terminal, ending with how to pull what was published."""
    lines = []
    for name, base in summary["bases"].items():
        if base["status"] == "failed":
            lines.append(f"base {name}: FAILED: {base['error']}")
            continue
        lines.append(f"base {name}: completed")
        for stage in base.get("stages", []):
            lines.append(f"  {stage['stage']:<9} {stage_verdict(stage):<20} {stage['key']}")
        for p in published_entries(base):
            again = " (already published: unchanged)" if p["skipped"] else ""
            lines.append(f"  published {p['reference']} to {p['registry']} (alias {p['alias']}){again}")
            lines.append(f"  pull it:  {p['pull']}")
    lines.append(summary["verdict"])
    return lines
