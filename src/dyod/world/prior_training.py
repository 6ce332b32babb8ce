"""The reference prior: a miniature Stable Diffusion pre-trained on the emoji scene corpus, in diffusers layout.

    dyod reference pretrain --out PRIOR [--corpus-size N --unet-steps N ...] [--resume]

Stages (each resumable, each written as soon as it is done):
  1. tokenizer/    CLIP BPE vocab + merges trained on the corpus captions (HF tokenizers' BPE trainer)
  2. vae/          AutoencoderKL, 64 px -> 16 x 16 x 4 latents (×4), MSE + small KL; scaling_factor = 1/std(latents)
  3. unet/ + text_encoder/   trained together on cached latents, ε-prediction, 10% caption dropout (for
                   classifier-free guidance with the empty prompt)
  4. scheduler/    DDIM config of the training schedule; model_index.json via StableDiffusionPipeline.save_pretrained
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..checkpoint import CheckpointOnInterrupt, load_training_state, save_training_state
from ..config import PretrainConfig, write_json
from ..errors import DyodError
from ..testing import bytes_to_unicode
from .atlas import EmojiAtlas
from .datasets import face_indices, fruit_indices
from .scenes import SceneGenerator

logger = logging.getLogger(__name__)


def corpus(config: PretrainConfig) -> SceneGenerator:
    atlas = EmojiAtlas.bundled()
    return SceneGenerator(seed=config.corpus_seed, resolution=config.resolution, atlas=atlas,
                          emphasis=fruit_indices(atlas) + face_indices(atlas), emphasis_weight=config.emphasis_weight)


# -- 1. tokenizer ---------------------------------------------------------------------------------------------------
def train_tokenizer(captions: list[str], folder: Path, vocab_size: int, max_length: int) -> None:
    """A CLIP BPE tokenizer (vocab.json + merges.txt with </w> word ends) trained on the captions."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    vocab: dict[str, int] = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    for symbol in alphabet + [s + "</w>" for s in alphabet]:  # CLIP encodes any byte, alone or word-final
        vocab.setdefault(symbol, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    clip.save_pretrained(folder)


# -- helpers ----------------------------------------------------------------------------------------------------------
def render_corpus(config: PretrainConfig, progress: bool) -> tuple[torch.Tensor, list[str]]:
    gen = corpus(config)
    images = np.empty((config.corpus_size, config.resolution, config.resolution, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(config.corpus_size), disable=not progress, desc="rendering corpus"):
        scene = gen.scene(i)
        images[i] = np.asarray(scene.render(gen.atlas))
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2), captions


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1


def _save_state(path: Path, modules: dict, optimizer, step: int, generator: torch.Generator, extra: dict | None = None):
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_training_state(path, tensors, optimizer, generator, step, extra)


def _load_state(path: Path, modules: dict, optimizer, generator: torch.Generator) -> tuple[int, dict]:
    step, tensors, meta = load_training_state(path, optimizer, generator)
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return step, meta


# -- 2. VAE -------------------------------------------------------------------------------------------------------------
def train_autoencoder(images: torch.Tensor, config: PretrainConfig, folder: Path, device, progress: bool, resume: bool):
    from diffusers import AutoencoderKL

    n_blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=config.resolution,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
    ).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    state_path, start, losses = folder.parent / "training" / "vae_state.safetensors", 0, []
    if resume and state_path.exists():
        start, extra = _load_state(state_path, {"vae": vae}, optimizer, generator)
        losses = extra.get("losses", [])
    vae.train()
    bar = tqdm(range(start, config.vae_steps), initial=start, total=config.vae_steps, disable=not progress, desc="prior VAE")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            x = to_unit(images[torch.randint(len(images), (config.vae_batch_size,), generator=generator)]).to(device)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            recon = vae.decode(z).sample
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            kl = posterior.kl().mean()
            loss = rec + config.vae_kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(rec.item())
            if step % 20 == 0:
                bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
            stopping = interrupt.stopping(step + 1, config.vae_steps)
            if (step + 1) % config.checkpoint_every == 0 or stopping:
                _save_state(state_path, {"vae": vae}, optimizer, step + 1, generator, {"losses": losses})
            if stopping:
                interrupt.stop(bar, step + 1, config.vae_steps, "the prior's autoencoder", "step", state_path)
    vae.eval()
    # SD's recipe: scale latents to unit variance (SD 1.5 uses 0.18215)
    with torch.no_grad():
        sample = to_unit(images[:1024]).to(device)
        latents = torch.cat([vae.encode(sample[i:i + 128]).latent_dist.mean for i in range(0, len(sample), 128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(folder)
    return vae.cpu(), losses


@torch.no_grad()
def encode_corpus(vae, images: torch.Tensor, device, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    vae = vae.to(device).eval()
    means, stds = [], []
    for i in tqdm(range(0, len(images), 256), disable=not progress, desc="encoding corpus"):
        posterior = vae.encode(to_unit(images[i:i + 256]).to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


# -- 3. UNet + text encoder ---------------------------------------------------------------------------------------------
def build_unet_and_text_encoder(config: PretrainConfig, tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    ch = config.unet_channels
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (len(config.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=ch, layers_per_block=1, cross_attention_dim=config.text_width, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
        norm_num_groups=32,
    )
    return unet, text_encoder


def ddim_config(prediction_type: str = "epsilon") -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                timestep_spacing="leading")


def pretrain(out: str | os.PathLike, config: PretrainConfig = PretrainConfig(), resume: bool = False,
             progress: bool = True, device: str | None = None) -> Path:
    """Train the reference prior into ``out`` (a diffusers folder) and write its model card; return ``out``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if out.exists() and any(out.iterdir()) and not resume:
        raise DyodError(f"{out} is not empty; pass --resume to continue a pre-training there, or choose another --out")
    work = out / "training"
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "pretrain_config.json", {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in dataclasses.asdict(config).items()})
    timings: dict = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}
    torch.manual_seed(config.seed)

    started = time.time()
    images, captions = render_corpus(config, progress)
    timings["render_s"] = round(time.time() - started, 1)

    if not (out / "tokenizer" / "vocab.json").exists():
        train_tokenizer(captions, out / "tokenizer", config.vocab_size, config.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    lengths = [len(ids) for ids in tokenizer(captions[:2000]).input_ids]
    if max(lengths) > config.max_length:
        logger.warning("%d of 2000 captions exceed %d tokens and are truncated",
                       sum(n > config.max_length for n in lengths), config.max_length)

    if not (out / "vae" / "config.json").exists():
        t = time.time()
        vae, vae_losses = train_autoencoder(images, config, out / "vae", device, progress, resume)
        timings["vae_s"] = round(time.time() - t, 1)
        write_json(work / "vae_losses.json", vae_losses)
        write_json(work / "timings.json", timings)  # kept across a --resume of the UNet stage
    vae = AutoencoderKL.from_pretrained(out / "vae")
    means, stds = encode_corpus(vae, images, device, progress)
    scaling = vae.config.scaling_factor
    token_ids = tokenizer(captions, padding="max_length", max_length=config.max_length, truncation=True,
                          return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=config.max_length, return_tensors="pt").input_ids

    unet, text_encoder = build_unet_and_text_encoder(config, tokenizer)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 1)
    state_path, start, losses = work / "unet_state.safetensors", 0, []
    unet_before = 0.0  # UNet seconds spent before a --resume
    if resume and state_path.exists():
        start, extra = _load_state(state_path, {"unet": unet, "text_encoder": text_encoder}, optimizer, generator)
        losses, unet_before = extra.get("losses", []), extra.get("unet_s", 0.0)
    alphas_cumprod = DDIMScheduler(**ddim_config()).alphas_cumprod.to(device)
    warmup = 200
    t_unet = time.time()
    bar = tqdm(range(start, config.unet_steps), initial=start, total=config.unet_steps, disable=not progress, desc="prior UNet")
    with CheckpointOnInterrupt() as interrupt:
        for step in bar:
            lr = config.unet_learning_rate * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.unet_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(len(means), (config.unet_batch_size,), generator=generator)
            latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scaling
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(1000, (len(idx),), generator=generator)
            ids = token_ids[idx].clone()
            drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
            ids[drop] = empty_ids[0]
            latents, noise, t, ids = latents.to(device), noise.to(device), t.to(device), ids.to(device)
            ab = alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise  # Eq. 4
            pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, noise)  # Eq. 5
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
            stopping = interrupt.stopping(step + 1, config.unet_steps)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps or stopping:
                _save_state(state_path, {"unet": unet, "text_encoder": text_encoder}, optimizer, step + 1, generator,
                            {"losses": losses, "unet_s": unet_before + time.time() - t_unet})
            if stopping:
                interrupt.stop(bar, step + 1, config.unet_steps, "the prior's UNet", "step", state_path)
    timings["unet_s"] = round(unet_before + time.time() - t_unet, 1)
    write_json(work / "unet_losses.json", losses)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.cpu().eval(), tokenizer=tokenizer, unet=unet.cpu().eval(),
        scheduler=DDIMScheduler(**ddim_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    timings["device"] = device
    timings["threads"] = torch.get_num_threads()
    write_json(work / "timings.json", timings)
    return out


# -- model card ---------------------------------------------------------------------------------------------------------
SINGLE_EMOJI_PROMPT = "a large {} in the center on a white background"


@torch.no_grad()
def text_following(model: str | os.PathLike, n_captions: int = 100, seed: int = 0, steps: int = 50,
                   guidance_scale: float = 7.5, device: str = "cpu") -> dict:
    """For n single-emoji captions, how often the feature network names the prompted emoji in the prior's sample."""
    from ..guidance import GuidedDenoiser, encode_prompts
    from ..prior import load_prior
    from ..sampling import Schedule, sample_ddim
    from ..seeding import STREAM_NOISE, randn_per_seed
    from .features import EmojiFeatures

    atlas = EmojiAtlas.bundled()
    rng = np.random.default_rng(seed)
    emphasis = fruit_indices(atlas) + face_indices(atlas)
    # half from the datasets' emoji, half from the whole atlas
    chosen = list(rng.choice(emphasis, n_captions // 2, replace=False)) + \
        list(rng.choice(len(atlas), n_captions - n_captions // 2, replace=False))
    prior = load_prior(model, device=device)
    schedule = Schedule.from_scheduler_config(prior.scheduler_config, steps)
    h = prior.resolution // prior.vae_scale_factor
    uncond = encode_prompts(prior.tokenizer, prior.text_encoder, [""])
    images = []
    for start in range(0, len(chosen), 25):
        batch = chosen[start:start + 25]
        cond = encode_prompts(prior.tokenizer, prior.text_encoder, [SINGLE_EMOJI_PROMPT.format(atlas.names[k]) for k in batch])
        noise = randn_per_seed(list(range(start, start + len(batch))), (prior.latent_channels, h, h), STREAM_NOISE).to(device)
        latents = sample_ddim(GuidedDenoiser(prior.unet, cond, uncond, guidance_scale), noise, schedule.timesteps,
                              schedule, progress=False)
        images.append(prior.vae.decode(latents / prior.scaling_factor).sample.clamp(-1, 1).cpu())
    images = torch.cat(images)
    top = EmojiFeatures.bundled().predict(images, k=5)
    labels = torch.tensor(chosen)[:, None]
    top1 = (top[:, :1] == labels).any(1).float()
    top5 = (top == labels).any(1).float()
    half = n_captions // 2
    return {
        "n_captions": n_captions, "prompt": SINGLE_EMOJI_PROMPT, "steps": steps, "guidance_scale": guidance_scale,
        "top1": float(top1.mean()), "top5": float(top5.mean()),
        "top1_dataset_emoji": float(top1[:half].mean()), "top5_dataset_emoji": float(top5[:half].mean()),
        "top1_any_emoji": float(top1[half:].mean()), "top5_any_emoji": float(top5[half:].mean()),
    }, images, chosen


def write_model_card(model: str | os.PathLike, device: str = "cpu") -> Path:
    """MODEL_CARD.md beside the weights: config, data, hardware, wall time, loss curves, samples, text following."""
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data import tensor_to_pil
    from ..images import make_grid, save_png

    model = Path(model)
    work = model / "training"
    config = json.loads((work / "pretrain_config.json").read_text())
    timings = json.loads((work / "timings.json").read_text())
    unet_losses = json.loads((work / "unet_losses.json").read_text())
    vae_losses = json.loads((work / "vae_losses.json").read_text()) if (work / "vae_losses.json").exists() else []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, losses, title in ((axes[0], vae_losses, "VAE reconstruction"), (axes[1], unet_losses, "UNet ε-MSE")):
        if losses:
            k = max(1, len(losses) // 200)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(work / "loss_curves.png", dpi=100)
    plt.close(fig)

    scores, images, chosen = text_following(model, device=device)
    save_png(make_grid(tensor_to_pil(images[:48]), 8), work / "samples_single_emoji.png")
    atlas = EmojiAtlas.bundled()
    (work / "text_following.json").write_text(json.dumps(scores | {"emoji": [atlas.names[k] for k in chosen]}, indent=2))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*.safetensors")) for p in model.iterdir()
             if p.is_dir() and p.name != "training"}
    total_s = timings.get("vae_s", 0) + timings.get("unet_s", 0) + timings.get("render_s", 0)
    lines = [
        "# dyod reference prior (emoji world)",
        "",
        "A miniature latent text-to-image diffusion model in Stable Diffusion's diffusers layout, pre-trained by",
        "`dyod reference pretrain` on dyod's procedural captioned emoji scenes (Noto Color Emoji sprites).",
        "It exists so that dyod can be run, tested and measured offline; it is not a general image model.",
        "",
        "| | |",
        "|---|---|",
        f"| images | {config['resolution']}×{config['resolution']} RGB; VAE ×4 → 16×16×4 latents |",
        f"| corpus | {config['corpus_size']} scenes, seed {config['corpus_seed']}, {config['emphasis_weight']:.0%} of sprites from the bundled datasets' emoji |",
        f"| tokenizer | CLIP BPE trained on the captions, vocab {config['vocab_size']}, max length {config['max_length']} |",
        f"| text encoder | CLIPTextModel, width {config['text_width']}, {config['text_layers']} layers |",
        f"| UNet | UNet2DConditionModel, channels {config['unet_channels']}, ε-prediction, {config['unet_steps']} steps × batch {config['unet_batch_size']}, caption dropout {config['caption_dropout']} |",
        f"| VAE | AutoencoderKL, channels {config['vae_channels']}, {config['vae_steps']} steps × batch {config['vae_batch_size']} |",
        "| scheduler | DDIM config (scaled-linear betas 0.00085–0.012, 1000 steps, leading spacing) |",
        f"| hardware | {timings.get('device')} ({timings.get('threads')} threads), {platform.processor() or platform.machine()} |",
        f"| wall time | {total_s / 60:.1f} min (render {timings.get('render_s')} s, VAE {timings.get('vae_s')} s, UNet {timings.get('unet_s')} s) |",
        f"| weights | {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sizes.items() if v)} |",
        "",
        *([f"Note: {timings['vae_note']}.", ""] if timings.get("vae_note") else []),
        "## Text following",
        "",
        f"For {scores['n_captions']} single-emoji captions (\"{SINGLE_EMOJI_PROMPT}\", half of them from the bundled",
        f"datasets' fruits and faces, half from the whole atlas), DDIM {scores['steps']} steps, guidance {scores['guidance_scale']},",
        "the feature network names the prompted emoji among 1,356 in the prior's sample:",
        "",
        "| captions | top-1 | top-5 |",
        "|---|---|---|",
        f"| all | {scores['top1']:.0%} | {scores['top5']:.0%} |",
        f"| datasets' emoji | {scores['top1_dataset_emoji']:.0%} | {scores['top5_dataset_emoji']:.0%} |",
        f"| any emoji | {scores['top1_any_emoji']:.0%} | {scores['top5_any_emoji']:.0%} |",
        "",
        "![loss curves](training/loss_curves.png)",
        "",
        "Samples for the first 48 captions (row-major, see `training/text_following.json` for the names):",
        "",
        "![samples](training/samples_single_emoji.png)",
        "",
    ]
    card = model / "MODEL_CARD.md"
    card.write_text("\n".join(lines))
    return card
