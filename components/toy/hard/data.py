"""Rendered hard toy scene sets, shared by the judges, the bases and their tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.toy.hard.render import (
    Scene,
    caption_for,
    pil_to_tensor_array,
    random_scene,
    render_scene,
)


@dataclass
class SceneSet:
    """N rendered scenes: images N x 3 x 64 x 64 in [-1, 1], their scenes and captions."""

    images: torch.Tensor
    scenes: list[Scene]
    captions: list[str]

    @property
    def parts(self) -> torch.Tensor:
        """N x 4 long tensor: (left digit, left colour, right digit, right colour)."""
        return torch.tensor([s.parts() for s in self.scenes], dtype=torch.long)


def render_scenes(images8: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                  pool: np.ndarray | None = None, jitter: bool = True, layout: str = "narrow") -> SceneSet:
    """`n` random scenes from the digits in `pool` (default all), rendered with or without jitter
    (in `layout`, render.py:render_scene)."""
    arrays, scenes, captions = [], [], []
    for _ in range(n):
        scene, i, j, right_first = random_scene(labels, rng, pool)
        image = render_scene(images8[i], images8[j], scene, rng if jitter else None, layout=layout)
        arrays.append(pil_to_tensor_array(image))
        scenes.append(scene)
        captions.append(caption_for(scene, right_first))
    return SceneSet(torch.from_numpy(np.stack(arrays)), scenes, captions)
