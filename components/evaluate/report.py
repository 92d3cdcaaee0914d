"""The evaluation report: a Markdown page, a self-contained HTML page (images embedded as base64),
a sample grid PNG (rows: methods, columns: prompts) and a metric-versus-steps plot.

Input is the metrics document that `lcmlora evaluate` writes as metrics.json (see
`components/evaluate/evaluation.py`) plus the grid images; nothing here samples or measures.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

COLUMNS = [  # (key in a row, header, format)
    ("label", "method", "{}"),
    ("guidance_scale", "CFG", "{:g}"),
    ("fd", "FD", "{:.4g}"),
    ("adherence", "adherence", "{:.4g}"),
    ("psnr", "PSNR vs ref (dB)", "{:.2f}"),
    ("ssim", "SSIM vs ref", "{:.3f}"),
    ("unet_evals_per_image", "UNet evals / image", "{:g}"),
    ("seconds_per_image", "s / image", "{:.4f}"),
]
REPORT_FILES = ("report.md", "report.html", "samples.png", "metrics_vs_steps.png")
_PLOTTED = [("fd", "Frechet distance (lower is better)"), ("adherence", "prompt adherence"),
            ("ssim", "SSIM vs teacher reference"), ("seconds_per_image", "seconds per image")]


def format_value(value: Any, fmt: str) -> str:
    """One table cell; missing or non-finite values read as '-'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def table_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The metric table as formatted strings, one dict per method, in report order (for Prefect too)."""
    return [{header: format_value(row.get(key), fmt) for key, header, fmt in COLUMNS} for row in doc["methods"]]


def markdown_table(rows: list[dict[str, str]]) -> str:
    headers = list(rows[0]) if rows else [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r[h] for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def sample_grid(images: list[torch.Tensor], row_labels: list[str], min_cell: int = 64) -> Image.Image:
    """A labelled grid: images[r] is C x 3 x H x W in [-1, 1] (one per prompt column) for method row r."""
    if not images:
        raise ValueError("sample_grid: no rows")
    n_cols, height, width = images[0].shape[0], images[0].shape[-2], images[0].shape[-1]
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_h, cell_w, label_w, pad = height * scale, width * scale, 90, 2
    font = ImageFont.load_default()
    grid = Image.new("RGB", (label_w + n_cols * (cell_w + pad), len(images) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(images, row_labels)):
        top = r * (cell_h + pad)
        draw.text((4, top + cell_h // 2 - 6), label, fill="black", font=font)
        arr = ((row.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        for c in range(n_cols):
            tile = Image.fromarray(arr[c].permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * (cell_w + pad), top))
    return grid


def plot_metrics_vs_steps(doc: dict[str, Any], path: Path) -> Path:
    """One panel per metric, one line per sampler, steps on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(4.2 * len(_PLOTTED), 3.4))
    samplers = list(dict.fromkeys(row["sampler"] for row in doc["methods"]))
    for ax, (key, title) in zip(axes, _PLOTTED):
        for sampler in samplers:
            pts = [(row["steps"], row.get(key)) for row in doc["methods"] if row["sampler"] == sampler]
            pts = [(s, v) for s, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=sampler)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gate_markdown(gate: dict[str, Any]) -> list[str]:
    lines = [f"**Gate: {'PASSED' if gate.get('passed') else 'FAILED'}**", ""]
    lines += [f"- violation: {v}" for v in gate.get("violations", [])]
    lines += [f"- skipped (switched off in params): {k}" for k in gate.get("skipped", [])]
    return lines


def _header_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    info = doc.get("info", {})
    lora = doc.get("lora")
    if isinstance(lora, dict):  # {file, sha256}
        lora = f"{lora.get('file')} (sha256 {str(lora.get('sha256'))[:16]})"
    return [("base", str(doc.get("base"))), ("LoRA", str(lora)),
            ("images per method", str(info.get("images_per_method"))),
            ("Frechet features", str(info.get("feature_backbone"))), ("adherence", str(info.get("adherence"))),
            ("teacher agreement reference", str(info.get("agreement_reference")))]


def render_markdown(doc: dict[str, Any], prompts: list[str]) -> str:
    lines = [f"# LCM-LoRA evaluation: {doc.get('base')}", ""]
    lines += [f"- {k}: {v}" for k, v in _header_lines(doc)] + [""]
    lines += _gate_markdown(doc.get("gate", {})) + ["", "## Metrics", "", markdown_table(table_rows(doc)), ""]
    lines += [("PSNR and SSIM compare each method with the teacher's reference run from the same noise; "
              "LCMScheduler injects fresh noise between steps, so agreement at 2+ steps is low by design."), ""]
    lines += ["## Samples", "", "Rows: methods; columns: prompts " + ", ".join(
        f"({i + 1}) {p}" for i, p in enumerate(prompts)), "", "![samples](samples.png)", ""]
    lines += ["## Metrics versus steps", "", "![metrics versus steps](metrics_vs_steps.png)", ""]
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(doc: dict[str, Any], prompts: list[str], grid_png: Path, plot_png: Path) -> str:
    esc = html.escape
    rows = table_rows(doc)
    headers = list(rows[0]) if rows else []
    gate = doc.get("gate", {})
    status = "PASSED" if gate.get("passed") else "FAILED"
    items = "".join(f"<li>violation: {esc(v)}</li>" for v in gate.get("violations", []))
    items += "".join(f"<li>skipped (switched off in params): {esc(k)}</li>" for k in gate.get("skipped", []))
    table = ("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{esc(r[h])}</td>" for h in headers) + "</tr>" for r in rows)
             + "</tbody></table>")
    facts = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in _header_lines(doc))
    prompt_list = "".join(f"<li>{esc(p)}</li>" for p in prompts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LCM-LoRA evaluation: {esc(str(doc.get('base')))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.gate-PASSED {{ color: #176b2c; }} .gate-FAILED {{ color: #a3161b; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head>
<body>
<h1>LCM-LoRA evaluation: {esc(str(doc.get('base')))}</h1>
<ul>{facts}</ul>
<h2 class="gate-{status}">Gate: {status}</h2>
<ul>{items}</ul>
<h2>Metrics</h2>
{table}
<p>PSNR and SSIM compare each method with the teacher's reference run from the same noise; LCMScheduler
injects fresh noise between steps, so agreement at 2+ steps is low by design.</p>
<h2>Samples</h2>
<p>Rows: methods; columns: prompts, in this order:</p>
<ol>{prompt_list}</ol>
<img id="samples" alt="sample grid" src="{_data_uri(grid_png)}">
<h2>Metrics versus steps</h2>
<img id="plot" alt="metrics versus steps" src="{_data_uri(plot_png)}">
</body></html>
"""


def write_report(doc: dict[str, Any], prompts: list[str], grid_images: list[torch.Tensor], output: str | Path) -> dict[str, Path]:
    """Write report.md, report.html, samples.png, metrics_vs_steps.png into `output`; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {name: output / name for name in REPORT_FILES}
    labels = [row["label"] for row in doc["methods"]]
    sample_grid(grid_images, labels).save(paths["samples.png"])
    plot_metrics_vs_steps(doc, paths["metrics_vs_steps.png"])
    paths["report.md"].write_text(render_markdown(doc, prompts))
    paths["report.html"].write_text(render_html(doc, prompts, paths["samples.png"], paths["metrics_vs_steps.png"]))
    return paths

