"""Speed and memory on a GPU without changing the method: precision, memory layout, fused projections,
``torch.compile`` and gradient checkpointing for the frozen UNet.

Every switch here keeps the numbers of the fp32 path up to rounding (the SD-1.5 benchmark measures the difference);
none changes what is computed."""

from __future__ import annotations

import logging

import torch

from .config import COMPILE_MODES, PRECISIONS
from .errors import DyodError

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (what Stable Diffusion is run in), fp32 elsewhere (CPU half convolutions are slow)."""
    if precision not in PRECISIONS:
        raise DyodError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_mixed_precision(mixed_precision: str, device: str | None = None) -> str:
    """Training's ``auto``: bf16 on a CUDA GPU that has it (fp16 on older ones), fp32 ("no") on the CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cpu" or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_compile_mode(mode: str | None) -> str | None:
    if mode in (None, "none"):
        return None
    if mode not in COMPILE_MODES:
        raise DyodError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def use_fast_kernels(device: torch.device | str) -> None:
    """Let cuDNN pick the fastest convolution algorithm for the fixed shapes of a denoising loop or training step."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def fuse_qkv(unet) -> bool:
    """One matrix product for the self-attention q, k and v (diffusers' ``fuse_qkv_projections``)."""
    fuse = getattr(unet, "fuse_qkv_projections", None)
    if fuse is None:
        return False
    try:
        fuse()
    except Exception as e:  # noqa: BLE001 - an unusual attention processor: keep the unfused model
        logger.warning("could not fuse the UNet's q/k/v projections (%s); continuing unfused", e)
        return False
    return True


def compile_module(module: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """``torch.compile`` with fixed shapes (the loop's batch and resolution do not change)."""
    mode = check_compile_mode(mode)
    if mode is None:
        return module
    return torch.compile(module, mode=mode, fullgraph=True, dynamic=False)


def optimize_for_sampling(prior, channels_last: bool = True, fuse_projections: bool = True,
                          compile_mode: str | None = None) -> None:
    """In place: the frozen prior's UNet and autoencoder set up for fast no-grad sampling."""
    device = prior.unet.device
    use_fast_kernels(device)
    if channels_last:
        prior.unet.to(memory_format=torch.channels_last)
        prior.vae.to(memory_format=torch.channels_last)
    if fuse_projections:
        fuse_qkv(prior.unet)
    prior.unet = compile_module(prior.unet, compile_mode)


def optimize_for_training(prior, channels_last: bool = True, gradient_checkpointing: bool = False,
                          compile_mode: str | None = None) -> None:
    """In place: the frozen UNet set up for the dataset-prompt step (gradients flow to the text condition only)."""
    use_fast_kernels(prior.unet.device)
    if channels_last:
        prior.unet.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        # Recompute each block's activations in the backward pass: less memory, about one more forward pass.
        prior.unet.enable_gradient_checkpointing()
    prior.unet = compile_module(prior.unet, compile_mode)


def new_accelerator(**kwargs):
    """An ``accelerate.Accelerator`` for one training stage, with this stage's own settings.

    Accelerate keeps its state (device, mixed precision) process-wide, so a second stage in the same process (``dyod
    fit`` trains the prompt in bf16, then the custom VAE in fp32) would inherit the first stage's mixed precision or
    be refused. Each stage is one single-process training run here, so the state is reset between stages; under a
    multi-process launch (``accelerate launch``) the state is left alone."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)
