"""components/distill/pcm.py against diffusers' schedulers and the authors' PCM training step.

Tolerances: 1e-6 where lcd.py's tests hold it, 1e-5 where x0 divides by a small alpha (t near T)
or a step chains UNet passes; the boundary condition is exact (c_skip = 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, TCDScheduler

from components.distill import lcd, pcm

TOL = 1e-6
STEP_TOL = 1e-5
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
GRID = lcd.ddim_solver_timesteps(1000, 50)  # 19, 39, ..., 999


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=0)


def settings(**kw) -> pcm.PCMSettings:
    base = {"family": "sd15", "prediction_type": "epsilon", "scaling_factor": 0.18215, "guidance_min": 2.0,
            "guidance_max": 8.0}
    return pcm.PCMSettings(**{**base, **kw})


def x0_and_eps(out, sample, t, alpha_bar, prediction_type):
    return (lcd.predicted_x0(out, sample, t, alpha_bar, prediction_type),
            lcd.predicted_epsilon(out, sample, t, alpha_bar, prediction_type))


# --- phases ----------------------------------------------------------------------------------


def _reference_edges(num_ddim_timesteps: int, phases: int) -> list[int]:
    """The reference's phase starts, as timesteps: ddim_timesteps_prev[floor(linspace(0, N, M, endpoint=False))]."""
    k = 1000 // num_ddim_timesteps
    solver = (np.arange(1, num_ddim_timesteps + 1) * k).round().astype(np.int64) - 1
    prev = np.asarray([0] + solver[:-1].tolist())
    starts = np.floor(np.linspace(0, num_ddim_timesteps, num=phases, endpoint=False)).astype(np.int64)
    return prev[starts].tolist()


@pytest.mark.parametrize(("num_ddim_timesteps", "phases"), [(50, 1), (50, 2), (50, 4), (50, 8), (50, 50), (20, 3),
                                                             (40, 22), (8, 4)])
def test_phase_edges_on_the_grid(num_ddim_timesteps, phases):
    grid = lcd.ddim_solver_timesteps(1000, num_ddim_timesteps)
    edges = pcm.phase_edges(grid, phases)
    assert edges.dtype == torch.long and len(edges) == phases + 1
    assert bool((edges[1:] > edges[:-1]).all())  # strictly increasing: every phase holds a solver step
    assert edges[0].item() == 0 and edges[-1].item() == 999  # s_0 = 0, s_M = T - 1 = the top of the grid
    assert set(edges[1:].tolist()) <= set(grid.tolist())
    assert edges[:-1].tolist() == _reference_edges(num_ddim_timesteps, phases)


def test_phase_edges_of_the_reference_scripts():
    assert pcm.phase_edges(GRID, 4).tolist() == [0, 239, 499, 739, 999]  # --multiphase 4
    assert pcm.phase_edges(GRID, 1).tolist() == [0, 999]  # one phase: the whole trajectory, as LCD
    assert pcm.phase_edges(GRID, 50).tolist() == [0] + GRID.tolist()  # one solver step per phase
    with pytest.raises(ValueError, match="distill.pcm_phases"):
        pcm.phase_edges(GRID, 51)
    with pytest.raises(ValueError, match="distill.pcm_phases"):
        pcm.phase_edges(GRID, 0)


def test_phase_of_at_and_between_edges():
    edges = pcm.phase_edges(GRID, 4)  # 0, 239, 499, 739, 999
    t = torch.tensor([0, 1, 19, 239, 240, 259, 499, 500, 739, 740, 999])
    assert pcm.phase_of(t, edges).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # an upper edge is its phase's top
    assert pcm.lower_edge(t, edges).tolist() == [0, 0, 0, 0, 239, 239, 239, 499, 499, 739, 739]


@pytest.mark.parametrize(("num_ddim_timesteps", "phases"), [(50, 4), (50, 8), (10, 3), (8, 8)])
def test_phase_of_every_solver_step_matches_the_reference_index_rule(num_ddim_timesteps, phases):
    """Reference: the phase of solver index n is the last phase start i_m <= n; its edge is ddim_timesteps_prev[i_m]."""
    grid = lcd.ddim_solver_timesteps(1000, num_ddim_timesteps)
    starts = np.floor(np.linspace(0, num_ddim_timesteps, num=phases, endpoint=False)).astype(np.int64)
    n = np.arange(num_ddim_timesteps)
    ref_phase = (n[:, None] >= starts[None, :]).sum(1) - 1
    edges = pcm.phase_edges(grid, phases)
    assert pcm.phase_of(grid, edges).tolist() == ref_phase.tolist()
    prev = pcm.clipped_solver_step(grid, 1000 // num_ddim_timesteps, pcm.lower_edge(grid, edges))
    assert torch.equal(prev, lcd.previous_solver_timestep(grid, 1000 // num_ddim_timesteps))  # the clip never binds
    at_edge = torch.from_numpy(np.isin(n, starts))  # the reference's target c_skip = isin(index, starts)
    assert torch.equal(pcm.phase_boundary_scalings(prev, pcm.lower_edge(grid, edges))[0].bool(), at_edge)


def test_clipped_solver_step_stops_at_the_edge():
    edge = torch.tensor([0, 239, 239])
    assert pcm.clipped_solver_step(torch.tensor([19, 259, 245]), 20, edge).tolist() == [0, 239, 239]


# --- the consistency function ------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_boundary_condition_at_every_edge(prediction_type):
    """f^m(x_{s_m}, s_m) = x_{s_m}: exactly with the hard scalings; to 1e-5 from the DDIM form alone."""
    a = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    edges = pcm.phase_edges(GRID, 4)[:-1]  # the lower edges s_0..s_{M-1}
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    x0, eps = x0_and_eps(out, x, edges, a, prediction_type)
    assert torch.equal(pcm.phased_consistency_function(x, x0, eps, edges, edges, a), x)
    assert close(lcd.ddim_step(x0, eps, edges, a), x, STEP_TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("t", "inference_steps"), [(999, 5), (899, 10), (439, 25), (219, 50), (199, 5), (19, 50)])
def test_ddim_jump_to_the_edge_matches_ddim_scheduler(prediction_type, t, inference_steps):
    """f^m(x_t, t) == DDIMScheduler.step's prev_sample where the scheduler's step t -> t - T/steps lands on s_m.

    Five phases (edges 0, 199, ..., 999); t - T/steps = s_m, or -1 in phase 0, which DDIM maps to
    alpha_bar_0 (set_alpha_to_one=False), the same timestep 0 the edge s_0 = 0 names.
    """
    sched = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing", prediction_type=prediction_type,
                          set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(inference_steps)
    g = torch.Generator().manual_seed(t)
    sample, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = sched.step(out, t, sample, eta=0.0).prev_sample
    tt = torch.full((2,), t)
    edge = pcm.lower_edge(tt, pcm.phase_edges(GRID, 5))
    assert max(t - 1000 // inference_steps, 0) == edge[0].item()
    x0, eps = x0_and_eps(out, sample, tt, sched.alphas_cumprod, prediction_type)
    assert close(pcm.phased_consistency_function(sample, x0, eps, tt, edge, sched.alphas_cumprod), ref, STEP_TOL)


def test_one_phase_is_the_lcd_solver_step_to_timestep_0():
    """One phase: f^0(x_t, t) = alpha_0 x0 + sigma_0 eps = lcd.ddim_step(x0, eps, 0), to timestep 0 from anywhere."""
    a = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    t = GRID[torch.tensor([0, 1, 12, 30, 49])]
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    x0, eps = x0_and_eps(out, x, t, a, "epsilon")
    edge = pcm.lower_edge(t, pcm.phase_edges(GRID, 1))
    assert edge.tolist() == [0] * 5
    assert torch.equal(pcm.phased_consistency_function(x, x0, eps, t, edge, a),
                       lcd.ddim_step(x0, eps, torch.zeros_like(t), a))


def test_one_phase_reduces_to_lcds_consistency_function_when_alpha_0_is_one():
    """The reduction that holds: with alpha_bar at timestep 0 set to 1 (no noise left), f^0 = x0, and LCD's
    f = c_skip x_t + c_out x0 differs from it by c_skip(t) x_t + (c_out(t) - 1) x0, under 1e-4 on the grid.

    With the schedule's own alpha_bar_0 = 1 - beta_0 (the reference's, and LCD's last solver step), the
    one-phase PCM keeps sigma_0 eps, sigma_0 = 0.029 for SD, so the two differ by about that much.
    """
    a = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    a_one = torch.cat([torch.ones(1), a[1:]])  # diffusers' set_alpha_to_one at timestep 0
    t = GRID.clone()
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(50, 4, 4, 4, generator=g), torch.randn(50, 4, 4, 4, generator=g)
    x0, eps = x0_and_eps(out, x, t, a, "epsilon")  # x0 at t >= 19: the same with either table
    edge = pcm.lower_edge(t, pcm.phase_edges(GRID, 1))
    ours = pcm.phased_consistency_function(x, x0, eps, t, edge, a_one)
    assert close(ours, x0)
    c_skip, c_out = lcd.scalings_for_boundary_conditions(t)
    theirs = lcd.consistency_function(x, x0, c_skip, c_out)
    bound = (c_skip[:, None, None, None] * x.abs() + (1 - c_out)[:, None, None, None] * x0.abs()).max().item()
    assert (ours - theirs).abs().max().item() <= bound + TOL and bound < 1e-4
    # With alpha_bar_0 < 1 the one-phase PCM is not LCD's function: sigma_0 eps remains.
    gap = (pcm.phased_consistency_function(x, x0, eps, t, edge, a) - theirs).abs().max().item()
    assert gap > 0.02
    # At t = 0 both are the identity.
    z0 = torch.zeros(1, dtype=torch.long)
    one_c_skip, one_c_out = lcd.scalings_for_boundary_conditions(z0)
    assert torch.equal(pcm.phased_consistency_function(x[:1], x0[:1], eps[:1], z0, z0, a), x[:1])
    assert torch.equal(lcd.consistency_function(x[:1], x0[:1], one_c_skip, one_c_out), x[:1])


# --- deterministic phased sampling --------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 25])
def test_sampling_timesteps_equal_tcd_and_ddim_trailing_when_steps_divide_n(steps):
    ours = pcm.pcm_sampling_timesteps(steps)
    tcd = TCDScheduler(**SD_SCHEDULE)
    tcd.set_timesteps(steps)
    ddim = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert ours.tolist() == tcd.timesteps.tolist() == ddim.timesteps.tolist()


def test_sampling_timesteps_with_four_phases_need_tcds_custom_timesteps():
    """4 does not divide 50: the trained edges are 739/499/239; neither class picks them from a step count.

    DDIMScheduler(trailing, 4 steps) is the reference script's validation sampler, so it samples
    10 timesteps off its own training edges; TCDScheduler's LCM-style pick is 20 off the other way.
    TCDScheduler(timesteps=ours) takes them as they are (descending, on its 50-step grid).
    """
    ours = pcm.pcm_sampling_timesteps(4)
    assert ours.tolist() == [999, 739, 499, 239]
    ddim = DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]
    tcd = TCDScheduler(**SD_SCHEDULE)
    tcd.set_timesteps(4)
    assert tcd.timesteps.tolist() == [999, 759, 499, 259]
    tcd.set_timesteps(timesteps=ours.tolist())
    assert tcd.timesteps.tolist() == ours.tolist() and set(ours.tolist()) <= set(GRID.tolist())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("phases", [2, 4, 8])
def test_phased_sampling_is_tcd_with_gamma_zero(prediction_type, phases):
    """Each step of TCDScheduler(timesteps=pcm_sampling_timesteps(M)).step(eta=0) == f^m(x_t, t) to the next edge."""
    tcd = TCDScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    tcd.set_timesteps(timesteps=pcm.pcm_sampling_timesteps(phases).tolist())
    edges = pcm.phase_edges(GRID, phases)
    g = torch.Generator().manual_seed(phases)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    for t in tcd.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)  # stands in for the UNet
        ref = tcd.step(out, t, sample, eta=0.0).prev_sample
        tt = torch.full((2,), int(t))
        x0, eps = x0_and_eps(out, sample, tt, tcd.alphas_cumprod, prediction_type)
        ours = pcm.phased_consistency_function(sample, x0, eps, tt, pcm.lower_edge(tt, edges), tcd.alphas_cumprod)
        assert close(ours, ref, STEP_TOL), int(t)
        sample = ref


# --- settings ------------------------------------------------------------------------------------


def test_settings_defaults_and_errors():
    s = settings()
    assert isinstance(s, lcd.LCDSettings) and s.pcm_phases == 4 and not s.pcm_adversarial
    assert s.edges(GRID).tolist() == [0, 239, 499, 739, 999]
    with pytest.raises(ValueError, match="not implemented in this version"):
        settings(pcm_adversarial=True)
    with pytest.raises(ValueError, match="distill.pcm_phases=60"):
        settings(pcm_phases=60)


# --- the composed step ---------------------------------------------------------------------------


def _tiny_lora_unet(family: str = "sd15", *, random_b: bool = True, seed: int = 0, teacher: list | None = None):
    """A tiny random UNet with a rank-4 LoRA; a frozen copy of its base is appended to `teacher` if given."""
    import copy

    from diffusers import UNet2DConditionModel

    from components.config import DistillConfig
    from components.lora.adapter import add_lora, lora_config
    from tests.tiny_models import tiny_unet_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family)).eval()
    if teacher is not None:
        teacher.append(copy.deepcopy(unet).requires_grad_(False))
    add_lora(unet, lora_config(4, 8, DistillConfig().target_modules))
    g = torch.Generator().manual_seed(seed + 3)
    for name, p in unet.named_parameters():  # B != 0, so the student differs from the teacher
        if random_b and "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return unet


def _conditioning(unet, batch: int, seed: int = 4):
    from components.models.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    embeds = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    uncond = torch.randn(1, 7, cfg.cross_attention_dim, generator=g).expand(batch, -1, -1)
    if cfg.addition_embed_type != "text_time":
        return Conditioning(embeds), Conditioning(uncond)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)
    return (Conditioning(embeds, torch.randn(batch, pooled_dim, generator=g), time_ids),
            Conditioning(uncond, torch.zeros(batch, pooled_dim), time_ids))


def _recipe_step(student, teacher, sched, latents, embeds, uncond_embeds, generator, *, w_min, w_max,
                 num_ddim_timesteps, phases, loss_type, huber_c=0.001):
    """One PCM-LoRA step as the reference's train_pcm_lora_sd15.py computes it, in solver-index space.

    An independent re-implementation (nothing here calls components.distill.pcm): a separate frozen
    teacher, the previous-alpha table, phase starts floor(linspace(0, N, M, endpoint=False)), the
    phase jump with the raw noise prediction (so epsilon prediction only), c_skip = isin(index,
    starts) on the target and 0 on the student, the target from the LoRA student under no_grad.
    """
    ac = sched.alphas_cumprod.float()
    alpha, sigma = ac.sqrt(), (1.0 - ac).sqrt()
    topk = sched.config.num_train_timesteps // num_ddim_timesteps
    solver_t = torch.from_numpy((np.arange(1, num_ddim_timesteps + 1) * topk).round().astype(np.int64) - 1)
    solver_prev_t = torch.cat([torch.zeros(1, dtype=torch.long), solver_t[:-1]])
    solver_prev_ac = torch.tensor([ac[0].item()] + ac[solver_t[:-1]].tolist())
    starts = torch.from_numpy(np.floor(np.linspace(0, num_ddim_timesteps, num=phases, endpoint=False)).astype(np.int64))

    def col(v):
        return v.reshape(-1, 1, 1, 1)

    bsz = latents.shape[0]
    index = torch.randint(0, num_ddim_timesteps, (bsz,), generator=generator)
    start = solver_t[index]
    prev = torch.where(start - topk < 0, torch.zeros_like(start), start - topk)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = sched.add_noise(latents, noise, start)
    w = col((w_max - w_min) * torch.rand((bsz,), generator=generator) + w_min)
    phase_start = starts[(index[:, None] >= starts[None, :]).sum(1) - 1]  # the last start <= index
    ac_end = col(solver_prev_ac[phase_start])
    at_start = col(torch.isin(index, starts).float())

    def x0_of(out, t, x):
        return (x - col(sigma[t]) * out) / col(alpha[t])

    out = student(noisy, start, encoder_hidden_states=embeds).sample
    pred = ac_end.sqrt() * x0_of(out, start, noisy) + (1.0 - ac_end).sqrt() * out
    with torch.no_grad():
        # cond and uncond in one batched pass (the reference makes two): the same numbers as
        # lcd.teacher_solver_step, not ~3e-6 apart, which the target's 1/alpha and huber's
        # curvature (1/c) would grow past 1e-5 in the gradients.
        both = teacher(torch.cat([noisy, noisy]), torch.cat([start, start]),
                       encoder_hidden_states=torch.cat([embeds, uncond_embeds])).sample
        out_c, out_u = both.chunk(2)
        x0_c, x0_u = x0_of(out_c, start, noisy), x0_of(out_u, start, noisy)
        a_prev = col(solver_prev_ac[index])
        x_prev = a_prev.sqrt() * (x0_c + w * (x0_c - x0_u)) + (1.0 - a_prev).sqrt() * (out_c + w * (out_c - out_u))
        out_t = student(x_prev.float(), prev, encoder_hidden_states=embeds).sample
        jump = ac_end.sqrt() * x0_of(out_t, prev, x_prev) + (1.0 - ac_end).sqrt() * out_t
        target = at_start * x_prev + (1.0 - at_start) * jump
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    else:
        loss = torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + huber_c**2) - huber_c)
    return {"t_start": start, "t_prev": prev, "edge": solver_prev_t[phase_start], "at_start": at_start.flatten(),
            "z_start": noisy, "z_prev": x_prev, "target": target, "pred": pred, "loss": loss}


@pytest.mark.parametrize(("loss_type", "num_ddim_timesteps", "phases"),
                         [("huber", 50, 4), ("l2", 8, 4), ("huber", 10, 3)])
def test_composed_pcm_step_matches_reference_recipe(loss_type, num_ddim_timesteps, phases):
    """pcm.pcm_loss and its parts == the reference recipe at 1e-5 (epsilon prediction), LoRA gradients too."""
    from components.lora.adapter import lora_parameters

    frozen: list = []
    unet = _tiny_lora_unet(teacher=frozen)
    teacher = frozen[0]  # the recipe's separate frozen teacher
    sched = DDPMScheduler(**SD_SCHEDULE)
    batch = 12
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.8
    cond, uncond = _conditioning(unet, batch)
    s = settings(num_ddim_timesteps=num_ddim_timesteps, pcm_phases=phases, loss_type=loss_type)
    alpha_bar = lcd.schedule_from_scheduler_config(dict(sched.config))
    solver = lcd.ddim_solver_timesteps(1000, num_ddim_timesteps)

    ref = _recipe_step(unet, teacher, sched, latents, cond.embeds, uncond.embeds, torch.Generator().manual_seed(11),
                       w_min=s.guidance_min - 1.0, w_max=s.guidance_max - 1.0, num_ddim_timesteps=num_ddim_timesteps,
                       phases=phases, loss_type=loss_type)
    assert ref["at_start"].any() and not ref["at_start"].all()  # the draw has both kinds of target
    ref["loss"].backward()
    ref_grads = [p.grad.clone() for p in lora_parameters(unet)]
    unet.zero_grad(set_to_none=True)

    d = pcm.draw_pcm_sample(latents, s, solver, torch.Generator().manual_seed(11))
    for field in ("t_start", "t_prev", "edge"):
        assert torch.equal(getattr(d, field), ref[field]), field
    z_start = lcd.add_noise(latents, d.noise, d.t_start, alpha_bar)
    assert close(z_start, ref["z_start"], STEP_TOL)
    z_prev = lcd.teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
    assert close(z_prev, ref["z_prev"], STEP_TOL)
    target = pcm.phased_consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    assert not target.requires_grad and close(target, ref["target"], STEP_TOL)
    edge_rows = d.t_prev == d.edge
    assert torch.equal(target[edge_rows], z_prev[edge_rows])  # boundary condition, exactly
    pred = pcm.phased_student_prediction(unet, z_start, d, cond, s, alpha_bar)
    assert pred.requires_grad and close(pred, ref["pred"], STEP_TOL)

    loss = pcm.pcm_loss(unet, unet, latents, cond, uncond, s, alpha_bar, solver, torch.Generator().manual_seed(11))
    assert abs(loss.item() - ref["loss"].item()) < STEP_TOL
    loss.backward()
    scale = max(r.abs().max().item() for r in ref_grads)
    assert scale > 0
    for ours, theirs in zip([p.grad for p in lora_parameters(unet)], ref_grads, strict=True):
        assert close(ours / scale, theirs / scale, STEP_TOL)


def test_one_phase_step_shares_lcds_draws_teacher_and_edge_targets():
    """One phase: the same draws and teacher step as lcd.lcd_loss; where t_prev = 0 both targets are z_prev."""
    unet = _tiny_lora_unet()
    latents = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    cond, uncond = _conditioning(unet, 12)
    s_pcm = settings(pcm_phases=1, num_ddim_timesteps=4)
    s_lcd = lcd.LCDSettings(family="sd15", prediction_type="epsilon", scaling_factor=0.18215, guidance_min=2.0,
                            guidance_max=8.0, num_ddim_timesteps=4)
    alpha_bar = lcd.alphas_cumprod()
    solver = lcd.ddim_solver_timesteps(1000, 4)
    d_pcm = pcm.draw_pcm_sample(latents, s_pcm, solver, torch.Generator().manual_seed(7))
    d_lcd = lcd.draw_lcd_sample(latents, s_lcd, solver, torch.Generator().manual_seed(7))
    for field in ("t_start", "t_prev", "noise", "w"):
        assert torch.equal(getattr(d_pcm, field), getattr(d_lcd, field)), field
    assert d_pcm.edge.tolist() == [0] * 12
    z_start = lcd.add_noise(latents, d_lcd.noise, d_lcd.t_start, alpha_bar)
    z_prev = lcd.teacher_solver_step(unet, z_start, d_pcm, cond, uncond, s_pcm, alpha_bar)
    assert torch.equal(z_prev, lcd.teacher_solver_step(unet, z_start, d_lcd, cond, uncond, s_lcd, alpha_bar))
    at_zero = d_lcd.t_prev == 0
    assert at_zero.any() and not at_zero.all()
    target_pcm = pcm.phased_consistency_target(unet, z_prev, d_pcm, cond, s_pcm, alpha_bar)
    target_lcd = lcd.consistency_target(unet, z_prev, d_lcd, cond, s_lcd, alpha_bar)
    assert torch.equal(target_pcm[at_zero], target_lcd[at_zero])


@pytest.mark.parametrize(("family", "prediction_type"), [("sd15", "epsilon"), ("sd15", "v_prediction"),
                                                         ("sdxl", "epsilon")])
def test_composed_step_shapes_and_finiteness(family, prediction_type):
    unet = _tiny_lora_unet(family)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    cond, uncond = _conditioning(unet, 3)
    s = settings(family=family, prediction_type=prediction_type)
    alpha_bar = lcd.alphas_cumprod()
    d = pcm.draw_pcm_sample(latents, s, GRID, torch.Generator().manual_seed(9))
    assert d.edge.shape == d.t_start.shape == d.t_prev.shape == (3,)
    assert bool((d.edge <= d.t_prev).all() and (d.t_prev < d.t_start).all())
    z_start = lcd.add_noise(latents, d.noise, d.t_start, alpha_bar)
    pred = pcm.phased_student_prediction(unet, z_start, d, cond, s, alpha_bar)
    z_prev = lcd.teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
    target = pcm.phased_consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    assert pred.shape == target.shape == latents.shape
    assert bool(torch.isfinite(pred).all() and torch.isfinite(target).all())
    loss = pcm.pcm_loss(unet, unet, latents, cond, uncond, s, alpha_bar, GRID, torch.Generator().manual_seed(9))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad


def test_a_few_steps_lower_the_pcm_loss():
    """AdamW on the LoRA (lr 1e-3, 10 steps, one batch, the same draws each step) lowers the loss by >= 20%."""
    from components.lora.adapter import lora_parameters

    unet = _tiny_lora_unet(random_b=False).train()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    cond, uncond = _conditioning(unet, 4)
    s = settings(loss_type="l2")
    alpha_bar = lcd.alphas_cumprod()
    opt = torch.optim.AdamW(lora_parameters(unet), lr=1e-3, weight_decay=0.0)

    def loss_now():
        return pcm.pcm_loss(unet, unet, latents, cond, uncond, s, alpha_bar, GRID, torch.Generator().manual_seed(12))

    with torch.no_grad():
        before = loss_now().item()
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        loss_now().backward()
        opt.step()
    with torch.no_grad():
        after = loss_now().item()
    assert after < 0.8 * before, (before, after)
