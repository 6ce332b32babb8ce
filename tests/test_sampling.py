"""The DDIM math and the start-at-t0 definition, checked against diffusers' DDIMScheduler without any model."""

import pytest
import torch
from diffusers import DDIMScheduler

from dyod.errors import DyodError
from dyod.sampling import Schedule, num_denoising_steps, q_sample, sample_ddim, start_latents

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
            clip_sample=False, num_train_timesteps=1000)


def dummy_model(x, t):
    return x * t / (t + 1)  # diffusers' scheduler-test model


@pytest.mark.parametrize("prediction_type,spacing", [("epsilon", "leading"), ("v_prediction", "trailing"), ("sample", "linspace")])
def test_sample_ddim_matches_diffusers_ddim_scheduler(prediction_type, spacing):
    config = {**SD15, "prediction_type": prediction_type, "timestep_spacing": spacing}
    schedule = Schedule.from_scheduler_config(config, 50)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim(dummy_model, x.clone(), schedule.timesteps, schedule, progress=False)

    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(50)
    ref = x.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(dummy_model(ref, t), t, ref, eta=0.0).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_clip_sample_matches_diffusers():
    config = {**SD15, "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon"}
    schedule = Schedule.from_scheduler_config(config, 10)
    x = 3 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample_ddim(dummy_model, x.clone(), schedule.timesteps, schedule, progress=False)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    ref = x.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(dummy_model(ref, t), t, ref).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t0,expected_steps,expected_start", [(1.0, 50, 981), (0.7, 35, 681), (0.3, 15, 281), (0.58, 29, 561), (0.01, 1, 1)])
def test_t0_maps_to_documented_start_and_call_count(t0, expected_steps, expected_start):
    """n = round(t0·T) steps, starting at the n-th last timestep of the T-step schedule; one model call per step."""
    schedule = Schedule.from_scheduler_config({**SD15, "prediction_type": "epsilon"}, 50)
    assert num_denoising_steps(t0, 50) == expected_steps
    timesteps = schedule.start(t0)
    assert len(timesteps) == expected_steps
    assert int(timesteps[0]) == expected_start
    assert int(timesteps[-1]) == 1

    calls = []

    def counting(x, t):
        calls.append(int(t))
        return torch.zeros_like(x)

    sample_ddim(counting, torch.zeros(1, 4, 2, 2), timesteps, schedule, progress=False)
    assert len(calls) == expected_steps and calls[0] == expected_start


def test_rounding_differs_from_img2img_truncation():
    # diffusers' img2img takes int(50 * 0.58) = 28 steps; dyod rounds to the nearest step.
    assert int(50 * 0.58) == 28
    assert num_denoising_steps(0.58, 50) == 29


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_t0_outside_unit_interval_is_refused(bad):
    with pytest.raises(DyodError, match="t0 must be a fraction of T in"):
        num_denoising_steps(bad, 50)


def test_q_sample_matches_add_noise_and_t0_one_is_pure_noise():
    config = {**SD15, "prediction_type": "epsilon"}
    schedule = Schedule.from_scheduler_config(config, 50)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    scheduler = DDIMScheduler(**config)
    t = int(schedule.start(0.6)[0])
    torch.testing.assert_close(start_latents(x0, eps, schedule, 0.6), scheduler.add_noise(x0, eps, torch.tensor([t])))
    torch.testing.assert_close(q_sample(x0, eps, schedule.alpha_cumprod(t)), scheduler.add_noise(x0, eps, torch.tensor([t])))
    assert torch.equal(start_latents(None, eps, schedule, 1.0), eps)
    with pytest.raises(DyodError, match="needs an initialization"):
        start_latents(None, eps, schedule, 0.5)
