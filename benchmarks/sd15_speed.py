"""Speed and memory at Stable Diffusion 1.5 scale, dyod side by side with diffusers, in one run on one device.

Speed and memory of a UNet do not depend on the weight values, so the components are SD-1.5-shaped and randomly
initialized (UNet 860 M parameters, CLIP text model 768 wide × 12 layers, the SD AutoencoderKL); nothing is
downloaded. Prints one table:

1. sampling: dyod's distribution-initialized sampler at t0 = 0.7 on the 50-step schedule vs diffusers'
   StableDiffusionImg2ImgPipeline (strength 0.7) and StableDiffusionPipeline (50 steps), guidance 7.5, same batch
   and dtype: images/s, peak memory, model FLOP utilization (UNet FLOPs counted with torch.utils.flop_counter,
   over the fp16 matrix-product rate measured in the same run); dyod eager and dyod with ``torch.compile``;
2. dataset-prompt training: dyod's step (cached latents, only the new rows trainable, frozen UNet in half
   precision) vs the diffusers textual-inversion example's (frozen fp16 UNet and VAE, VAE encoding every step, fp32
   text encoder with the whole embedding table trainable, fp16 autocast) at batch 1, 4 and 8;
3. the other stages' peak memory (encoding the dataset once) and the numerical faithfulness of the fast paths
   against the fp32 path (relative L2 error of one UNet call and of the 35-step latents).

Each method loads its own components and frees them before the next, so a peak is that method's alone.

    python benchmarks/sd15_speed.py                      # on a GPU (fp16, 512 px, batch 8)
    python benchmarks/sd15_speed.py --tiny               # toy shapes on the CPU: the same code paths (used by a test)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch


@dataclasses.dataclass
class Shapes:
    resolution: int
    unet: dict
    text: dict
    vae: dict
    batch: int
    train_batches: tuple[int, ...]
    iters: int
    train_iters: int


SD15 = Shapes(
    resolution=512,
    unet=dict(sample_size=64, cross_attention_dim=768),  # UNet2DConditionModel's defaults are SD 1.5's
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    batch=8, train_batches=(1, 4, 8), iters=3, train_iters=10,
)
TINY = Shapes(
    resolution=16,
    unet=dict(sample_size=8, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    batch=2, train_batches=(1, 2), iters=1, train_iters=1,
)
T0, STEPS, GUIDANCE = 0.7, 50, 7.5
SAMPLING_CALLS = {"dyod": round(T0 * STEPS), "img2img": int(T0 * STEPS), "txt2img": STEPS}
# Seconds an optional compiled row takes with its compilation, so that it starts only where the budget holds it: the
# compiled sampling row took 70 s on an H100 (61 s of it compiling); a training step compiles a forward and a
# backward graph (a guess until measured: twice that)
COMPILED_SAMPLING_COST_S, COMPILED_TRAINING_COST_S = 75, 150
CUDA_GRAPHS_COST_S = 60  # dyod's cuda-graphs mode traces (seconds) and records the eager kernels; no kernel generation


def compile_label(mode: str) -> str:
    return "CUDA graphs of the eager kernels" if mode == "cuda-graphs" else f"torch.compile({mode})"


def compiled_cost_s(mode: str, stage_cost_s: float) -> float:
    return CUDA_GRAPHS_COST_S if mode == "cuda-graphs" else stage_cost_s


def build_model(folder: Path, shapes: Shapes, device) -> Path:
    """A randomly initialized SD-shaped model in diffusers layout (fp16 files on a GPU: half the bytes to load)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dyod.testing import write_clip_tokenizer

    write_clip_tokenizer(folder / "tokenizer", model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):  # initializing 860 M parameters is much faster on the GPU
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 1000), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            **shapes.text))
        unet, vae = UNet2DConditionModel(**shapes.unet), AutoencoderKL(**shapes.vae)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if torch.device(device).type == "cuda":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder)
    del pipe, unet, vae, text
    free()
    return folder


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def measure(device):
    """Yields a dict that gets seconds and peak memory (GiB, CUDA only) of the block."""
    result = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    yield result
    result["host_seconds"] = time.perf_counter() - start  # until the host has queued everything (no final sync)
    sync(device)
    result["seconds"] = time.perf_counter() - start
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


@contextlib.contextmanager
def tf32_off():
    """True fp32 arithmetic inside (the reference the fast paths are compared with): no TF32 matrix products."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def matmul_tflops(device, dtype) -> float | None:
    """The fp16 matrix-product rate of this device, measured now (the MFU denominator)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Bench:
    """Collects rows; each method runs in isolation, and a failing variant becomes a row that says why."""

    def __init__(self, shapes: Shapes, device, dtype, json_path: Path | None, deadline: float):
        self.shapes, self.device, self.dtype = shapes, device, dtype
        self.rows: list[dict] = []
        self.notes: dict = {}
        self.json_path = json_path
        self.deadline = deadline
        self.peak = matmul_tflops(device, dtype)

    def add(self, **row):
        row.setdefault("error", None)
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print("row:", json.dumps(shown), flush=True)
        self.save()

    def save(self):
        if self.json_path:
            self.json_path.write_text(json.dumps({"notes": self.notes, "rows": self.rows}, indent=2))

    def time_left(self) -> float:
        return self.deadline - time.time()

    def run(self, stage: str, method: str, batch: int, setup, iters: int, warmup: int = 1,
            flops_per_iter: float | None = None, optional: bool = False, cost_s: float = 60):
        """``setup()`` -> (callable, after); time ``iters`` calls after ``warmup`` (the first compiles), then call
        ``after()`` (untimed extras) if given."""
        if optional and self.time_left() < cost_s:  # an optional row starts only if it can end within the budget
            self.add(stage=stage, method=method, batch=batch, images_per_s=None, peak_gib=None, mfu=None,
                     error="skipped: out of time")
            return None
        fn = after = None
        try:
            start = time.time()
            fn, after = setup()
            setup_s = time.time() - start  # loading, and for training rows the FLOP count
            for _ in range(warmup):
                fn()
            sync(self.device)
            warm_s = time.time() - start
            with measure(self.device) as m:
                for _ in range(iters):
                    out = fn()
            images_per_s = iters * batch / m["seconds"]
            mfu = (flops_per_iter * iters / m["seconds"] / 1e12 / self.peak) if flops_per_iter and self.peak else None
            # host_share near 1: the host's Python and dispatch set the pace (the GPU waits for work), not the GPU —
            # or the call reads something back from the device each time (PIL images, fp16's gradient-scaler check)
            self.add(stage=stage, method=method, batch=batch, images_per_s=images_per_s, peak_gib=m["peak_gib"],
                     mfu=mfu, seconds_per_iter=m["seconds"] / iters, setup_and_warmup_s=warm_s, setup_s=setup_s,
                     host_share=m["host_seconds"] / m["seconds"])
            if after is not None:
                after()
                self.save()
            return out
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the rest of the table
            traceback.print_exc()
            self.add(stage=stage, method=method, batch=batch, images_per_s=None, peak_gib=None, mfu=None,
                     error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            return None
        finally:
            del fn, after
            free()


# -- sampling ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def attention_backend(name: str | None):
    """``cudnn``: PyTorch's cuDNN attention first (then flash, memory-efficient, math) for every SDPA call inside."""
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != order]
    with sdpa_kernel([order, *rest], set_priority=True):
        yield


class SamplingRows:
    """The sampling rows, each added by its own call so that ``main`` can order them by priority: the peers and dyod
    eager first, compiled variants later (each compiles for a minute or more), the faithfulness check after those."""

    def __init__(self, bench: Bench, model: Path):
        from dyod import SampleConfig

        self.bench, self.model = bench, model
        shapes = bench.shapes
        b = self.b = shapes.batch
        self.config = SampleConfig(t0=T0, num_inference_steps=STEPS, guidance_scale=GUIDANCE, batch_size=b,
                                   prompt="a photo of an object")
        self.h = shapes.resolution // 2 ** (len(shapes.vae["block_out_channels"]) - 1)  # latent side
        self.latents_in = torch.randn(b, 4, self.h, self.h, generator=torch.Generator().manual_seed(1))
        self.noise_in = torch.randn(b, 4, self.h, self.h, generator=torch.Generator().manual_seed(2))
        self.latents: dict[str, torch.Tensor] = {}  # variant -> its 35-step latents, for the faithfulness check
        self.reference = None  # the fp32 results, computed once
        self.unet_call = self._count()
        bench.notes["unet_tflop_per_image_forward"] = self.unet_call / (2 * b) / 1e12

    def _diffusers_pipe(self, cls):
        from diffusers import DDIMScheduler

        pipe = cls.from_pretrained(self.model, torch_dtype=self.bench.dtype, safety_checker=None,
                                   requires_safety_checker=False).to(self.bench.device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _count(self) -> float:
        """FLOPs of one guided UNet call (batch 2b), counted once on an eager UNet."""
        from diffusers import StableDiffusionPipeline

        device, dtype, b, h = self.bench.device, self.bench.dtype, self.b, self.h
        pipe = self._diffusers_pipe(StableDiffusionPipeline)
        x = torch.randn(2 * b, 4, h, h, device=device, dtype=dtype)
        ctx = torch.randn(2 * b, 77, self.bench.shapes.unet["cross_attention_dim"], device=device, dtype=dtype)
        with torch.no_grad():
            flops = count_flops(partial(pipe.unet, x, torch.tensor(500, device=device), encoder_hidden_states=ctx))
        del pipe
        free()
        return flops

    def peers(self):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        bench, b, shapes = self.bench, self.b, self.bench.shapes
        prompt = ["a photo of an object"] * b
        init = torch.rand(b, 3, shapes.resolution, shapes.resolution, generator=torch.Generator().manual_seed(0))

        def peer(cls, kwargs):
            def setup():
                pipe = self._diffusers_pipe(cls)

                @torch.no_grad()
                def autoencoder():  # what img2img runs besides its reverse process: encode the image, decode the result
                    pixels = pipe.image_processor.preprocess(init).to(bench.device, bench.dtype)
                    latents = pipe.vae.encode(pixels).latent_dist.mean
                    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample

                def after():
                    bench.rows[-1]["phases_s_per_iter"] = {"autoencoder (encode + decode)": self.time(autoencoder)}

                return (lambda: pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                                     **kwargs)), after if cls is StableDiffusionImg2ImgPipeline else None
            return setup

        bench.run("sampling", f"diffusers txt2img {STEPS} steps", b, peer(StableDiffusionPipeline, {}), shapes.iters,
                  flops_per_iter=self.unet_call * SAMPLING_CALLS["txt2img"])
        bench.run("sampling", f"diffusers img2img strength {T0}", b,
                  peer(StableDiffusionImg2ImgPipeline, {"image": init, "strength": T0}), shapes.iters,
                  flops_per_iter=self.unet_call * SAMPLING_CALLS["img2img"])

    def time(self, fn) -> float:
        """Seconds per call of ``fn`` (called once before: a compiled graph may record on its first calls)."""
        fn()
        with measure(self.bench.device) as m:
            for _ in range(self.bench.shapes.iters):
                fn()
        return m["seconds"] / self.bench.shapes.iters

    def phases(self, pipe, run) -> dict:
        """Where a dyod batch's time goes besides the reverse process, each part of ``pipe.sample`` timed alone on the
        same batch: what the sampling target leaves to shorten."""
        from dyod.data import lanczos_resize_tensor

        b, config = self.b, self.config
        z = pipe.z(list(range(b)))

        def custom():
            return lanczos_resize_tensor(pipe.vae_images(z), pipe.prior.resolution).clamp(-1, 1)

        x_prime = custom()
        init = pipe.encode(x_prime)
        latents = run(lambda: pipe.denoise_from(init, self.noise_in, T0, config))
        return {
            "custom VAE + Lanczos up": self.time(custom),
            "encode (prior's autoencoder)": self.time(lambda: pipe.encode(x_prime)),
            "decode + Lanczos down + 8-bit images": self.time(lambda: pipe.to_images(pipe.decode(latents))),
            "text condition (2 prompts)": self.time(lambda: pipe.denoiser(config)),
        }

    def pipe(self, compile_mode="none", optimized=True, pipe_dtype=None, channels_last=None):
        from dyod.pipeline import DyodPipeline
        from dyod.prior import load_prior
        from dyod.vae import VanillaVAE

        device = self.bench.device
        prior = load_prior(self.model, device=device, dtype=pipe_dtype or self.bench.dtype)
        pipe = DyodPipeline(prior, None, custom_vae=VanillaVAE(64, 32).to(device).eval(), output_resolution=64)
        if optimized:
            pipe.optimize(compile=compile_mode, channels_last=channels_last)
        return pipe

    def dyod(self, compile_mode: str = "none", attention: str | None = None, channels_last: bool | None = None):
        """One dyod row: the whole sampler timed, then the reverse process alone (untimed extra)."""
        bench, b, shapes, config = self.bench, self.b, self.bench.shapes, self.config
        key = compile_mode + (f"+{attention}" if attention else "") + ("+channels-last" if channels_last else "")

        def setup():
            pipe = self.pipe(compile_mode, channels_last=channels_last)

            def run(fn):
                with attention_backend(attention):
                    return fn()

            def after():
                # The same fixed x' and ε through the reverse process alone: where the time goes, and the latents
                # for the faithfulness check against fp32.
                with measure(bench.device) as m:
                    for _ in range(shapes.iters):
                        self.latents[key] = run(
                            lambda: pipe.denoise_from(self.latents_in, self.noise_in, T0, config)).float().cpu()
                bench.rows[-1]["reverse_process_s_per_iter"] = m["seconds"] / shapes.iters
                bench.rows[-1]["phases_s_per_iter"] = self.phases(pipe, run)

            # timed: the whole sampler, z -> custom VAE -> Lanczos up -> encode -> DDIM from t0 -> decode -> down
            return (lambda: run(lambda: pipe.sample(b, config, seed=0, progress=False))), after

        name = "dyod t0=0.7" + ("" if compile_mode == "none" else f" + {compile_label(compile_mode)}")
        name += f" + {attention} attention" if attention else ""
        name += " + channels-last (eager)" if channels_last else ""
        warmup = 1 if compile_mode == "none" else 3  # compile, then CUDA-graph warm-up and recording
        bench.run("sampling", name, b, setup, shapes.iters, warmup=warmup,
                  flops_per_iter=self.unet_call * SAMPLING_CALLS["dyod"],
                  optional=compile_mode != "none" or bool(channels_last),
                  cost_s=compiled_cost_s(compile_mode, COMPILED_SAMPLING_COST_S) if compile_mode != "none" else 60)

    def faithfulness(self):
        """fp16 / compiled paths vs the fp32 eager path: one UNet call, and the whole 35-step reverse process of every
        variant timed so far (the fp32 reference is computed once; a later call adds the variants timed since)."""
        bench = self.bench
        if bench.time_left() < 60 and self.reference is None:
            bench.notes.setdefault("faithfulness_relative_l2", "skipped: out of time")
            return
        device, b, h = bench.device, bench.shapes.batch, self.h
        try:
            x = torch.randn(2 * b, 4, h, h, generator=torch.Generator().manual_seed(3)).to(device)
            ctx = torch.randn(2 * b, 77, bench.shapes.unet["cross_attention_dim"],
                              generator=torch.Generator().manual_seed(4)).to(device)
            t = torch.tensor(500, device=device)
            if self.reference is None:
                ref_pipe = self.pipe("none", optimized=False, pipe_dtype=torch.float32)
                with tf32_off(), torch.no_grad():
                    ref_call = ref_pipe.prior.unet(x, t, encoder_hidden_states=ctx).sample.float().cpu()
                    ref_latents = ref_pipe.denoise_from(self.latents_in, self.noise_in, T0, self.config).float().cpu()
                del ref_pipe
                free()
                fast = self.pipe("none")
                with torch.no_grad():
                    fast_call = fast.prior.unet(x.to(bench.dtype), t, encoder_hidden_states=ctx.to(bench.dtype)).sample
                del fast
                free()
                self.reference = ref_latents, rel_err(fast_call.float().cpu(), ref_call)
            ref_latents, call_error = self.reference
            precision = str(bench.dtype).removeprefix("torch.")
            result = {f"one UNet call, dyod {precision} optimized vs fp32": call_error}
            for key, value in self.latents.items():
                mode, *extras = key.split("+")
                label = " + ".join(["eager" if mode == "none" else compile_label(mode),
                                    *(e if e == "channels-last" else f"{e} attention" for e in extras)])
                result[f"{round(T0 * STEPS)}-step latents, dyod {precision} {label} vs fp32"] = rel_err(value, ref_latents)
            bench.notes["faithfulness_relative_l2"] = result
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            bench.notes["faithfulness_relative_l2"] = f"failed: {type(e).__name__}: {e}"
        bench.save()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm())


# -- dataset prompt training ---------------------------------------------------------------------------------------
def _training_parts(model: Path, batch: int, device, half: torch.dtype):
    """Frozen parts in half precision as both methods keep them (and as stored: quicker to load), the text encoder
    fp32 as both train it, and a batch of images."""
    from dyod.prior import load_prior

    prior = load_prior(model, device=device, dtype=half)
    prior.text_encoder.float()
    res = prior.resolution
    pixels = torch.rand(batch, 3, res, res, device=device, generator=torch.Generator(device).manual_seed(0)) * 2 - 1
    return prior, pixels


def dyod_training_step(model: Path, batch: int, device, half: torch.dtype, mixed_precision: str,
                       gradient_checkpointing: str = "none", compile_mode: str = "none", channels_last: bool = False,
                       lean_layers: bool = True):
    """dyod's dataset-prompt step, the one ``dyod invert`` runs (``dyod.inversion.PromptTrainer``): the batch drawn
    from the latent cache on the CPU and copied without waiting, only the new row trainable, the frozen UNet in the
    training precision outside autocast with its convolutions and GEGLUs keeping less for the backward pass
    (``lean_layers=False``: autograd's own, as before), the text encoder's frozen linear layers in the autocast
    precision. Returns ``step() -> loss`` with ``step.on_device`` (the modules left on the device) and
    ``step.optimizer``."""
    from dyod import InversionConfig
    from dyod.frozen_layers import restore
    from dyod.inversion import LatentCache, PromptTrainer
    from dyod.performance import new_accelerator

    accelerator = new_accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    prior, pixels = _training_parts(model, batch, device, half)
    with torch.no_grad():  # the cache: the frozen VAE encodes the dataset once, then leaves the device
        posterior = prior.vae.float().encode(pixels).latent_dist
        cache = LatentCache(posterior.mean.float().cpu(), posterior.std.float().cpu())
    prior.vae.to("cpu")
    del pixels, posterior
    config = InversionConfig(batch_size=batch, templates=("a photo of {}",), mixed_precision=mixed_precision,
                             gradient_checkpointing=gradient_checkpointing, compile_unet=compile_mode)
    trainer = PromptTrainer(prior, cache, config, accelerator)
    if channels_last and compile_mode == "none":  # the eager layout dyod used before (see performance.use_channels_last)
        prior.unet.to(memory_format=torch.channels_last)
    if not lean_layers:  # before the first step: a compiled UNet traces then
        restore(prior.unet)

    losses = []  # every step's loss, left on the device (reading it would wait for the GPU)

    def step():
        loss = trainer.step()
        losses.append(loss)
        return loss

    step.on_device, step.optimizer, step.losses = (prior.unet, prior.text_encoder), trainer.optimizer, losses
    step.trainer = trainer
    return step


def peer_training_step(model: Path, batch: int, device, half: torch.dtype, mixed_precision: str):
    """diffusers/examples/textual_inversion/textual_inversion.py, one step, as it does it: frozen half UNet and VAE,
    the VAE encoding every step, the fp32 text encoder with the whole table trainable and restored after each step."""
    from diffusers import DDPMScheduler

    from dyod.embeddings import add_placeholder_tokens
    from dyod.performance import new_accelerator

    accelerator = new_accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    prior, pixels = _training_parts(model, batch, device, half)
    ids = add_placeholder_tokens(prior.tokenizer, prior.text_encoder, "<s>", 1)
    input_ids = prior.tokenizer(["a photo of <s>"] * batch, padding="max_length", max_length=77,
                                return_tensors="pt").input_ids.to(device)
    prior.unet.to(device, half)
    prior.vae.to(device, half)
    text_encoder = prior.text_encoder
    text_encoder.get_input_embeddings().requires_grad_(True)  # the example trains the whole table
    orig = text_encoder.get_input_embeddings().weight.data.clone()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-3)
    text_encoder, optimizer = accelerator.prepare(text_encoder, optimizer)
    text_encoder.train()
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    keep = torch.ones(len(prior.tokenizer), dtype=torch.bool)
    keep[ids[0]] = False

    def step():
        latents = prior.vae.encode(pixels.to(half)).latent_dist.sample().detach() * prior.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(input_ids)[0].to(dtype=half)
        pred = prior.unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # only the placeholder row may change
            accelerator.unwrap_model(text_encoder).get_input_embeddings().weight[keep] = orig[keep]
        return loss

    step.on_device, step.optimizer = (prior.unet, prior.vae, prior.text_encoder), optimizer
    step.extra_bytes = orig.numel() * orig.element_size()  # the copy of the table it restores from
    return step


FIRST_LOSSES = 3
FP32_TRAINING = "dyod in fp32, TF32 off (the reference)"


def training_faithfulness(rows: list[dict]) -> dict:
    """Each dyod training variant's first losses against eager dyod's at the same batch (same seed, same batches):
    the largest relative difference. Checkpointing recomputes the same arithmetic; compiled kernels round differently.
    Eager dyod's own against the fp32 step's, the reference, as "dyod vs <the fp32 row>"."""
    reference = {r["batch"]: r["first_losses"] for r in rows
                 if r["stage"] == "dataset prompt" and r["method"] == "dyod" and r.get("first_losses")}
    result = {}
    for r in rows:
        ref = reference.get(r["batch"])
        if r["method"] == "dyod" or not r.get("first_losses") or not ref:
            continue
        n = min(len(ref), len(r["first_losses"]))
        losses, ref, key = r["first_losses"][:n], ref[:n], f"{r['method']}, batch {r['batch']}"
        if r["method"] == FP32_TRAINING:
            losses, ref, key = ref, losses, f"dyod vs {key}"
        result[key] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
    return result


def checkpointing_label(setting: str) -> str:
    if setting in ("all", "feed-forward"):
        return {"all": "all blocks", "feed-forward": "the feed-forward projections"}[setting]
    return f"{setting} finest level{'s' if setting != '1' else ''} + feed-forwards"


def bench_training(bench: Bench, model: Path, compile_batches: tuple[int, ...] = (), train_compile_mode: str = "none",
                   part: str = "eager", checkpointing: tuple[str, ...] = ("2",),
                   compile_checkpointing: tuple[str, ...] = ("none",)):
    """``part``: "eager" rows at every batch size; at the largest batch, "compiled" rows (one per
    ``compile_checkpointing`` setting), "checkpointing" rows (one per ``checkpointing`` setting), the "before" row
    (autograd's own frozen layers), the "fp32" row (the step in true fp32, whose first losses are the reference for
    the mixed-precision ones) or the "channels-last" row (the old eager layout)."""
    from dyod.performance import resolve_mixed_precision

    shapes, device = bench.shapes, bench.device
    cpu = device.type == "cpu"
    half = torch.float16 if not cpu else torch.float32
    dyod_precision = resolve_mixed_precision("auto", "cpu" if cpu else None)  # bf16 on GPUs that have it
    peer_precision = "fp16" if not cpu else "no"

    def dyod_setup(batch, flops=None, fp32=False, **options):
        def setup():
            weights, precision = (torch.float32, "no") if fp32 else (half, dyod_precision)
            step = dyod_training_step(model, batch, device, weights, precision, **options)
            if flops is not None:
                flops.append(count_flops(step))

            def after():  # every variant draws the same batches from the same seed: its first losses must agree
                bench.rows[-1]["first_losses"] = [float(loss) for loss in step.losses[:FIRST_LOSSES]]
                if not fp32 and not options and batch == max(shapes.train_batches):
                    # the sample grid `dyod invert` writes every --sample-every steps, next to the step it interrupts
                    with measure(device) as m:
                        step.trainer.preview()
                    bench.rows[-1]["sample_grid_s"] = m["seconds"]
                    bench.rows[-1]["sample_grid_peak_gib"] = m["peak_gib"]

            def fp32_step():
                with tf32_off():
                    return step()
            return (fp32_step if fp32 else step), after
        return setup

    def peer_setup(batch, flops=None):
        def setup():
            step = peer_training_step(model, batch, device, half, peer_precision)
            if flops is not None:
                flops.append(count_flops(step))
            return step, None
        return setup

    if part in ("channels-last", "before", "fp32"):
        batch = max(shapes.train_batches)
        name, option = {"channels-last": ("dyod + channels-last (eager)", {"channels_last": True}),
                        "before": ("dyod with autograd's own frozen layers (before)", {"lean_layers": False}),
                        "fp32": (FP32_TRAINING, {"fp32": True})}[part]
        bench.run("dataset prompt", name, batch, dyod_setup(batch, **option), shapes.train_iters, warmup=2, optional=True)
        return
    if part == "checkpointing":
        batch = max(shapes.train_batches)
        for levels in checkpointing:
            bench.run("dataset prompt", f"dyod + checkpointing {checkpointing_label(levels)}", batch,
                      dyod_setup(batch, gradient_checkpointing=levels), shapes.train_iters, warmup=2, optional=True)
        return
    if part == "compiled":
        for batch in compile_batches:
            for levels in compile_checkpointing:
                extra = "" if levels == "none" else f" + checkpointing {checkpointing_label(levels)}"
                bench.run("dataset prompt", f"dyod + {compile_label(train_compile_mode)}{extra}", batch,
                          dyod_setup(batch, compile_mode=train_compile_mode, gradient_checkpointing=levels),
                          shapes.train_iters, warmup=3, optional=True,
                          cost_s=compiled_cost_s(train_compile_mode, COMPILED_TRAINING_COST_S))
        return
    for batch in shapes.train_batches:
        peer_flops, dyod_flops = [], []
        bench.run("dataset prompt", "diffusers example", batch, peer_setup(batch, peer_flops), shapes.train_iters, warmup=2)
        bench.run("dataset prompt", "dyod", batch, dyod_setup(batch, dyod_flops), shapes.train_iters, warmup=2)
        for row, flops in ((bench.rows[-2], peer_flops), (bench.rows[-1], dyod_flops)):
            if flops and row["images_per_s"] and bench.peak:
                row["mfu"] = flops[0] * row["images_per_s"] / batch / 1e12 / bench.peak


def bench_encoding(bench: Bench, model: Path):
    """Stage 1's one-off pass: the frozen VAE encodes the dataset once, in fp32, 8 images at a time."""
    from dyod.prior import load_prior

    shapes, device = bench.shapes, bench.device
    b = shapes.batch

    def setup():
        prior = load_prior(model)  # as `dyod invert` does: only the VAE is on the device during this pass
        prior.vae.to(device)
        pixels = torch.rand(b, 3, shapes.resolution, shapes.resolution, device=device) * 2 - 1

        @torch.no_grad()
        def encode():
            return prior.vae.encode(pixels).latent_dist.mean
        return encode, None

    bench.run("encode dataset (once)", "dyod, fp32 VAE", b, setup, shapes.iters)


# -- report -------------------------------------------------------------------------------------------------------------
def table(rows: list) -> str:
    lines = ["| stage | method | batch | images/s | vs peer | s per batch (reverse process) | peak GiB | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    peers = {}
    for r in rows:
        if r["method"].startswith("diffusers") and r["images_per_s"]:
            key = (r["stage"], r["batch"])
            # sampling: the peer dyod replaces is img2img at the same strength
            if key not in peers or "img2img" in r["method"]:
                peers[key] = r["images_per_s"]
    for r in rows:
        if r["images_per_s"] is None:
            lines.append(f"| {r['stage']} | {r['method']} | {r['batch']} | {r['error']} | | | | |")
            continue
        peer = peers.get((r["stage"], r["batch"]))
        ratio = f"×{r['images_per_s'] / peer:.2f}" if peer else "-"
        mfu = f"{100 * r['mfu']:.0f} %" if r["mfu"] else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "-"
        seconds = f"{r['seconds_per_iter']:.3f}"
        if r.get("reverse_process_s_per_iter"):
            seconds += f" ({r['reverse_process_s_per_iter']:.3f})"
        lines.append(f"| {r['stage']} | {r['method']} | {r['batch']} | {r['images_per_s']:.2f} | {ratio} | {seconds} | "
                     f"{peak} | {mfu} |")
    phased = [r for r in rows if r.get("phases_s_per_iter")]
    if phased:
        lines += ["", "Where a sampling batch's time goes besides the reverse process (seconds per batch, each part timed "
                  "alone):", "", "| method | part | s per batch |", "|---|---|---|"]
        lines += [f"| {r['method']} | {part} | {seconds:.3f} |" for r in phased
                  for part, seconds in r["phases_s_per_iter"].items()]
    for r in rows:
        if r.get("sample_grid_s") is not None:  # NaN peaks (no CUDA) are left out
            memory = (f", peak {r['sample_grid_peak_gib']:.2f} GiB against the step's {r['peak_gib']:.2f}"
                      if r["peak_gib"] == r["peak_gib"] else "")
            lines += ["", f"The sample grid `dyod invert` writes every --sample-every steps, after the dyod batch "
                          f"{r['batch']} row: {r['sample_grid_s']:.2f} s{memory}"]
    return "\n".join(lines)


def header(device, dtype, tiny: bool, peak) -> str:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    peak_text = f", fp16 matrix product measured at {peak:.0f} TFLOP/s (the MFU denominator)" if peak else ""
    return (f"device: {name}, {dtype}, {'tiny shapes' if tiny else 'SD-1.5 shapes, 512 px'}{peak_text}\n"
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the same code paths)")
    parser.add_argument("--json", default=None, help="also write the rows and notes as JSON (after every row)")
    parser.add_argument("--compile", default="reduce-overhead",
                        help="comma-separated torch.compile modes to try for dyod sampling ('' for none; default "
                             "reduce-overhead; not in --tiny)")
    parser.add_argument("--attention", default="cudnn", choices=("cudnn", "flash", "none"),
                        help="an extra compiled sampling row with this SDPA backend first (default cudnn; not in --tiny)")
    parser.add_argument("--train-compile", default="reduce-overhead",
                        help="torch.compile mode for the training row (default reduce-overhead; 'none' to skip)")
    parser.add_argument("--train-compile-batches", default="8",
                        help="batch sizes that get a compiled training row (default 8; --tiny uses its largest)")
    parser.add_argument("--train-checkpointing", default="feed-forward,1,2,all",
                        help="gradient-checkpointing settings that get a training row at the largest batch (default "
                             "feed-forward,1,2,all: the feed-forward projections, the finest level, the two finest "
                             "(each with the feed-forwards elsewhere), every block; '' for none)")
    parser.add_argument("--train-compile-checkpointing", default="feed-forward,none",
                        help="gradient-checkpointing settings of the compiled training rows, in order (default "
                             "feed-forward,none: the feed-forward projections recomputed, which the CPU measurement "
                             "projects well within 6 GiB at batch 8 for 6 %% more arithmetic, then none)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip optional variants past this many seconds (default 330; none with --tiny, whose "
                             "rows take seconds: its table is the same however busy the machine)")
    parser.add_argument("--sections", default="sampling,training,encoding")
    parser.add_argument("--train-batches", default=None, help="comma-separated training batch sizes (default 1,4,8)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="--tiny: also run the compiled variants (slow)")
    args = parser.parse_args(argv)
    start = time.time()
    shapes = TINY if args.tiny else SD15
    if args.train_batches:
        shapes = dataclasses.replace(shapes, train_batches=tuple(int(x) for x in args.train_batches.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    compile_on = not args.tiny or args.compile_on_cpu
    compile_modes = [m for m in args.compile.split(",") if m and m != "none"] if compile_on else []
    train_compile = args.train_compile if compile_on else "none"
    compile_batches = tuple(int(x) for x in args.train_compile_batches.split(",") if x) if train_compile != "none" else ()
    if args.tiny and compile_batches:
        compile_batches = (max(shapes.train_batches),)
    budget_s = args.budget_s if args.budget_s is not None else math.inf if args.tiny else 330
    bench = Bench(shapes, device, dtype, Path(args.json) if args.json else None, start + budget_s)
    sections = args.sections.split(",")
    checkpointing = tuple(x for x in args.train_checkpointing.split(",") if x)
    compile_checkpointing = tuple(x for x in args.train_compile_checkpointing.split(",") if x)
    attention = None if args.attention == "none" else args.attention
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "sd15-shaped", shapes, device)
        bench.notes["model_build_s"] = time.time() - start
        sampling = SamplingRows(bench, model) if "sampling" in sections else None
        # The rows every run needs first, then the optional ones by how much they say about the targets: when the
        # time budget runs out, what is skipped is the least telling.
        if sampling:
            sampling.peers()
            sampling.dyod("none")
        if "training" in sections:
            bench_training(bench, model)
        if "encoding" in sections:
            bench_encoding(bench, model)
        # The compiled rows, each a minute or two of compiling: training's first, the row that can meet its targets
        # and has not been timed on a GPU yet (compiled sampling was, at x1.36 of the x2 target)
        if "training" in sections and compile_batches:
            bench_training(bench, model, compile_batches, train_compile, part="compiled",
                           compile_checkpointing=compile_checkpointing[:1])
        if sampling:
            for mode in compile_modes:
                sampling.dyod(mode)
            sampling.faithfulness()
        if "training" in sections:  # quick rows (no kernel generation): CUDA graphs of the eager kernels, what the
            # frozen layers change, the first level checkpointed
            bench_training(bench, model, (max(shapes.train_batches),), "cuda-graphs", part="compiled")
            bench_training(bench, model, part="before")
            bench_training(bench, model, part="checkpointing", checkpointing=checkpointing[:1])
            bench_training(bench, model, part="fp32")
        if "training" in sections and compile_batches and compile_checkpointing[1:]:
            bench_training(bench, model, compile_batches, train_compile, part="compiled",
                           compile_checkpointing=compile_checkpointing[1:])
        if "training" in sections:
            bench_training(bench, model, part="checkpointing", checkpointing=checkpointing[1:])
            bench_training(bench, model, part="channels-last")
        if sampling:  # self-attention at 64 x 64 latents: 16 % of the FLOPs, at head size 40 (flash pads it to 64)
            if attention and compile_modes:
                sampling.dyod(compile_modes[0], attention=attention)
            sampling.dyod("cuda-graphs")
            sampling.dyod("none", channels_last=True)
            sampling.faithfulness()  # adds the variants timed since the first check
    bench.notes["wall_s"] = time.time() - start
    if "training" in sections:
        bench.notes["training_first_losses_relative_difference_vs_eager"] = training_faithfulness(bench.rows)
    bench.save()
    text = f"{header(device, dtype, args.tiny, bench.peak)}\n\n{table(bench.rows)}\n\nnotes: {json.dumps(bench.notes, indent=1)}"
    print(text)
    return text


if __name__ == "__main__":
    main()
