"""components/lcd.py against diffusers' schedulers (the reference implementation), tolerance 1e-6."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from components import lcd

TOL = 1e-6
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=0)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(schedule):
    ref = DDPMScheduler(**{**SD_SCHEDULE, "beta_schedule": schedule}).alphas_cumprod
    assert close(lcd.alphas_cumprod(1000, 0.00085, 0.012, schedule), ref)


def test_solver_timesteps_match_lcm_and_ddim_trailing():
    ours = lcd.ddim_solver_timesteps(1000, 50)
    assert ours[:3].tolist() == [19, 39, 59] and ours[-1].item() == 999
    lcm = LCMScheduler(**SD_SCHEDULE, original_inference_steps=50)
    lcm.set_timesteps(50)  # all of LCM's origin timesteps, newest first
    assert torch.equal(lcm.timesteps.flip(0).long(), ours)
    ddim = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert torch.equal(ddim.timesteps.flip(0).long(), ours)
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        lcd.ddim_solver_timesteps(1000, 30)


def test_add_noise_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 19, 500, 999])
    ref_sched = DDPMScheduler(**SD_SCHEDULE)
    ours = lcd.add_noise(z0, noise, t, ref_sched.alphas_cumprod)
    assert close(ours, ref_sched.add_noise(z0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [19, 39, 519, 999])
def test_ddim_step_matches_ddim_scheduler(prediction_type, t):
    """x0 and eps from the model output, then one solver step == DDIMScheduler.step (eta=0, trailing)."""
    sched = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing", prediction_type=prediction_type,
                          set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(t)
    sample, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = sched.step(out, t, sample, eta=0.0)
    tt = torch.full((2,), t)
    a = sched.alphas_cumprod
    x0 = lcd.predicted_x0(out, sample, tt, a, prediction_type)
    eps = lcd.predicted_epsilon(out, sample, tt, a, prediction_type)
    assert close(x0, ref.pred_original_sample, 1e-5 if t == 19 else TOL)  # x0 divides by alpha
    t_prev = lcd.previous_solver_timestep(tt, 20)
    ours = lcd.ddim_step(x0, eps, t_prev, a)
    assert close(ours, ref.prev_sample)


@pytest.mark.parametrize("t", [0, 1, 19, 259, 999])
def test_scalings_match_lcm_scheduler(t):
    sched = LCMScheduler(**SD_SCHEDULE, timestep_scaling=10.0)
    c_skip_ref, c_out_ref = sched.get_scalings_for_boundary_condition_discrete(t)
    c_skip, c_out = lcd.scalings_for_boundary_conditions(torch.tensor([t]), 0.5, 10.0)
    assert abs(c_skip.item() - c_skip_ref) < TOL and abs(c_out.item() - c_out_ref) < TOL
    if t == 0:
        assert c_skip.item() == 1.0 and c_out.item() == 0.0  # boundary condition f(x, 0) = x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_function_matches_lcm_step_denoised(prediction_type):
    """LCMScheduler.step's `denoised` is exactly f(z_t, t) = c_skip z_t + c_out x0."""
    sched = LCMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, original_inference_steps=50)
    sched.set_timesteps(4)
    t = int(sched.timesteps[1])
    g = torch.Generator().manual_seed(1)
    sample, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched._step_index = 1
    ref = sched.step(out, t, sample, generator=torch.Generator().manual_seed(0)).denoised
    tt = torch.full((2,), t)
    x0 = lcd.predicted_x0(out, sample, tt, sched.alphas_cumprod, prediction_type)
    c_skip, c_out = lcd.scalings_for_boundary_conditions(tt)
    assert close(lcd.consistency_function(sample, x0, c_skip, c_out), ref)


def test_guidance_lcm_form_equals_cfg():
    """cond + w (cond - uncond) with w = scale - 1 is the usual CFG uncond + scale (cond - uncond)."""
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    scale = torch.tensor([1.0, 2.0, 7.5])
    ours = lcd.guided(cond, uncond, scale - 1.0)
    cfg = uncond + scale[:, None, None, None] * (cond - uncond)
    assert close(ours, cfg, 1e-5)
    w = lcd.sample_guidance_w(1000, 3.0, 13.0, torch.Generator().manual_seed(0))
    assert w.min() >= 2.0 and w.max() <= 12.0 and abs(w.mean().item() - 7.0) < 0.5
    assert torch.equal(lcd.sample_guidance_w(4, 7.5, 7.5), torch.full((4,), 6.5))


def test_losses():
    pred, target = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert lcd.l2_loss(pred, target).item() == pytest.approx(4.0)
    c = 0.001
    assert lcd.pseudo_huber_loss(pred, target, c).item() == pytest.approx((4 + c**2) ** 0.5 - c)
    assert lcd.pseudo_huber_loss(pred, pred, c).item() == 0.0
    with pytest.raises(ValueError, match="distill.loss_type"):
        lcd.lcd_distance(pred, target, "l1")


def test_guidance_scale_embedding_matches_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([3.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert close(lcd.guidance_scale_embedding(w, 256), ref, 1e-5)
