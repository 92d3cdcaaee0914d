"""components/distill/lcd.py against diffusers' schedulers (the reference implementation), tolerance 1e-6."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from components.distill import lcd

TOL = 1e-6
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


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


def test_ranks_draw_their_rows_of_the_global_batch():
    """Same generator on every rank: rank r of N (batch 2) draws rows [2r, 2r+2) of one process's batch-2N draws."""
    settings = lcd.LCDSettings(family="sd15", prediction_type="epsilon", scaling_factor=0.18215,
                               guidance_min=2.0, guidance_max=8.0)
    solver = lcd.ddim_solver_timesteps(1000, 50)
    one = lcd.draw_lcd_sample(torch.zeros(6, 4, 8, 8), settings, solver, torch.Generator().manual_seed(5))
    ranks = [lcd.draw_lcd_sample(torch.zeros(2, 4, 8, 8), settings, solver, torch.Generator().manual_seed(5),
                                 rank=r, world_size=3) for r in range(3)]
    for field in ("t_start", "t_prev", "noise", "w"):
        assert torch.equal(torch.cat([getattr(d, field) for d in ranks]), getattr(one, field)), field
    assert ranks[0].noise.shape == (2, 4, 8, 8) and not torch.equal(ranks[0].noise, ranks[1].noise)


# --- the composed step against the diffusers reference recipe ------------------------------------
# An independent re-implementation of one step of diffusers' examples/consistency_distillation/
# train_lcm_distill_lora_sd_wds.py (a separate frozen teacher UNet, its DDIMSolver with the
# previous-alpha table, LCM-form guidance, boundary scalings with timestep_scaling 10, the target
# under no_grad from x_prev at t_n, the student at t_{n+k}). Nothing below calls components.distill.lcd.

STEP_TOL = 1e-5


def _recipe_step(student, teacher, sched, latents, embeds, uncond_embeds, generator, *, w_min, w_max,
                 num_ddim_timesteps, prediction_type, loss_type, huber_c=0.001):
    """One LCD-LoRA step as the reference script computes it; returns its intermediates and loss."""
    import numpy as np

    ac = sched.alphas_cumprod.float()
    alpha_schedule, sigma_schedule = ac.sqrt(), (1.0 - ac).sqrt()
    topk = sched.config.num_train_timesteps // num_ddim_timesteps
    solver_t = torch.from_numpy((np.arange(1, num_ddim_timesteps + 1) * topk).round().astype(np.int64) - 1)
    solver_prev_ac = torch.tensor([ac[0].item()] + ac[solver_t[:-1]].tolist())

    def extract(a, t):
        return a.gather(-1, t).reshape(t.shape[0], 1, 1, 1)

    def x0_of(out, t, x):
        if prediction_type == "epsilon":
            return (x - extract(sigma_schedule, t) * out) / extract(alpha_schedule, t)
        return extract(alpha_schedule, t) * x - extract(sigma_schedule, t) * out

    def eps_of(out, t, x):
        if prediction_type == "epsilon":
            return out
        return extract(alpha_schedule, t) * out + extract(sigma_schedule, t) * x

    def scalings(t, sigma_data=0.5, timestep_scaling=10.0):
        scaled = timestep_scaling * t
        return (sigma_data**2 / (scaled**2 + sigma_data**2)).reshape(-1, 1, 1, 1), \
            (scaled / (scaled**2 + sigma_data**2) ** 0.5).reshape(-1, 1, 1, 1)

    bsz = latents.shape[0]
    # 2. timestep index and the two timesteps; 4. noise and forward process; 5. w (LCM form).
    index = torch.randint(0, num_ddim_timesteps, (bsz,), generator=generator)
    start = solver_t[index]
    prev = torch.where(start - topk < 0, torch.zeros_like(start), start - topk)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = sched.add_noise(latents, noise, start)
    w = ((w_max - w_min) * torch.rand((bsz,), generator=generator) + w_min).reshape(bsz, 1, 1, 1)
    c_skip_start, c_out_start = scalings(start)
    c_skip, c_out = scalings(prev)
    # 7. online student prediction at t_{n+k}.
    out = student(noisy, start, encoder_hidden_states=embeds).sample
    model_pred = c_skip_start * noisy + c_out_start * x0_of(out, start, noisy)
    # 8. teacher: conditional and unconditional passes, CFG on x0 and eps, one DDIM step.
    with torch.no_grad():
        out_c = teacher(noisy, start, encoder_hidden_states=embeds).sample
        out_u = teacher(noisy, start, encoder_hidden_states=uncond_embeds).sample
        x0_c, x0_u = x0_of(out_c, start, noisy), x0_of(out_u, start, noisy)
        eps_c, eps_u = eps_of(out_c, start, noisy), eps_of(out_u, start, noisy)
        pred_x0 = x0_c + w * (x0_c - x0_u)
        pred_eps = eps_c + w * (eps_c - eps_u)
        a_prev = extract(solver_prev_ac, index)
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * pred_eps
    # 9. target from the same (LoRA) student under no_grad at t_n.
    with torch.no_grad():
        out_t = student(x_prev.float(), prev, encoder_hidden_states=embeds).sample
        target = c_skip * x_prev + c_out * x0_of(out_t, prev, x_prev)
    # 10. loss.
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(model_pred.float(), target.float())
    else:
        loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + huber_c**2) - huber_c)
    return {"t_start": start, "t_prev": prev, "z_start": noisy, "z_prev": x_prev, "target": target,
            "pred": model_pred, "loss": loss}


@pytest.mark.parametrize(("prediction_type", "loss_type", "num_ddim_timesteps"),
                         [("epsilon", "huber", 50), ("epsilon", "l2", 4), ("v_prediction", "huber", 50)])
def test_composed_lcd_step_matches_reference_recipe(tmp_path, prediction_type, loss_type, num_ddim_timesteps):
    """lcd.lcd_loss and its parts (draws, teacher solver step, target, student) == the recipe, at 1e-5,
    and the gradients into the LoRA agree (so the target really is under no_grad)."""
    import copy

    from diffusers import UNet2DConditionModel

    from components.config import DistillConfig
    from components.lora.adapter import add_lora, lora_config, lora_parameters
    from components.models.conditioning import Conditioning
    from tests.tiny_models import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config("sd15")).eval()
    teacher = copy.deepcopy(unet).requires_grad_(False)  # the recipe's separate frozen teacher
    add_lora(unet, lora_config(4, 8, DistillConfig().target_modules))
    g = torch.Generator().manual_seed(3)
    for name, p in unet.named_parameters():  # B != 0, so the student differs from the teacher
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    sched = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    latents = torch.randn(6, 4, 8, 8, generator=g) * 0.8
    embeds = torch.randn(6, 7, 16, generator=g)
    uncond_embeds = torch.randn(1, 7, 16, generator=g).expand(6, -1, -1)
    settings = lcd.LCDSettings(family="sd15", prediction_type=prediction_type, scaling_factor=0.18215,
                               guidance_min=2.0, guidance_max=8.0, num_ddim_timesteps=num_ddim_timesteps,
                               loss_type=loss_type)
    alpha_bar = lcd.schedule_from_scheduler_config(dict(sched.config))
    solver = lcd.ddim_solver_timesteps(1000, num_ddim_timesteps)
    cond, uncond = Conditioning(embeds), Conditioning(uncond_embeds)

    ref = _recipe_step(unet, teacher, sched, latents, embeds, uncond_embeds, torch.Generator().manual_seed(11),
                       w_min=settings.guidance_min - 1.0, w_max=settings.guidance_max - 1.0,
                       num_ddim_timesteps=num_ddim_timesteps, prediction_type=prediction_type, loss_type=loss_type)
    ref["loss"].backward()
    ref_grads = [p.grad.clone() for p in lora_parameters(unet)]
    unet.zero_grad(set_to_none=True)

    # The parts, with the same draws.
    d = lcd.draw_lcd_sample(latents, settings, solver, torch.Generator().manual_seed(11))
    assert torch.equal(d.t_start, ref["t_start"]) and torch.equal(d.t_prev, ref["t_prev"])
    z_start = lcd.add_noise(latents, d.noise, d.t_start, alpha_bar)
    assert close(z_start, ref["z_start"], STEP_TOL)
    z_prev = lcd.teacher_solver_step(unet, z_start, d, cond, uncond, settings, alpha_bar)
    assert close(z_prev, ref["z_prev"], STEP_TOL)
    target = lcd.consistency_target(unet, z_prev, d, cond, settings, alpha_bar)
    assert not target.requires_grad and close(target, ref["target"], STEP_TOL)
    pred = lcd.student_prediction(unet, z_start, d, cond, settings, alpha_bar)
    assert pred.requires_grad and close(pred, ref["pred"], STEP_TOL)

    # The whole step from a fresh generator of the same seed.
    loss = lcd.lcd_loss(unet, unet, latents, cond, uncond, settings, alpha_bar, solver,
                        torch.Generator().manual_seed(11))
    assert abs(loss.item() - ref["loss"].item()) < STEP_TOL
    loss.backward()
    grads = [p.grad for p in lora_parameters(unet)]
    scale = max(r.abs().max().item() for r in ref_grads)
    assert scale > 0
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert close(ours / scale, theirs / scale, STEP_TOL)
    # The teacher path really ran the frozen base: with adapters on, the step would differ.
    z_prev_lora = ref["z_prev"]
    assert not close(lcd.ddim_step(*_lora_guided(unet, z_start, d, cond, uncond, settings, alpha_bar), d.t_prev,
                                   alpha_bar), z_prev_lora, STEP_TOL)


def _lora_guided(unet, z_start, d, cond, uncond, settings, alpha_bar):
    """(x0, eps) of the guided LoRA student (adapters on): what the teacher step must NOT use."""
    with torch.no_grad():
        z2, t2 = torch.cat([z_start, z_start]), torch.cat([d.t_start, d.t_start])
        out = unet(z2, t2, **cond.cat(uncond).unet_kwargs()).sample
    x0_c, x0_u = lcd.predicted_x0(out, z2, t2, alpha_bar, settings.prediction_type).chunk(2)
    eps_c, eps_u = lcd.predicted_epsilon(out, z2, t2, alpha_bar, settings.prediction_type).chunk(2)
    return lcd.guided(x0_c, x0_u, d.w), lcd.guided(eps_c, eps_u, d.w)
