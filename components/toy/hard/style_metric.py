"""Hard toy style strength: the easy toy's metric (`components/toy/style_metric.py`, an LDA over
global colour and stripe statistics, calibrated plain = 0, styled = 1) fitted on 64-px hard scenes
rendered plain (`render.py:render_scene`) and in one hard style (`style.py:render_scene_styled`,
blue-ruled unless named), the same scenes and jitter in both. `LazyHardStyle` is the hard judges'
`style` scorer (evaluate.style names the style it scores).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from components.toy.hard.style import DEFAULT_STYLE
from components.toy.style_metric import StyleMetric, fit_style_metric


def hard_style_renders(count: int = 400, seed: int = 0, layout: str = "narrow",
                       style: str = DEFAULT_STYLE) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random scenes (in `layout`) rendered plain and in `style`, same digits and jitter: two
    N x 3 x 64 x 64 in [-1, 1]."""
    from components.toy.classifier import load_sklearn_digits
    from components.toy.hard.render import pil_to_tensor_array, random_scene, render_scene
    from components.toy.hard.style import render_scene_styled

    images8, labels = load_sklearn_digits()
    rng = np.random.default_rng(seed)
    plain, styled = [], []
    for _ in range(count):
        scene, i, j, _ = random_scene(labels, rng)
        state = rng.bit_generator.state  # both renders draw the same jitter
        plain.append(pil_to_tensor_array(render_scene(images8[i], images8[j], scene, rng, layout=layout)))
        rng.bit_generator.state = state
        styled.append(pil_to_tensor_array(render_scene_styled(images8[i], images8[j], scene, rng, layout, style)))
    return torch.from_numpy(np.stack(plain)), torch.from_numpy(np.stack(styled))


def hard_style_metric(count: int = 400, seed: int = 0, layout: str = "narrow", style: str = DEFAULT_STYLE) -> StyleMetric:
    """The metric of hard style `style`, fitted on fresh renders in `layout` (deterministic for a seed; about a second)."""
    from components.toy.hard.style import hard_style

    return fit_style_metric(*hard_style_renders(count, seed, layout, style),
                            stripe_half_period=hard_style(style).stripe_half_period)


def style_through_vae(vae, count: int = 200, seed: int = 1, metric: StyleMetric | None = None,
                      layout: str = "narrow", style: str = DEFAULT_STYLE) -> dict[str, float]:
    """How much of the hard style `style` `vae` can show at all: mean style strength of `count` fresh scenes
    rendered plain and styled, as rendered and after an encode / decode round trip (latent mean).
    A sampler on this base cannot draw more style than `styled_through_vae`; the merge claim's
    reference is read against it (docs/toy-hard.md, "Merge claim")."""
    metric = metric or hard_style_metric(layout=layout, style=style)
    plain, styled = hard_style_renders(count, seed, layout, style)
    device, dtype = vae.device, vae.dtype

    @torch.no_grad()
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        out = [vae.decode(vae.encode(b.to(device, dtype)).latent_dist.mean).sample.float().clamp(-1, 1).cpu()
               for b in images.split(50)]
        return torch.cat(out)

    return {"plain": metric.mean_strength(plain), "styled": metric.mean_strength(styled),
            "plain_through_vae": metric.mean_strength(round_trip(plain)),
            "styled_through_vae": metric.mean_strength(round_trip(styled))}


class LazyHardStyle:
    """The metric of hard style `style` (fitted on renders in `layout`, the judges'), fitted the first time a
    merge asks for it."""

    def __init__(self, layout: str = "narrow", style: str = DEFAULT_STYLE) -> None:
        from components.toy.hard.style import hard_style

        self.layout, self.style = layout, hard_style(style).name

    @cached_property
    def metric(self) -> StyleMetric:
        return hard_style_metric(layout=self.layout, style=self.style)

    def mean_strength(self, images: torch.Tensor) -> float:
        return self.metric.mean_strength(images)
