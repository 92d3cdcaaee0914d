"""The nightly's report (components/run_summary.py): verdict, Markdown and terminal lines."""

from __future__ import annotations

from components.run_summary import stage_row, summary_lines, summary_markdown, verdict


def _summary(skipped: bool) -> dict:
    stages = [stage_row(s, {"skipped": skipped, "key": f"{s}-k"}) for s in ("curate", "encode", "distill")]
    stages.append(stage_row("merge", {"skipped": True, "key": "-", "note": "not run: no style LoRA"}))
    published = {"reference": "toy-lcm-lora:3", "alias": "candidate", "registry": "/r", "skipped": skipped,
                 "pull": "lcmlora registry pull toy-lcm-lora@candidate --to DIR",
                 "variants": [{"reference": "toy-lcm-lora-ink:1", "alias": "candidate", "registry": "/r",
                               "skipped": False, "pull": "lcmlora registry pull toy-lcm-lora-ink@candidate --to DIR"}]}
    return {"bases": {"toy": {"status": "completed", "stages": stages, "published": published},
                      "xl": {"status": "failed", "error": "GateFailed: xl: evaluation gate failed"}}}


def test_verdict_names_trained_failed_and_unchanged():
    ran = _summary(skipped=False)
    assert verdict(ran) == "FAILED: xl. Trained: toy; ran: toy/curate, toy/encode, toy/distill."
    unchanged = _summary(skipped=True)
    del unchanged["bases"]["xl"]
    assert verdict(unchanged) == "Nothing changed since the last run: every stage was skipped, no training was done."
    unchanged["bases"]["xl"] = {"status": "failed", "error": "x"}
    assert verdict(unchanged) == "FAILED: xl. No other stage ran and no training was done."


def test_markdown_has_a_row_per_stage_and_the_pull_commands():
    summary = _summary(skipped=False)
    summary["verdict"] = verdict(summary)
    md = summary_markdown(summary)
    assert "| toy | distill | ran | `distill-k` |" in md
    assert "| toy | merge | not run: no style LoRA | `-` |" in md
    assert "| xl | - | **failed**: GateFailed: xl: evaluation gate failed | |" in md
    assert "- **toy**: toy-lcm-lora-ink:1 (alias `candidate`)" in md
    assert md.rstrip().endswith(summary["verdict"])


def test_terminal_lines_say_what_was_published_and_how_to_pull():
    summary = _summary(skipped=True)
    summary["verdict"] = verdict(summary)
    lines = summary_lines(summary)
    assert lines[0] == "base toy: completed"
    assert "  curate    skipped (unchanged)  curate-k" in lines
    assert "  published toy-lcm-lora:3 to /r (alias candidate) (already published: unchanged)" in lines
    assert "  pull it:  lcmlora registry pull toy-lcm-lora-ink@candidate --to DIR" in lines
    assert "base xl: FAILED: GateFailed: xl: evaluation gate failed" in lines
    assert lines[-1] == summary["verdict"]
