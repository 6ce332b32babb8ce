"""Tiny Stable-Diffusion-shaped models built in code, saved in diffusers layout: test fixtures and a smoke demo.

Nothing is downloaded: the CLIP BPE tokenizer's vocab and merges are written here from a word list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

DEFAULT_WORDS = (
    "a photo of the an image rendering picture good close up object apple orange red green blue white black "
    "on left right and background face smiley fruit stack"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: str | os.PathLike, words=DEFAULT_WORDS, model_max_length: int = 16) -> None:
    """A CLIP BPE tokenizer whose vocab holds every byte (alone and word-final) and whole-word merges for ``words``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merge = f"{current} {nxt}"
            if merge not in merges:
                merges.append(merge)
            current = current + nxt
            if current not in vocab_list:
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)


def make_tiny_model(
    folder: str | os.PathLike,
    prediction_type: str = "epsilon",
    scheduler: str = "pndm",
    seed: int = 0,
    words=DEFAULT_WORDS,
) -> Path:
    """Write a tiny SD in diffusers layout (16 px images, 8x8x4 latents) whose weights are random but seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=32,
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  set_alpha_to_one=False, prediction_type=prediction_type, num_train_timesteps=1000)
    if scheduler == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, **common)  # what stable-diffusion-v1-5 ships
    else:
        sched = DDIMScheduler(clip_sample=False, timestep_spacing="trailing" if prediction_type == "v_prediction" else "leading", **common)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_shapes_dataset(folder: str | os.PathLike, n: int = 16, size: int = 32, seed: int = 0) -> Path:
    """A small procedural dataset: one red disc and one blue square at random places on white."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        r = size // 6
        x, y = rng.integers(r, size // 2 - r, size=2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(220, 30, 30))
        x, y = rng.integers(size // 2 + r, size - r, size=2)
        draw.rectangle((x - r, y - r, x + r, y + r), fill=(30, 60, 220))
        im.save(folder / f"{i:04d}.png")
    return folder
