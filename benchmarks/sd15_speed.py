"""Speed and memory at Stable Diffusion 1.5 scale, dyod side by side with diffusers, in one run on one device.

Speed and memory of a UNet do not depend on the weight values, so the components are SD-1.5-shaped and randomly
initialized (UNet 860 M parameters, CLIP text model 768 wide × 12 layers, the SD AutoencoderKL); nothing is
downloaded. Prints one table:

1. sampling: dyod's distribution-initialized sampler at t0 = 0.7 on the 50-step schedule vs diffusers'
   StableDiffusionImg2ImgPipeline (strength 0.7) and StableDiffusionPipeline (50 steps): images/s, peak memory,
   model FLOP utilization (FLOPs counted with torch.utils.flop_counter);
2. dataset-prompt training: dyod's step (cached latents, only the new rows trainable, frozen parts in half precision)
   vs the diffusers textual-inversion example's (VAE encode every step, fp32 text encoder with a trainable table).

    python benchmarks/sd15_speed.py              # on a GPU (fp16, 512 px, batch 8)
    python benchmarks/sd15_speed.py --tiny       # toy shapes on the CPU: the same code paths (used by a test)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
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


SD15 = Shapes(
    resolution=512,
    unet=dict(sample_size=64, cross_attention_dim=768),  # UNet2DConditionModel's defaults are SD 1.5's
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    batch=8, train_batches=(1, 4, 8), iters=3,
)
TINY = Shapes(
    resolution=16,
    unet=dict(sample_size=8, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    batch=2, train_batches=(1, 2), iters=1,
)


def build_model(folder: Path, shapes: Shapes) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dyod.testing import write_clip_tokenizer

    write_clip_tokenizer(folder / "tokenizer", model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 1000), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shapes.text))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**shapes.vae), text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**shapes.unet),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def measure(device):
    """Yields a dict that gets seconds and peak memory (GiB, CUDA only) of the block."""
    result = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    yield result
    sync(device)
    result["seconds"] = time.perf_counter() - start
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def unet_flops(unet, latents, hidden) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor(500, device=latents.device), encoder_hidden_states=hidden)
    return counter.get_total_flops()


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("4090", 165.0)):
        if key in name:
            return value  # dense fp16/bf16 tensor-core TFLOP/s
    return None


def bench_sampling(model: Path, shapes: Shapes, device, dtype, rows: list):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from dyod import SampleConfig
    from dyod.pipeline import DyodPipeline
    from dyod.prior import load_prior
    from dyod.vae import VanillaVAE

    b = shapes.batch
    prompt = ["a photo of an object"] * b
    txt2img = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                      requires_safety_checker=False).to(device)
    txt2img.scheduler = DDIMScheduler.from_config(txt2img.scheduler.config)
    txt2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(b, 3, shapes.resolution, shapes.resolution, generator=torch.Generator().manual_seed(0))

    prior = load_prior(model, device=device, dtype=dtype)
    dyod = DyodPipeline(prior, None, custom_vae=VanillaVAE(64, 32).to(device).eval(), output_resolution=64)
    dyod.optimize(compile_unet=device.type == "cuda")
    config = SampleConfig(t0=0.7, num_inference_steps=50, guidance_scale=7.5, batch_size=b, prompt="a photo of an object")

    h = shapes.resolution // 8 if shapes is SD15 else shapes.resolution // 2
    hidden = torch.zeros(2 * b, 77, shapes.unet["cross_attention_dim"], device=device, dtype=dtype)
    flops_per_call = unet_flops(prior.unet, torch.zeros(2 * b, 4, h, h, device=device, dtype=dtype), hidden)
    peak = peak_tflops(device)

    def run_dyod():
        return dyod.sample(b, config, seed=0, progress=False)

    def run_img2img():
        return img2img(prompt, image=init, strength=0.7, num_inference_steps=50, guidance_scale=7.5, output_type="pt")

    def run_txt2img():
        return txt2img(prompt, num_inference_steps=50, guidance_scale=7.5, output_type="pt")

    for name, fn, calls in (("dyod t0=0.7", run_dyod, 35), ("diffusers img2img 0.7", run_img2img, 35),
                            ("diffusers txt2img 50", run_txt2img, 50)):
        fn()  # warm-up (and compilation)
        with measure(device) as m:
            for _ in range(shapes.iters):
                fn()
        images_per_s = shapes.iters * b / m["seconds"]
        achieved = flops_per_call * calls * shapes.iters / m["seconds"] / 1e12
        rows.append({"stage": "sampling", "method": name, "batch": b, "images_per_s": images_per_s,
                     "peak_gib": m["peak_gib"], "unet_tflops_per_image_call": flops_per_call / (2 * b) / 1e12,
                     "mfu": achieved / peak if peak else None})


def bench_training(model: Path, shapes: Shapes, device, dtype, rows: list):
    from dyod.embeddings import add_placeholder_tokens, install_placeholder
    from dyod.inversion import inversion_loss
    from dyod.prior import load_prior

    for batch in shapes.train_batches:
        for method in ("dyod", "diffusers example"):
            prior = load_prior(model, device=device)
            prior.unet.to(dtype)
            ids = add_placeholder_tokens(prior.tokenizer, prior.text_encoder, "<s>", 1)
            input_ids = prior.tokenizer(["a photo of <s>"] * batch, padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids.to(device)
            alphas = prior.alphas_cumprod()
            pixels = torch.rand(batch, 3, shapes.resolution, shapes.resolution, device=device) * 2 - 1
            if method == "dyod":
                emb = install_placeholder(prior.text_encoder, ids[0], torch.zeros(1, prior.embedding_dim))
                params = [emb.learned]
                prior.vae.to(dtype)
                with torch.no_grad():
                    cached = prior.vae.encode(pixels.to(dtype)).latent_dist.mean.float() * prior.scaling_factor
            else:
                prior.text_encoder.get_input_embeddings().requires_grad_(True)  # the example trains the whole table
                params = list(prior.text_encoder.get_input_embeddings().parameters())
                prior.vae.to(dtype)
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def step():
                if method == "dyod":
                    latents = cached
                else:
                    with torch.no_grad():
                        latents = prior.vae.encode(pixels.to(dtype)).latent_dist.sample().float() * prior.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(1000, (batch,), device=device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = inversion_loss(prior, latents, noise, t, input_ids, alphas)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()
            with measure(device) as m:
                for _ in range(shapes.iters):
                    step()
            rows.append({"stage": "dataset prompt", "method": method, "batch": batch,
                         "images_per_s": shapes.iters * batch / m["seconds"], "peak_gib": m["peak_gib"],
                         "unet_tflops_per_image_call": None, "mfu": None})
            if device.type == "cuda":
                torch.cuda.empty_cache()


def table(rows: list) -> str:
    lines = ["| stage | method | batch | images/s | ratio | peak GiB | MFU |", "|---|---|---|---|---|---|---|"]
    peers = {}
    for r in rows:
        if r["method"].startswith("diffusers"):
            peers.setdefault((r["stage"], r["batch"]), r["images_per_s"])
    for r in rows:
        peer = peers.get((r["stage"], r["batch"]))
        ratio = f"×{r['images_per_s'] / peer:.2f}" if peer else "-"
        mfu = f"{100 * r['mfu']:.0f} %" if r["mfu"] else "-"
        lines.append(f"| {r['stage']} | {r['method']} | {r['batch']} | {r['images_per_s']:.2f} | {ratio} | "
                     f"{r['peak_gib']:.2f} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the same code paths)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else SD15
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "sd15-shaped", shapes)
        bench_sampling(model, shapes, device, dtype, rows)
        bench_training(model, shapes, device, dtype, rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = f"device: {name}, dtype {dtype}, {'tiny shapes' if args.tiny else 'SD-1.5 shapes, 512 px'}\n\n{table(rows)}"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return text


if __name__ == "__main__":
    main()
