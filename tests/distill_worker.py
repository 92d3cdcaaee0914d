"""Worker for the 2-process DDP test: `accelerate launch --cpu --num_processes 2 tests/distill_worker.py OUT`.

Each rank trains the tiny SD-1.5-family LoRA on its own batches for 2 steps and writes a
digest of its LoRA weights to OUT/rank{R}.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.distill.lcd import schedule_from_scheduler_config
from components.distill.trainer import TrainOptions, train_lcd_lora
from components.lora.adapter import add_lora, lora_config
from components.models.conditioning import TextConditioner
from tests.test_trainer import SETTINGS_SD15, TARGETS, memory_batches
from tests.tiny_models import tiny_pipeline


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline("sd15", out / "pipe")
    torch.manual_seed(0)
    add_lora(pipe.unet, lora_config(4, 8, TARGETS))
    result = train_lcd_lora(pipe.unet, TextConditioner.from_pipeline(pipe, "sd15"), memory_batches("sd15"),
                            SETTINGS_SD15, schedule_from_scheduler_config(dict(pipe.scheduler.config)),
                            TrainOptions(max_steps=2, lr=1e-3), out / "run")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    digest = hashlib.sha256()
    for k in sorted(result.lora_state_dict):
        digest.update(result.lora_state_dict[k].numpy().tobytes())
    b_norm = sum(v.abs().sum().item() for k, v in result.lora_state_dict.items() if "lora_B" in k)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": result.world_size, "digest": digest.hexdigest(), "lora_B_abs_sum": b_norm,
        "history": result.history,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
