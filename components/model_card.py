"""The model card of a LoRA folder: `README.md` with YAML front matter, as on the HF Hub.

Front matter every lcmlora LoRA carries (the registry refuses a card without it):

    ---
    base_model: stabilityai/stable-diffusion-xl-base-1.0   # the base reference
    library_name: diffusers
    tags: [lora, lcm, lcm-lora, text-to-image, stable-diffusion]
    recommended:
      num_inference_steps: 4      # LCM-LoRA's few-step regime
      guidance_scale: 1.0         # LCM sampling needs little or no CFG
      scheduler: LCMScheduler
    ---
"""

from __future__ import annotations

from typing import Any

import yaml

DEFAULT_TAGS = ("lora", "lcm", "lcm-lora", "text-to-image", "stable-diffusion", "diffusers")
DEFAULT_STEPS = 4  # the report's headline 4-step sampling
DEFAULT_GUIDANCE = 1.0  # LCM bakes guidance into the distilled model (w in Eq. 4 of the report)


class ModelCardError(ValueError):
    """A README.md whose front matter is missing or incomplete; lists every problem."""


def render_model_card(*, base_model: str, title: str, tags: list[str] | tuple[str, ...] = DEFAULT_TAGS,
                      num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                      body: str = "", extra: dict[str, Any] | None = None) -> str:
    """A README.md text with the front matter above and a short usage section."""
    front: dict[str, Any] = {
        "base_model": base_model,
        "library_name": "diffusers",
        "tags": list(dict.fromkeys(tags)),
        "recommended": {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
                        "scheduler": "LCMScheduler"},
        **(extra or {}),
    }
    usage = (
        f"# {title}\n\n"
        f"An LCM-LoRA acceleration module for `{base_model}`: sample in {num_inference_steps} steps.\n\n"
        "```python\n"
        "from diffusers import DiffusionPipeline, LCMScheduler\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}")\n'
        "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
        'pipe.load_lora_weights("path/to/this/folder")\n'
        f'image = pipe("a prompt", num_inference_steps={num_inference_steps}, '
        f"guidance_scale={guidance_scale}).images[0]\n"
        "```\n"
    )
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{usage}{body}"


def parse_model_card(text: str, source: str = "README.md") -> tuple[dict[str, Any], str]:
    """Split a card into (front matter, body); ModelCardError if there is no front matter."""
    if not text.startswith("---"):
        raise ModelCardError(f"{source}: no YAML front matter (the file must start with a '---' line)")
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise ModelCardError(f"{source}: YAML front matter is not closed by a '---' line")
    try:
        front = yaml.safe_load(parts[0][3:]) or {}
    except yaml.YAMLError as exc:
        raise ModelCardError(f"{source}: front matter is not valid YAML: {exc}") from None
    if not isinstance(front, dict):
        raise ModelCardError(f"{source}: front matter must be a mapping")
    return front, parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""


def check_model_card(text: str, source: str = "README.md") -> dict[str, Any]:
    """Validate the front matter; raise ModelCardError listing every missing or wrong key."""
    front, _ = parse_model_card(text, source)
    problems = []
    if not isinstance(front.get("base_model"), str) or not front.get("base_model"):
        problems.append("base_model: missing (the base reference this LoRA was trained for)")
    if front.get("library_name") != "diffusers":
        problems.append(f"library_name: expected 'diffusers', found {front.get('library_name')!r}")
    tags = front.get("tags")
    if not isinstance(tags, list) or not tags:
        problems.append("tags: missing or not a list")
    rec = front.get("recommended")
    if not isinstance(rec, dict):
        problems.append("recommended: missing (a mapping with num_inference_steps and guidance_scale)")
    else:
        if not isinstance(rec.get("num_inference_steps"), int) or rec["num_inference_steps"] < 1:
            problems.append("recommended.num_inference_steps: missing or not a positive integer")
        if not isinstance(rec.get("guidance_scale"), int | float):
            problems.append("recommended.guidance_scale: missing or not a number")
    if problems:
        raise ModelCardError(f"{source}: model card front matter incomplete:\n  - " + "\n  - ".join(problems))
    return front
