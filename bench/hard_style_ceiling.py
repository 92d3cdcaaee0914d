"""How much of the hard style a 4-step LCM can hold at all (issue 12, item 4; docs/notebook.md, "Session 12").

The merge claim adds an LCM-LoRA distilled on the plain base to the style LoRA. This measures the
ceiling beside it: an LCM-LoRA distilled on the style model itself (the style LoRA fused at 1.0 into
the base), on a styled copy of the hard source (same scenes, captions and defects; every image on the
style's paper), with the hard recipe. Three steps:

    OMP_NUM_THREADS=1 python bench/hard_style_ceiling.py prepare OUT
    OMP_NUM_THREADS=1 lcmlora reproduce --toy --hard --family sd15 --set bases.toy-hard.reference=OUT/styled-base \\
        --set curate.source=OUT/styled-source --set toy.hard.look_fraction=1.0 --output OUT/reproduce
    OMP_NUM_THREADS=1 python bench/hard_style_ceiling.py measure OUT/styled-base OUT/reproduce/sd15/lora

`measure` samples the merge stage's prompts, seeds and noise (merge.samples_per_prompt per prompt) and
prints style strength and adherence of the base alone at DPM-Solver++-25 (CFG at the base's scale: the
merge claim's reference when the base is the style model) and with the LCM-LoRA at LCM-4, and their ratio.
"""
import shutil
import sys
import time
from pathlib import Path

import torch

STYLED_BASE, STYLED_SOURCE = "styled-base", "styled-source"


def prepare(out: Path) -> None:
    """OUT/styled-base (the committed hard base, style LoRA fused at 1.0) and OUT/styled-source."""
    from diffusers import StableDiffusionPipeline

    from components.paths import project_path
    from components.toy.hard.config import HardToyConfig
    from components.toy.hard.source import write_hard_source
    from components.toy.hard.style import style_background

    hard = HardToyConfig()
    base = out / STYLED_BASE
    shutil.copytree(project_path(hard.base_dir), base)
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(project_path(hard.style_output)))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    shutil.rmtree(base / "unet")
    pipe.unet.save_pretrained(base / "unet")
    print(f"{base}: {hard.style_output} fused at 1.0 into {hard.base_dir} ({changed} of {len(before)} UNet tensors)")
    # every image on the style's paper: the source's "other looks" at fraction 1.0, the style the only look
    summary = write_hard_source(out / STYLED_SOURCE, rows=hard.source_rows, seed=hard.seed, look_fraction=1.0,
                                layout=hard.layout, look=lambda rng: style_background())
    print(f"{out / STYLED_SOURCE}: {summary['scenes']} scenes, {summary['other_looks']} on the style's paper")


def measure(base_dir: Path, lora: Path) -> None:
    from components.cli.conventions import resolve
    from components.evaluate.evaluation import load_prompts
    from components.evaluate.merge_eval import sample_plan
    from components.evaluate.sampler_matrix import Method, run_method
    from components.lora import io as lora_io
    from components.models.base_model import load_base
    from components.toy.hard.plugins import HARD_PROMPTS, hard_judges
    from components.toy.hard.reproduction import hard_overrides

    cfg = resolve(Path("params.yaml"), [*hard_overrides("sd15"), f"bases.toy-hard.reference={base_dir}"], None)
    base, m = cfg.base("toy-hard"), cfg.merge
    judges = hard_judges(cfg.evaluate, base.resolution)
    prompts = load_prompts(cfg.evaluate.prompts or HARD_PROMPTS)
    pipe = load_base(str(base_dir), family="sd15").pipe
    pipe.set_progress_bar_config(disable=True)
    image_prompts, seeds, noise = sample_plan(pipe, prompts, m, base.resolution)

    def row(label: str, method: Method) -> float:
        t = time.perf_counter()
        images = run_method(pipe, method, image_prompts, noise, seeds, height=base.resolution, width=base.resolution,
                            batch_size=50).images
        strength = float(judges.style.mean_strength(images))
        print(f"{label}: style strength {strength:.4f}  adherence {float(judges.adherence(images, image_prompts)):.4f}"
              f"  ({len(images)} images, {time.perf_counter() - t:.0f} s)", flush=True)
        return strength

    reference = row(f"base alone, dpmpp-{m.reference_steps}", Method("dpmpp", m.reference_steps, base.guidance_scale, True))
    lora_io.load_adapter(pipe, "sd15", lora_io.lora_file(lora), "lcm")
    lora_io.set_weights(pipe, {"lcm": 1.0})
    lcm = row(f"with the LCM-LoRA, lcm-{m.lcm_steps}", Method("lcm", m.lcm_steps, m.lcm_guidance_scale, True))
    print(f"ratio (the merge claim's bound: 0.8): {lcm / reference:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "measure":
        measure(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
