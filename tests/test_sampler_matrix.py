"""The sampler matrix on a tiny random pipeline: methods, shared noise, LoRA toggling, cost counts."""

from __future__ import annotations

import pytest
import torch

from components.evaluate.sampler_matrix import (
    Method,
    build_matrix,
    initial_noise,
    latent_shape,
    lora_loaded,
    make_scheduler,
    run_matrix,
    run_method,
)
from tests.tiny_pipeline import random_lora_folder, single_thread, tiny_sd_pipeline

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

PROMPTS = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]
SEEDS = [10, 11, 12]


@pytest.fixture(scope="module")
def pipe_and_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    pipe = tiny_sd_pipeline(tmp)
    return pipe, random_lora_folder(pipe, tmp / "lora")


def test_build_matrix_rows():
    methods = build_matrix([1, 2, 4], [25, 50], ["ddim", "dpmpp"], teacher_guidance=2.0, lcm_guidance=1.5,
                           tcd_gamma=0.3)
    labels = [m.label for m in methods]
    assert labels == ["lcm-1", "lcm-2", "lcm-4", "tcd-1", "tcd-2", "tcd-4",
                      "ddim-1", "ddim-2", "ddim-4", "ddim-25", "ddim-50",
                      "dpmpp-1", "dpmpp-2", "dpmpp-4", "dpmpp-25", "dpmpp-50"]
    assert all(m.lora and m.guidance_scale == 1.5 for m in methods[:6])
    assert all(not m.lora and m.guidance_scale == 2.0 for m in methods[6:])
    assert {m.gamma for m in methods if m.sampler == "tcd"} == {0.3}
    with pytest.raises(ValueError, match="evaluate.steps"):
        build_matrix([0], [], ["ddim"], 2.0)
    base_rows = [m for m in build_matrix([1, 2], [], ["ddim"], 2.0, lcm_without_lora=True) if m.sampler == "lcm_base"]
    assert [(m.label, m.lora, m.guidance_scale) for m in base_rows] == [("lcm_base-1", False, 1.0),
                                                                       ("lcm_base-2", False, 1.0)]


def test_initial_noise_rows_depend_only_on_their_seed():
    a = initial_noise([5, 6, 7], (4, 8, 8))
    b = initial_noise([7, 5], (4, 8, 8))
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[2], b[0])


def test_teacher_rows_are_the_base_without_the_lora_and_lora_rows_differ(pipe_and_lora):
    pipe, lora = pipe_and_lora
    shape = latent_shape(pipe, 32, 32)
    noise = initial_noise(SEEDS, shape)
    ddim2 = Method("ddim", 2, 2.0, lora=False)
    lcm2 = Method("lcm", 2, 1.0, lora=True)
    kwargs = {"height": 32, "width": 32, "batch_size": 2}
    # Before any LoRA: the plain base.
    plain_teacher = run_method(pipe, ddim2, PROMPTS, noise, SEEDS, timestep_spacing="trailing", **kwargs)
    plain_lcm = run_method(pipe, lcm2, PROMPTS, noise, SEEDS, **kwargs)
    tcd2 = Method("tcd", 2, 1.0, lora=True, gamma=0.3)
    runs = {r.method.label: r for r in run_matrix(pipe, lora, [lcm2, tcd2, ddim2], PROMPTS, SEEDS,
                                                  timestep_spacing="trailing", **kwargs)}
    torch.testing.assert_close(runs["ddim-2"].images, plain_teacher.images, atol=1e-5, rtol=0)
    assert (runs["lcm-2"].images - plain_lcm.images).abs().max() > 1e-3  # the LoRA was active
    # After the matrix: no adapter left behind, the base scheduler restored.
    assert not getattr(pipe.unet, "peft_config", None)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    # Cost: LCM at guidance 1 is one UNet row per step, the teacher with CFG two.
    assert runs["lcm-2"].unet_evals_per_image == 2.0 and runs["ddim-2"].unet_evals_per_image == 4.0
    assert runs["tcd-2"].unet_evals_per_image == 2.0
    assert (runs["tcd-2"].images - runs["lcm-2"].images).abs().max() > 1e-4  # TCDScheduler ran, not LCM
    assert runs["lcm-2"].seconds_per_image > 0.0


def test_results_do_not_depend_on_batching(pipe_and_lora):
    pipe, lora = pipe_and_lora
    noise = initial_noise(SEEDS, latent_shape(pipe, 32, 32))
    with lora_loaded(pipe, lora):
        lcm = Method("lcm", 2, 1.0, lora=True)  # injects noise between steps: per-image generators
        one = run_method(pipe, lcm, PROMPTS, noise, SEEDS, height=32, width=32, batch_size=1)
        three = run_method(pipe, lcm, PROMPTS, noise, SEEDS, height=32, width=32, batch_size=3)
    torch.testing.assert_close(one.images, three.images, atol=1e-5, rtol=0)


def test_a_folder_without_lora_weights_is_refused(pipe_and_lora, tmp_path):
    pipe, _ = pipe_and_lora
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"), lora_loaded(pipe, tmp_path):
        pass


def test_a_pcm_lora_gets_pcm_rows_at_gamma_zero_and_cfg_rows_take_negative_prompts():
    methods = build_matrix([2, 4], [], ["ddim"], teacher_guidance=2.0, student="pcm", cfg_scales=[1.5, 3.0])
    labels = [m.label for m in methods]
    assert labels == ["pcm-2", "pcm-4", "pcm-4-cfg1.5", "pcm-4-cfg3", "ddim-2", "ddim-4"]
    student = [m for m in methods if m.lora]
    assert {m.gamma for m in student} == {0.0} and {m.sampler for m in student} == {"pcm"}
    assert [(m.guidance_scale, m.negative) for m in student] == [(1.0, False), (1.0, False), (1.5, True), (3.0, True)]
    edged = build_matrix([2], [], ["ddim"], 2.0, student="pcm", student_timesteps=lambda n: (999, 499)[:n])
    assert edged[0].timesteps == (999, 499) and edged[1].timesteps is None  # the teacher keeps its own pick
    lcm = build_matrix([4], [], ["ddim"], 2.0, cfg_scales=[3.0], cfg_steps=[2, 4])
    assert [m.label for m in lcm if m.lora] == ["lcm-4", "lcm-2-cfg3", "lcm-4-cfg3"]
    assert {m.gamma for m in lcm if m.lora} == {None}  # an LCM-LoRA's rows are as before


def test_pcm_rows_sample_with_tcd_at_gamma_zero_and_negative_prompts_change_cfg_rows(pipe_and_lora):
    from diffusers import TCDScheduler

    pipe, lora = pipe_and_lora
    noise = initial_noise(SEEDS, latent_shape(pipe, 32, 32))
    kwargs = {"height": 32, "width": 32, "batch_size": 3}
    with lora_loaded(pipe, lora):
        pcm = run_method(pipe, Method("pcm", 2, 1.0, lora=True, gamma=0.0), PROMPTS, noise, SEEDS, **kwargs)
        tcd = run_method(pipe, Method("tcd", 2, 1.0, lora=True, gamma=0.0), PROMPTS, noise, SEEDS, **kwargs)
        edges = run_method(pipe, Method("pcm", 2, 1.0, lora=True, gamma=0.0, timesteps=(999, 479)), PROMPTS, noise,
                           SEEDS, **kwargs)
        cfg = Method("pcm", 2, 3.0, lora=True, gamma=0.0, negative=True, suffix="-cfg3")
        with pytest.raises(ValueError, match="negative prompt"):
            run_method(pipe, cfg, PROMPTS, noise, SEEDS, **kwargs)
        plain = run_method(pipe, cfg, PROMPTS, noise, SEEDS, negative_prompts=[""] * 3, **kwargs)
        negative = run_method(pipe, cfg, PROMPTS, noise, SEEDS, negative_prompts=["a digit seven"] * 3, **kwargs)
    assert isinstance(make_scheduler(Method("pcm", 2, 1.0, True, 0.0), pipe.scheduler.config), TCDScheduler)
    torch.testing.assert_close(pcm.images, tcd.images, atol=0, rtol=0)  # pcm-N is TCD at gamma 0
    assert (edges.images - pcm.images).abs().max() > 1e-4  # explicit edges reach the scheduler
    assert plain.unet_evals_per_image == 4.0  # CFG: two UNet rows per step
    assert (negative.images - plain.images).abs().max() > 1e-4  # the negative prompt reached the pipeline
