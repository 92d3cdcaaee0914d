"""The model card of a LoRA folder: `README.md` with YAML front matter, built with huggingface_hub's
`ModelCard` / `ModelCardData` so the Hub reads it as it reads its own.

Front matter every lcmlora LoRA carries (the registry refuses a card without it):

    ---
    base_model: stabilityai/stable-diffusion-xl-base-1.0   # a hub id only (bases.NAME.hub_id); a local
    base_model_relation: adapter                           #   base leaves both keys out; merged style
    library_name: diffusers                                #   variants: merge
    license: openrail++                                    # bases.NAME.license, when set
    pipeline_tag: text-to-image
    tags: [lora, lcm, lcm-lora, text-to-image, stable-diffusion]
    recommended:
      num_inference_steps: 4      # LCM-LoRA's few-step regime
      guidance_scale: 1.0         # LCM sampling needs little or no CFG
      scheduler: LCMScheduler
    ---

The Hub's metadata fields: https://huggingface.co/docs/hub/model-cards#model-card-metadata
(`base_model_relation`: https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from components.lora.objective import SamplingRecipe
from components.lora.objective import recipe as lcm_recipe

DEFAULT_TAGS = ("lora", "lcm", "lcm-lora", "text-to-image", "stable-diffusion", "diffusers")
PCM_TAGS = ("lora", "pcm", "pcm-lora", "text-to-image", "stable-diffusion", "diffusers")
DEFAULT_STEPS = 4  # the report's headline 4-step sampling
DEFAULT_GUIDANCE = 1.0  # LCM bakes guidance into the distilled model (w in Eq. 4 of the report)
PIPELINE_TAG = "text-to-image"
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")  # the Hub's documented base_model_relation values
Relation = Literal["adapter", "merge"]  # an LCM-LoRA is an adapter; a style variant merges two LoRAs


class ModelCardError(ValueError):
    """A README.md whose front matter is missing or incomplete; lists every problem."""


def is_hub_id(value: str | None) -> bool:
    """`owner/name` that huggingface_hub accepts as a repo id and that is not a local path."""
    if not value or Path(value).expanduser().exists() or not re.fullmatch(r"[^/\s]+/[^/\s]+", value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not value.endswith((".safetensors", ".ckpt"))


def hub_base_model(reference: str | None, hub_id: str | None = None) -> str | None:
    """The card's `base_model`: `hub_id`, else the reference when it is a hub id; a local base: None."""
    return next((v for v in (hub_id, reference) if is_hub_id(v)), None)


def render_model_card(*, base_model: str | None, title: str, tags: list[str] | tuple[str, ...] = DEFAULT_TAGS,
                      num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                      body: str = "", extra: dict[str, Any] | None = None, relation: Relation = "adapter",
                      hub_id: str | None = None, license: str | None = None,
                      recipe: SamplingRecipe | None = None) -> str:
    """A README.md text with the front matter above and a short usage section.

    `base_model` is the base's reference; only a hub id (or `hub_id`) reaches the card. `recipe`: how
    the LoRA samples (its objective's scheduler, e.g. TCDScheduler at gamma 0 for a PCM-LoRA); None:
    an LCM-LoRA with LCMScheduler.
    """
    recipe = recipe or lcm_recipe()
    hub_base = hub_base_model(base_model, hub_id)
    data = ModelCardData(base_model=hub_base, library_name="diffusers", license=license, pipeline_tag=PIPELINE_TAG,
                         tags=list(dict.fromkeys(tags)), ignore_metadata_errors=False,
                         **({"base_model_relation": relation} if hub_base else {}),
                         recommended={"num_inference_steps": int(num_inference_steps),
                                      "guidance_scale": float(guidance_scale), "scheduler": recipe.scheduler,
                                      **({"eta": recipe.eta} if recipe.eta is not None else {}),
                                      **({"timesteps": list(recipe.timesteps)} if recipe.timesteps else {})},
                         **(extra or {}))
    # A local base's path stays off the card, so its snippet names a placeholder; the comment gets its own
    # line because one after the argument would swallow the closing parenthesis.
    load_base = (f'pipe = DiffusionPipeline.from_pretrained("{hub_base}")\n' if hub_base else
                 "# BASE_MODEL: the base this LoRA was trained for (its folder or hub id)\n"
                 'pipe = DiffusionPipeline.from_pretrained("BASE_MODEL")\n')
    kind = ("An LCM-LoRA acceleration module" if recipe.objective == "lcm" else
            f"A PCM-LoRA (phased consistency, {recipe.phases} phases) acceleration module")
    eta = f", eta={recipe.eta}" if recipe.eta is not None else ""  # TCD's gamma 0: deterministic phase edges
    if recipe.timesteps:  # the phase edges it was trained on (TCD's own pick for N steps can miss them)
        eta += f", timesteps={list(recipe.timesteps)}"
    usage = (
        f"# {title}\n\n"
        f"{kind} for `{hub_base or 'its base model'}`: sample in "
        f"{num_inference_steps} steps.\n\n"
        "```python\n"
        f"from diffusers import DiffusionPipeline, {recipe.scheduler}\n\n"
        f"{load_base}"
        f"pipe.scheduler = {recipe.scheduler}.from_config(pipe.scheduler.config)\n"
        'pipe.load_lora_weights("path/to/this/folder")\n'
        f'image = pipe("a prompt", num_inference_steps={num_inference_steps}, '
        f"guidance_scale={guidance_scale}{eta}).images[0]\n"
        "```\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{usage}{body}", ignore_metadata_errors=False))


def parse_model_card(text: str, source: str = "README.md") -> tuple[dict[str, Any], str]:
    """Split a card into (front matter, body) as huggingface_hub reads it; ModelCardError if it has none."""
    if not text.startswith("---"):
        raise ModelCardError(f"{source}: no YAML front matter (the file must start with a '---' line)")
    if "\n---" not in text[3:]:
        raise ModelCardError(f"{source}: YAML front matter is not closed by a '---' line")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except yaml.YAMLError as exc:
        raise ModelCardError(f"{source}: front matter is not valid YAML: {exc}") from None
    except ValueError as exc:
        raise ModelCardError(f"{source}: front matter must be a mapping ({exc})") from None
    return card.data.to_dict(), card.text


def hub_problems(front: dict[str, Any]) -> list[str]:
    """What the Hub would read wrongly in a card's front matter (older cards named a local base_model)."""
    problems = []
    base = front.get("base_model")
    if base is not None and not is_hub_id(base):
        problems.append(f"base_model: {base!r} is not a hub id (owner/name); set bases.NAME.hub_id or leave it out")
    relation = front.get("base_model_relation")
    if relation is not None and relation not in HUB_RELATIONS:
        problems.append(f"base_model_relation: {relation!r} is not one of {', '.join(HUB_RELATIONS)}")
    if base is not None and relation is None:
        problems.append("base_model_relation: missing (adapter for an LCM-LoRA, merge for a style variant)")
    if front.get("pipeline_tag") != PIPELINE_TAG:
        problems.append(f"pipeline_tag: expected {PIPELINE_TAG!r}, found {front.get('pipeline_tag')!r}")
    return problems


def check_model_card(text: str, source: str = "README.md") -> dict[str, Any]:
    """Validate the front matter the registry needs; raise ModelCardError listing every missing or wrong key.

    `base_model` is optional (a local base has none); `hub_problems` checks what the Hub needs.
    """
    front, _ = parse_model_card(text, source)
    problems = []
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
