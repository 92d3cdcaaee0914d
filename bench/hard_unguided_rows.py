"""Unguided and LCMScheduler-without-LoRA rows of an SD-1.5-family hard toy base, beside guided
teacher rows, on the difficulty table's prompt set, seeds and judges (components/toy/hard/evaluate.py),
200 images per row: whether unguided sampling fails on a base (docs/notebook.md, "Session 10").

    OMP_NUM_THREADS=1 python bench/hard_unguided_rows.py BASE_DIR JUDGES_DIR
"""
import json
import sys
import time

import torch
from diffusers import StableDiffusionPipeline

from components.evaluate.frechet import frechet_distance_of_features
from components.toy.hard.evaluate import prompt_set, sample
from components.toy.hard.judges import adherence, load_judges, swapped_sides

torch.set_num_threads(1)
base_dir, judges_dir = sys.argv[1], sys.argv[2]
judges = load_judges(judges_dir)
n, seed = 200, 0
prompts, reference = prompt_set(n, seed + 500, judges.layout), prompt_set(n, seed + 600, judges.layout)
ref = judges.features(reference.images)
pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
config = dict(pipe.scheduler.config)
out = {"base": base_dir, "judges": judges_dir, "layout": judges.layout, "rows": {}}
for sampler, steps, g, spacing in [("lcm_base", 4, 1.0, None), ("lcm_base", 2, 1.0, None), ("dpmpp", 25, 1.0, None),
                                   ("dpmpp", 25, 5.0, None), ("ddim", 4, 5.0, "trailing"), ("ddim", 8, 5.0, "trailing"),
                                   ("dpmpp", 8, 5.0, "trailing")]:
    t = time.time()
    imgs = sample(pipe, sampler, steps, prompts.captions, g, seed, timestep_spacing=spacing, scheduler_config=config)
    label = f"{sampler}-{steps}-cfg{g}" + (f"-{spacing}" if spacing else "")
    row = {"adherence": adherence(judges, imgs, prompts.parts), "swapped": swapped_sides(judges, imgs, prompts.parts),
           "fd": frechet_distance_of_features(judges.features(imgs), ref), "s": round(time.time() - t)}
    out["rows"][label] = row
    print(label, json.dumps(row), flush=True)
print(json.dumps(out))
