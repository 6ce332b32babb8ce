"""Speed and memory on a GPU without changing the method: precision, memory layout, fused projections,
``torch.compile`` and gradient checkpointing for the frozen UNet.

Every switch here keeps the numbers of the fp32 path up to rounding (the SD-1.5 benchmark measures the difference);
none changes what is computed."""

from __future__ import annotations

import logging

import torch

from .config import COMPILE_MODES, PRECISIONS, canonical_checkpointing
from .errors import DyodError

logger = logging.getLogger(__name__)

CUDA_GRAPHS = "cuda-graphs"


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (what Stable Diffusion is run in), fp32 elsewhere (CPU half convolutions are slow)."""
    if precision not in PRECISIONS:
        raise DyodError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_mixed_precision(mixed_precision: str, device: str | None = None) -> str:
    """Training's ``auto``: bf16 on a CUDA GPU that computes in it (compute capability 8.0, Ampere, and newer), fp16 on
    older ones (the paper's GTX 1080 Ti, a T4, a V100), fp32 ("no") on the CPU. PyTorch reports bf16 as supported on
    the older GPUs too, where it only emulates it: slowly, and without tensor cores."""
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cpu" or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def training_on_cpu(device: str | None) -> bool:
    """The training stages' ``device``: None (Accelerate's choice: the GPU, else the CPU) or "cpu" to force the CPU.
    Accelerate places a single process on the default GPU itself, so a named one (cuda:1) would be ignored: refused,
    with the way to choose a GPU that Accelerate and every other process honour."""
    if device is None or device == "cpu":
        return device == "cpu"
    parsed = torch.device(device)
    if parsed.type in ("cuda", "mps") and parsed.index in (None, 0):
        return False
    raise DyodError(f"--device {device}: training runs where Accelerate places it (the first GPU, else the CPU); to "
                    f"train on another GPU make it the only visible one, e.g. `CUDA_VISIBLE_DEVICES={parsed.index or 0} "
                    "dyod ...` (a launch over several GPUs: `accelerate launch -m dyod.cli ...`), or give --device cpu")


def check_mixed_precision(mixed_precision: str, device: torch.device | str) -> None:
    """fp16 mixed precision is CUDA's: on the CPU Accelerate runs no fp16 autocast, so the fp16 UNet would meet fp32
    inputs at its first layer. Say so before any work, naming the flag and what runs there instead."""
    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise DyodError("--mixed-precision fp16 needs a CUDA GPU (Accelerate has no fp16 autocast on the CPU); on the "
                        "CPU use --mixed-precision bf16, or no (what auto picks there)")


def check_compile_mode(mode: str | None) -> str | None:
    if mode in (None, "none"):
        return None
    if mode not in COMPILE_MODES:
        raise DyodError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def check_compile_device(mode: str | None, device: torch.device | str, flag: str = "--compile") -> None:
    """torch.compile's kernels are Triton's, which need a CUDA GPU of compute capability 7.0 (Volta) or newer: on an
    older one (the paper's GTX 1080 Ti is 6.1) the first call would fail inside inductor, after the set-up. Say so
    before any work, naming the flag and what runs there instead."""
    mode = check_compile_mode(mode)
    device = torch.device(device)
    if mode in (None, CUDA_GRAPHS) or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        raise DyodError(
            f"{flag} {mode}: torch.compile generates Triton kernels, which need a GPU of compute capability 7.0 or "
            f"newer, and {torch.cuda.get_device_name(device)} is {major}.{minor}. Use {flag} cuda-graphs (CUDA graphs "
            f"of PyTorch's own kernels, which run on it) or {flag} none")


def to_device_async(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x.to(device)`` without waiting for the GPU: a copy from ordinary (pageable) CPU memory waits for the stream to
    drain, one from pinned memory does not (PyTorch caches the pinned blocks, so pinning a small batch is cheap)."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


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


def compile_module(module: torch.nn.Module, mode: str | None, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` with fixed shapes (the loop's batch and resolution do not change), as one graph: a graph
    break would silently cost the CUDA graphs their point, so it is an error (tests trace with ``aot_eager``).

    ``cuda-graphs``: dynamo's ``cudagraphs`` backend, which records the eager kernels (traced forward and backward)
    as CUDA graphs and replays them: the host's per-kernel work goes, as with ``reduce-overhead``, without inductor's
    kernel generation (tracing takes seconds); the kernels, and so the numbers, are eager PyTorch's. Off CUDA it
    runs the traced graph as it is."""
    mode = check_compile_mode(mode)
    if mode is None:
        return module
    if mode == CUDA_GRAPHS and backend == "inductor":
        backend = "cudagraphs"
        backend_log = logging.getLogger("torch._inductor.cudagraph_utils")
        if next(module.parameters()).device.type != "cuda" and backend_log.level != logging.ERROR:
            # the backend says at length, for every graph, that it records no CUDA graph off CUDA: say it once here
            backend_log.setLevel(logging.ERROR)
            logger.info("--compile cuda-graphs: off CUDA there is no CUDA graph to record; the traced graph runs as it is")
    logger.info("torch.compile(%s, mode=%s): the first call compiles (%s, once per shape)", type(module).__name__,
                mode, "seconds of tracing" if mode == CUDA_GRAPHS else "a minute or more at SD scale")
    if backend != "inductor":  # modes are inductor's
        return torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    return torch.compile(module, mode=mode, fullgraph=True, dynamic=False)


def use_channels_last(channels_last: bool | None, compile_mode: str | None) -> bool:
    """``None`` (the default): channels-last only for a model inductor compiles. Eager (and ``cuda-graphs``, which
    replays the eager kernels), PyTorch's CUDA group norm works on contiguous (NCHW) tensors only
    (pytorch/pytorch#111824), so in the GroupNorm -> SiLU -> conv blocks of a diffusion UNet every norm converts a
    channels-last input and every convolution converts back: copies in each block, which cost memory and time eagerly
    (docs/PERFORMANCE.md). Compiled, inductor chooses the layouts and fuses the conversions."""
    if channels_last is not None:
        return channels_last
    return check_compile_mode(compile_mode) not in (None, CUDA_GRAPHS)  # cuda-graphs replays the eager kernels


def optimize_for_sampling(prior, channels_last: bool | None = None, fuse_projections: bool = True,
                          compile_mode: str | None = None, compile_backend: str = "inductor") -> None:
    """In place: the frozen prior's UNet and autoencoder set up for fast no-grad sampling. Compiling covers the UNet
    and the autoencoder's encoder and decoder (a batch's pass through them costs a fifth of the compiled loop at SD
    scale); each compiles once per batch size."""
    device = prior.unet.device
    if compile_backend == "inductor":
        check_compile_device(compile_mode, device)
    use_fast_kernels(device)
    if use_channels_last(channels_last, compile_mode):
        prior.unet.to(memory_format=torch.channels_last)
        prior.vae.to(memory_format=torch.channels_last)
    if fuse_projections:
        fuse_qkv(prior.unet)
    prior.unet = compile_module(prior.unet, compile_mode, compile_backend)
    prior.vae.encoder = compile_module(prior.vae.encoder, compile_mode, compile_backend)
    prior.vae.decoder = compile_module(prior.vae.decoder, compile_mode, compile_backend)


def parse_checkpointing(value: str | bool | int) -> tuple[int | None, bool]:
    """``--gradient-checkpointing`` (any spelling ``config.canonical_checkpointing`` reads) as (levels, feed-forwards):
    the number of finest resolution levels whose blocks are recomputed entirely (0: none, None: every block), and
    whether the feed-forwards elsewhere recompute their projection. none -> (0, False), feed-forward -> (0, True),
    ``N`` -> (N, True), all -> (None, False)."""
    try:
        text = canonical_checkpointing(value)
    except ValueError as e:
        raise DyodError(str(e)) from None
    if text == "auto":
        raise DyodError("--gradient-checkpointing auto is chosen by dyod.inversion.PromptTrainer (it tries a step); "
                        "here give none, feed-forward, all or a number of levels")
    if text in ("none", "feed-forward"):
        return 0, text == "feed-forward"
    return (None, False) if text == "all" else (int(text), True)


def enable_checkpointing(unet, levels: int | None, feed_forwards: bool = False) -> int:
    """Recompute, in the backward pass, the activations of the blocks at the ``levels`` finest resolutions of the UNet
    (its outermost down and up blocks; ``None``: every block, the middle one included) instead of keeping them, and
    with ``feed_forwards`` the GEGLU projections of the transformer blocks elsewhere
    (``dyod.frozen_layers.RecomputedFeedForward``). Each call replaces the previous setting.

    The finest levels hold most of the activation memory for a share of the FLOPs, so checkpointing them buys most of
    the memory for part of the recomputation; the feed-forward projections hold much of it for little arithmetic
    (``benchmarks/training_memory.py --breakdown`` measures both; docs/PERFORMANCE.md). Returns the number of
    checkpointed blocks."""
    from .frozen_layers import recompute_feed_forwards  # imports diffusers

    chosen_blocks = []
    n_levels = len(unet.down_blocks)
    if levels is not None and levels >= n_levels:
        levels = None  # every level: the whole UNet
    if levels != 0:
        unet.enable_gradient_checkpointing()  # installs the (non-reentrant) checkpoint function on every block
        if levels is None:
            chosen_blocks = [unet]
        else:
            chosen_blocks = [*unet.down_blocks[:levels], *unet.up_blocks[n_levels - levels:]]
    chosen = {id(m) for block in chosen_blocks for m in block.modules()}
    count = 0
    for module in unet.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = id(module) in chosen
            count += module.gradient_checkpointing
    recomputed = recompute_feed_forwards(unet, feed_forwards, skip=chosen_blocks)
    if levels != 0 or feed_forwards:
        logger.info("gradient checkpointing: %s resolution levels of the UNet, %d blocks recomputed in the backward "
                    "pass, and %d feed-forward projections", "all" if levels is None else levels, count, recomputed)
    return count


def store_linears_in(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen ``nn.Linear`` weights of ``module`` in ``dtype``, the autocast precision they run in anyway.

    Autocast casts a linear layer's weight and bias to its dtype at every call; storing them in it gives the same
    numbers without the fp32 weights, without the casts, and without the cast copies a training step keeps for its
    backward pass. Norms and embeddings (autocast
    runs them in fp32) keep their precision. Returns the number of layers changed."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and not any(p.requires_grad for p in layer.parameters()):
            layer.to(dtype)
            count += 1
    return count


def optimize_for_training(prior, channels_last: bool | None = None, gradient_checkpointing: str | bool | int = "none",
                          compile_mode: str | None = None, autocast_dtype: torch.dtype | None = None,
                          compile_backend: str = "inductor") -> None:
    """In place: the frozen prior set up for the dataset-prompt step (gradients flow to the text condition only): its
    convolutions and GEGLUs keep less for the backward pass (``dyod.frozen_layers``), optionally checkpointed by level
    and compiled.

    ``autocast_dtype``: the mixed precision the text encoder runs under (its frozen linear layers are stored in it)."""
    from .frozen_layers import keep_less_for_backward  # imports diffusers

    if compile_backend == "inductor":
        check_compile_device(compile_mode, prior.unet.device, "--compile-unet")
    use_fast_kernels(prior.unet.device)
    if use_channels_last(channels_last, compile_mode):
        prior.unet.to(memory_format=torch.channels_last)
    lean = keep_less_for_backward(prior.unet)
    logger.debug("%d frozen convolutions and GEGLUs of the UNet keep less for the backward pass", lean)
    enable_checkpointing(prior.unet, *parse_checkpointing(gradient_checkpointing))
    if autocast_dtype is not None and autocast_dtype != torch.float32:
        store_linears_in(prior.text_encoder, autocast_dtype)
    prior.unet = compile_module(prior.unet, compile_mode, compile_backend)


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
