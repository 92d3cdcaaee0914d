"""Speed-up flags of the distillation loop (components/distill/speedups.py, DistillConfig): exact ones are
bit-identical to the plain path, the others stay within stated bounds of it on CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from components.config import DistillConfig
from components.distill.lcd import ddim_solver_timesteps, lcd_loss, schedule_from_scheduler_config
from components.distill.speedups import lcd_loss_bf16_teacher, make_optimizer, prefetched
from components.distill.trainer import NonFiniteLoss, TrainOptions, latest_checkpoint
from components.lora.adapter import add_lora, lora_config, lora_parameters
from components.models.conditioning import TextConditioner
from components.progress import Progress
from tests.test_trainer import SETTINGS_SD15, TARGETS, train_tiny
from tests.tiny_models import tiny_pipeline

# Adam divides by sqrt(v): for LoRA entries with tiny gradients a rounding-level change of the
# gradient flips their update's sign, so an elementwise bound says little. Non-exact flags are held
# to the trained part of the LoRA (B, zero at init) within 5% in norm, and to the same loss history
# within 1e-4 (relative).
REL_BOUND = 0.05


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rel_diff_b(a: dict, b: dict) -> float:
    """||B_a - B_b|| / ||B_a|| over all lora_B tensors (B starts at zero: this is the trained update)."""
    keys = [k for k in a if "lora_B" in k]
    da = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    return (da.norm() / torch.cat([a[k].flatten() for k in keys]).norm()).item()


def close_history(a, b) -> bool:
    return all(sa == sb and abs(la - lb) <= 1e-4 * abs(la) for (sa, la), (sb, lb) in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The plain path's 4-step LoRA (the reference every flag is compared with)."""
    result, _ = train_tiny(tmp_path_factory.mktemp("plain"), "run", max_steps=4, checkpoint_every=0)
    return result


def test_config_and_options_carry_the_flags_with_plain_defaults():
    cfg = DistillConfig()
    opts = TrainOptions.from_config(cfg)
    assert (opts.optimizer, opts.sync_every, opts.prefetch) == ("adamw", 1, 0)
    assert not (opts.compile_unet or opts.channels_last or opts.bf16_teacher)
    fast = TrainOptions.from_config(cfg.model_copy(update={"optimizer": "adamw_fused", "sync_every": 50,
                                                           "prefetch": 2}))
    assert (fast.optimizer, fast.sync_every, fast.prefetch) == ("adamw_fused", 50, 2)


def test_prefetch_and_deferred_sync_are_bit_identical(tmp_path, plain):
    """Same batches in the same order, same draws: the LoRA and the loss history are equal, bit for bit."""
    reports: list[Progress] = []
    result, _ = train_tiny(tmp_path, "fast", max_steps=4, checkpoint_every=0, prefetch=2, sync_every=3,
                           progress=reports.append)
    assert max_diff(plain.lora_state_dict, result.lora_state_dict) == 0.0
    assert result.history == plain.history
    assert [r.step for r in reports] == [1, 2, 3, 4]  # every step reported (steps 1-3 at the sync after 3)
    assert all(r.metrics["lr"] == pytest.approx(1e-3) and r.metrics["step_seconds"] > 0 for r in reports)


def test_fused_adamw_close_to_plain(tmp_path, plain):
    result, _ = train_tiny(tmp_path, "fused", max_steps=4, checkpoint_every=0, optimizer="adamw_fused")
    assert 0 < sum(v.abs().sum() for k, v in result.lora_state_dict.items() if "lora_B" in k)
    assert rel_diff_b(plain.lora_state_dict, result.lora_state_dict) < REL_BOUND
    assert close_history(plain.history, result.history)


def test_channels_last_close_to_plain(tmp_path, plain):
    result, pipe = train_tiny(tmp_path, "cl", max_steps=4, checkpoint_every=0, channels_last=True)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_diff_b(plain.lora_state_dict, result.lora_state_dict) < REL_BOUND
    assert close_history(plain.history, result.history)


def test_compiled_unet_close_to_plain(tmp_path, plain):
    """torch.compile (aot_eager here: the graph capture of adapters on/off, grad/no-grad; inductor on GPU)."""
    torch._dynamo.reset()
    try:
        result, _ = train_tiny(tmp_path, "compiled", max_steps=4, checkpoint_every=0, compile_unet=True,
                               compile_backend="aot_eager")
    finally:
        torch._dynamo.reset()
    assert rel_diff_b(plain.lora_state_dict, result.lora_state_dict) < REL_BOUND
    assert close_history(plain.history, result.history)


def test_bf16_teacher_loss_and_gradient_close_to_plain(tmp_path):
    """Same draws; bf16 teacher/target: loss within 5% and LoRA gradient cosine > 0.95 of the fp32 step."""
    pipe = tiny_pipeline("sd15", tmp_path / "pipe")
    torch.manual_seed(0)
    unet = add_lora(pipe.unet, lora_config(4, 8, TARGETS))
    for p in lora_parameters(unet):  # a trained-looking LoRA (B = 0 would make the target equal the base)
        torch.nn.init.normal_(p, std=0.05)
    cond_er = TextConditioner.from_pipeline(pipe, "sd15").to(torch.device("cpu"))
    batch = {"latents": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 4.0,
             "captions": ["a handwritten digit one"] * 4}
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    solver = ddim_solver_timesteps()
    latents = batch["latents"] * SETTINGS_SD15.scaling_factor
    cond = cond_er.conditioning(batch)
    uncond = cond_er.unconditional(cond)
    out = []
    for fn in (lcd_loss, lcd_loss_bf16_teacher):
        unet.zero_grad(set_to_none=True)
        loss = fn(unet, unet, latents, cond, uncond, SETTINGS_SD15, alpha_bar, solver, torch.Generator().manual_seed(5))
        loss.backward()
        out.append((loss.item(), torch.cat([p.grad.flatten() for p in lora_parameters(unet)])))
    (l32, g32), (l16, g16) = out
    assert l32 > 0 and abs(l16 - l32) / l32 < 0.05
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.95  # 0.97 measured


def test_bf16_teacher_flag_trains(tmp_path):
    result, _ = train_tiny(tmp_path, "bf16t", max_steps=2, checkpoint_every=0, bf16_teacher=True)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.history)


def test_nan_found_late_with_deferred_sync_names_the_step_and_keeps_checkpoint(tmp_path):
    """sync_every=4, checkpoint every 2: the NaN of step 3 is found at the sync before step 4's update."""
    with pytest.raises(NonFiniteLoss, match=r"step 3 .*updated after step 3.*checkpoint-2") as err:
        train_tiny(tmp_path, "nan", max_steps=8, checkpoint_every=2, nan_at=2, sync_every=4)
    assert "nan" in str(err.value)
    assert latest_checkpoint(tmp_path / "nan").name == "checkpoint-2"


def test_adamw_8bit_without_bitsandbytes_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ImportError, match="pip install bitsandbytes.*adamw_fused"):
        make_optimizer("adamw_8bit", params, lr=1e-3)
    with pytest.raises(ValueError, match="adamw_fused"):
        make_optimizer("sgd", params, lr=1e-3)


def test_prefetched_keeps_order_and_reraises_loader_errors():
    def batches():
        for i in range(5):
            yield {"latents": torch.full((1,), float(i)), "captions": [str(i)]}
        raise OSError("shard unreadable")

    got = []
    with pytest.raises(OSError, match="shard unreadable"):
        for b in prefetched(batches(), 2, pin=False):
            got.append(int(b["latents"].item()))
    assert got == [0, 1, 2, 3, 4]


def test_precomputed_text_embeddings_are_used_without_text_encoders(tmp_path):
    """Shards with KEY.emb.npy (encode.text_embeddings): the loop never needs the text encoder."""
    def batches(rank, world_size):
        g = torch.Generator().manual_seed(7)
        for _ in range(2):
            yield {"latents": torch.randn(2, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(2, 77, 16, generator=g),
                   "captions": ["unused", "unused"]}

    pipe = tiny_pipeline("sd15", tmp_path / "pipe")
    conditioner = TextConditioner("sd15", [], [], uncond_embeds=torch.zeros(1, 77, 16))
    batch = next(iter(batches(0, 1)))
    assert torch.equal(conditioner.conditioning(batch).embeds, batch["prompt_embeds"])
    torch.manual_seed(0)
    add_lora(pipe.unet, lora_config(4, 8, TARGETS))
    from components.distill.trainer import train_lcd_lora

    result = train_lcd_lora(pipe.unet, conditioner, batches, SETTINGS_SD15,
                            schedule_from_scheduler_config(dict(pipe.scheduler.config)),
                            TrainOptions(max_steps=2, lr=1e-3), tmp_path / "run")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in result.history)
