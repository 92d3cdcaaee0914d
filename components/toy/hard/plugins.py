"""The hard toy's entry points into production: its judges (`toy-hard` in group `lcmlora.judges`)
and its source writer (`toy-hard` in group `lcmlora.sources`).

- Frechet features: `HardJudges.features`, both halves' 64-d features side by side (128-d).
- Prompt adherence: the share of images whose four readings (left digit, left colour, right
  digit, right colour) all equal what the prompt names. Prompts are the captions of
  `render.py:caption_for`, in either word order; any other prompt is an error.
- Reference images: real renders of the evaluation prompts' own scenes, jittered as the hard
  source renders them, each digit drawn from all 1,797 sklearn digits of its label (the source
  and the bases use all of them too), so the FD compares like with like: the same scenes, real
  against generated.
- Default prompts: `data/prompts/toy-hard.txt` (40 captions: every digit and colour on both sides,
  both word orders).
- Style: the hard style strength (`style_metric.py`: LDA over colour and stripe statistics, plain
  renders 0, hard-style renders 1) of the style evaluate.style names (blue-ruled unless set; `style.py`),
  fitted on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.config import EvaluateConfig
from components.evaluate.adherence import AdherenceMetric
from components.evaluate.evaluation import load_prompts
from components.evaluate.judges import Judges, load_reference_images
from components.paths import project_path
from components.toy.hard.config import HardToyConfig, hard_toy_config
from components.toy.hard.render import (
    COLOURS,
    DIGIT_WORDS,
    Scene,
    pil_to_tensor_array,
    render_scene,
)
from components.toy.hard.source import source_settings, write_source
from components.toy.hard.style import DEFAULT_STYLE
from components.toy.hard.style_metric import LazyHardStyle
from components.toy.source import ToySource

HARD_PROMPTS = "data/prompts/toy-hard.txt"  # the hard judges' prompt file when evaluate.prompts is unset
REFERENCES_PER_PROMPT = 25  # real renders per evaluation prompt in the FD reference set
_PART = rf"a ({'|'.join(COLOURS)}) ({'|'.join(DIGIT_WORDS)}) on the (left|right)"
_CAPTION = re.compile(rf"\s*{_PART} and {_PART}\s*")


def scene_for_prompt(prompt: str) -> Scene:
    """The scene a hard caption names, in either word order:
    "a red seven on the left and a blue two on the right" -> Scene(7, 0, 2, 2)."""
    found = _CAPTION.fullmatch(prompt.lower())
    if found is None or found.group(3) == found.group(6):
        raise ValueError(f"prompt {prompt!r} names no hard toy scene; hard adherence needs captions such as "
                         "'a red seven on the left and a blue two on the right' (components/toy/hard/render.py)")
    parts = {found.group(3): found.group(1, 2), found.group(6): found.group(4, 5)}
    (lc, ld), (rc, rd) = parts["left"], parts["right"]
    return Scene(DIGIT_WORDS.index(ld), COLOURS.index(lc), DIGIT_WORDS.index(rd), COLOURS.index(rc))


def hard_adherence_metric(judges) -> AdherenceMetric:
    """Share of images (B x 3 x H x W in [-1, 1]) whose four readings all match their prompt's scene."""

    def metric(images: torch.Tensor, prompts: list[str]) -> float:
        want = torch.tensor([scene_for_prompt(p).parts() for p in prompts])
        reads = torch.cat([judges.read(images[i:i + 256]) for i in range(0, images.shape[0], 256)])
        return float((reads.cpu() == want).all(dim=1).double().mean())

    return metric


def hard_reference_images(prompts: list[str], per_prompt: int = REFERENCES_PER_PROMPT, seed: int = 0,
                          layout: str = "narrow") -> torch.Tensor:
    """`per_prompt` jittered real renders of each prompt's scene in `layout`: N x 3 x 64 x 64 in [-1, 1].

    Each render draws its two digit images at random among all sklearn digits of the named labels.
    """
    from components.toy.classifier import load_sklearn_digits

    images8, labels = load_sklearn_digits()
    by_label = [np.flatnonzero(labels == d) for d in range(10)]
    rng = np.random.default_rng(seed)
    arrays = []
    for prompt in prompts:
        scene = scene_for_prompt(prompt)
        for _ in range(per_prompt):
            i, j = rng.choice(by_label[scene.left_digit]), rng.choice(by_label[scene.right_digit])
            arrays.append(pil_to_tensor_array(render_scene(images8[i], images8[j], scene, rng, layout=layout)))
    return torch.from_numpy(np.stack(arrays))


def hard_judges_dir() -> Path:
    """The committed judges folder (HardToyConfig's judges_dir, found from any working directory)."""
    return project_path(HardToyConfig().judges_dir)


@dataclass(frozen=True)
class HardJudgesProvider:
    """The hard judges provider (components/evaluate/judges.py): `provider(cfg, resolution)` builds the
    judges, `provider.problems(cfg)` says what they lack (no model is loaded), for the preflight."""

    def __call__(self, cfg: EvaluateConfig, resolution: int) -> Judges:
        """HardJudges features and four-part adherence, prompt-matched real renders (or evaluate.reference_images)."""
        from components.toy.hard.judges import load_judges

        judges = load_judges(hard_judges_dir(), cfg.device)
        if cfg.reference_images:
            reference = load_reference_images(cfg.reference_images, resolution)
        else:
            reference = hard_reference_images(load_prompts(cfg.prompts or HARD_PROMPTS), seed=cfg.seed,
                                              layout=judges.layout)
        return Judges(judges.features, "hard toy judges' features (both halves, 128-d)", hard_adherence_metric(judges),
                      "hard toy adherence (both digits, colours and sides right)", reference,
                      style=LazyHardStyle(judges.layout, cfg.style or DEFAULT_STYLE),
                      style_name="hard toy style strength (LDA over colour and stripe statistics)",
                      default_prompts=HARD_PROMPTS)

    def problems(self, cfg: EvaluateConfig) -> list[str]:
        """The missing judges weights, named with the command that builds them."""
        folder = hard_judges_dir()
        if not (folder / "model.safetensors").is_file():
            return [(f"{folder}: no hard toy judges (model.safetensors); build them with "
                     "`python -m components.toy.hard judges`")]
        return []


hard_judges = HardJudgesProvider()  # entry point `toy-hard` of group `lcmlora.judges`

# Entry point `toy-hard` of group `lcmlora.sources`: the hard source in toy.hard.source_dir. An existing
# source written with other settings (seed, scenes, look fraction, layout) is refused by name, as by
# `lcmlora reproduce --toy --hard`.
ensure_hard_source = ToySource(lambda params: hard_toy_config(params).source_dir, write_source, source_settings)
