"""Deterministic DDIM sampling that starts part-way through the reverse process (Eq. 9-11), as pure functions.

Notation (Ho et al. 2020; Song et al. 2020a; diffusers' DDIMScheduler)::

    ᾱ_t       alphas_cumprod[t], t in {0, ..., num_train_timesteps - 1}
    x_t       sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε                      q(x_t | x_0), Eq. 4
    T         number of DDIM steps of the schedule (the paper uses 50)
    τ_1..τ_T  the T timesteps of the schedule, descending, from the model's scheduler config
    t0        a fraction of T: DYOD runs the last n = round(t0·T) steps, starting at τ_{T-n+1}

``t0 = 1`` runs all T steps from pure noise x_T = ε (plain text-to-image). ``t0 < 1`` perturbs x' to the first
timestep of the last n steps with Eq. 4 and runs n steps: n UNet calls (one batched call for guidance)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import DyodError
from .performance import to_device_async

# model(x_t, t) -> raw network output (ε, v or x_0 depending on the model's prediction type)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The T-step DDIM schedule of a model, read from its scheduler config."""

    timesteps: torch.Tensor  # [T] descending
    alphas_cumprod: torch.Tensor  # [num_train_timesteps], float32 as in diffusers (same rounding, same results)
    final_alpha_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    clip_sample_range: float | None  # x_0 is clipped to ±this when the config says clip_sample

    @classmethod
    def from_scheduler_config(cls, config: dict, num_inference_steps: int = 50) -> "Schedule":
        from diffusers import DDIMScheduler

        if num_inference_steps < 1:
            raise DyodError(f"the number of DDIM steps T must be >= 1, got {num_inference_steps}")
        scheduler = DDIMScheduler.from_config(config)
        if scheduler.config.thresholding:
            raise DyodError("the scheduler config asks for dynamic thresholding, which dyod's DDIM does not implement")
        if num_inference_steps > scheduler.config.num_train_timesteps:
            raise DyodError(
                f"T={num_inference_steps} DDIM steps exceeds the model's {scheduler.config.num_train_timesteps} "
                "training timesteps"
            )
        scheduler.set_timesteps(num_inference_steps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise DyodError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")
        return cls(
            timesteps=scheduler.timesteps.clone().long(),
            alphas_cumprod=scheduler.alphas_cumprod.clone().float(),
            final_alpha_cumprod=torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).clone(),
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
            prediction_type=prediction_type,
            clip_sample_range=float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None,
        )

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def alpha_cumprod(self, t: int) -> torch.Tensor:
        """ᾱ_t as a 0-d tensor; at a negative t, the final value (1 when set_alpha_to_one)."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def previous_timestep(self, t: int) -> int:
        # diffusers' DDIMScheduler convention: step back by num_train_timesteps // T.
        return t - self.num_train_timesteps // self.num_inference_steps

    def start(self, t0: float) -> torch.Tensor:
        """The timesteps DYOD runs for a start fraction t0: the last ``num_denoising_steps(t0, T)`` of τ."""
        n = num_denoising_steps(t0, self.num_inference_steps)
        return self.timesteps[self.num_inference_steps - n :]


def num_denoising_steps(t0: float, num_inference_steps: int) -> int:
    """n = round(t0·T), at least 1: the number of reverse steps, and UNet calls, for a start fraction t0.

    Unlike diffusers' img2img (``int(T·strength)``, so 0.58·50 gives 28), this rounds to the nearest step."""
    if not (isinstance(t0, (int, float)) and math.isfinite(t0) and 0.0 < t0 <= 1.0):
        raise DyodError(f"t0 must be a fraction of T in (0, 1], got {t0!r}")
    return min(num_inference_steps, max(1, round(t0 * num_inference_steps)))


# ᾱ may be a float or a 0-d tensor; ``** 0.5`` keeps diffusers' float32 rounding when it is a tensor.
def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod) -> torch.Tensor:
    """Eq. 4: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε."""
    return alpha_cumprod**0.5 * x0 + (1 - alpha_cumprod) ** 0.5 * noise


def predict_x0_and_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the network output into (x̂_0, ε̂) for any prediction type (DDIM Eq. 12's two ingredients)."""
    a, s = alpha_cumprod**0.5, (1 - alpha_cumprod) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "v_prediction":  # v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x_0 (Salimans & Ho, 2022)
        x0 = a * x_t - s * model_output
        eps = a * model_output + s * x_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:
        raise DyodError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod_prev) -> torch.Tensor:
    """DDIM Eq. 12 with η = 0: x_{t-1} = sqrt(ᾱ_{t-1})·x̂_0 + sqrt(1 - ᾱ_{t-1})·ε̂ (deterministic)."""
    return alpha_cumprod_prev**0.5 * x0 + (1 - alpha_cumprod_prev) ** 0.5 * eps


def start_latents(x_prime: torch.Tensor | None, noise: torch.Tensor, schedule: Schedule, t0: float) -> torch.Tensor:
    """x_{t0}: the perturbed initialization q(x_{t0} | x') of Eq. 9 and Eq. 11, or pure noise x_T when t0 = 1.

    ``x_prime`` may be None only for t0 = 1."""
    num_denoising_steps(t0, schedule.num_inference_steps)  # validates t0
    if t0 == 1.0:
        return noise.clone()  # DDIM's init_noise_sigma is 1: x_T ~ N(0, I), the "S* alone" baseline
    if x_prime is None:
        raise DyodError("t0 < 1 needs an initialization x' (a custom-VAE sample or an input image)")
    t_start = int(schedule.start(t0)[0])
    return q_sample(x_prime, noise, schedule.alpha_cumprod(t_start))


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run the deterministic reverse process p_phi(x_{0:t0-1} | x_{t0}, c*) over ``timesteps`` (descending)."""
    # The ᾱ values stay 0-d CPU tensors (CUDA kernels take them as scalars, as in diffusers) and the timesteps move
    # to the device once: nothing in the loop waits for the GPU, so the host can queue the next step's kernels.
    timesteps_on_device = to_device_async(timesteps, x.device)
    for i, t in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc="DDIM", leave=False)):
        alpha_cumprod = schedule.alpha_cumprod(t)
        model_output = model(x, timesteps_on_device[i])
        x0, eps = predict_x0_and_eps(model_output.to(x.dtype), x, alpha_cumprod, schedule.prediction_type)
        if schedule.clip_sample_range is not None:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        x = ddim_step(x0, eps, schedule.alpha_cumprod(schedule.previous_timestep(t)))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x
