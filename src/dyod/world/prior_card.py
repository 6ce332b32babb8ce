"""How faithful a miniature of Stable Diffusion the reference prior is, measured, and its model card.

    .venv/bin/python benchmarks/prior_properties.py [--model PRIOR]   # prints the table, writes MODEL_CARD.md

The properties (targets in docs/reference-prior.md): the autoencoder's floor on each bundled dataset (the dataset's
images through it, KID × 100 against the dataset with the bundled features), its reconstruction of scenes it never
trained on, with emoji inside and outside the concept set, the UNet's text following on single-emoji captions of
the concept set, and the wall time of the pre-training. The feature network only measures: nothing is trained on it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .atlas import EmojiAtlas
from .concepts import SINGLE_EMOJI_PROMPT, concept_set, heldout_corpora, render_scenes, to_unit
from .scenes import UNNAMED

FLOOR_TARGET = 15.0  # KID × 100 of each bundled dataset through the autoencoder
TEXT_TARGETS = (0.30, 0.60)  # top-1, top-5
WALL_TARGET_MIN = 150.0


@torch.no_grad()
def sample_single_emoji(unet, text_encoder, tokenizer, vae, scaling: float, emoji: list[int], steps: int = 50,
                        guidance_scale: float = 7.5, batch_size: int = 50, device="cpu") -> torch.Tensor:
    """The prior's samples of "a large {name} in the center on a white background", one per emoji (seed = its
    position), decoded to [-1, 1] on the CPU."""
    from ..guidance import GuidedDenoiser, encode_prompts
    from ..sampling import Schedule, sample_ddim
    from ..seeding import STREAM_NOISE, randn_per_seed
    from .prior_training import ddim_config

    atlas = EmojiAtlas.bundled()
    schedule = Schedule.from_scheduler_config(ddim_config(), steps)
    h = unet.config.sample_size
    uncond = encode_prompts(tokenizer, text_encoder, [""])
    images = []
    for start in range(0, len(emoji), batch_size):
        batch = emoji[start:start + batch_size]
        cond = encode_prompts(tokenizer, text_encoder, [SINGLE_EMOJI_PROMPT.format(atlas.names[k]) for k in batch])
        noise = randn_per_seed(list(range(start, start + len(batch))), (4, h, h), STREAM_NOISE).to(device)
        latents = sample_ddim(GuidedDenoiser(unet, cond, uncond, guidance_scale), noise, schedule.timesteps,
                              schedule, progress=False)
        images.append(vae.decode(latents / scaling).sample.clamp(-1, 1).float().cpu())
    return torch.cat(images)


def top_k_hits(images: torch.Tensor, emoji: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, whether the feature network names the prompted emoji first, and among its first five."""
    from .features import EmojiFeatures

    top = EmojiFeatures.bundled().predict(images, k=5)
    labels = torch.tensor(emoji)[:, None]
    return (top[:, :1] == labels).any(1).float(), (top == labels).any(1).float()


def recorded_config(model: str | os.PathLike) -> dict:
    path = Path(model) / "training" / "pretrain_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def recorded_pretrain_config(model: str | os.PathLike):
    """The PretrainConfig a prior was made with: its recorded settings, today's defaults for those it predates."""
    from ..config import PretrainConfig

    known = {k: v for k, v in recorded_config(model).items() if k in PretrainConfig.__dataclass_fields__}
    return PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


@torch.no_grad()
def text_following(model: str | os.PathLike, n_captions: int = 200, seed: int = 0, steps: int = 50,
                   guidance_scale: float = 7.5, device: str = "cpu") -> tuple[dict, torch.Tensor, list[int]]:
    """For ``n_captions`` concepts drawn at random from the concept set, how often the feature network names the
    prompted emoji in the prior's sample of "a large {name} in the center on a white background"."""
    from ..prior import load_prior

    concepts = concept_set(EmojiAtlas.bundled(), recorded_config(model).get("concept_stride", 1))
    chosen = [int(k) for k in np.random.default_rng(seed).choice(concepts, min(n_captions, len(concepts)), replace=False)]
    prior = load_prior(model, device=device)
    images = sample_single_emoji(prior.unet, prior.text_encoder, prior.tokenizer, prior.vae, prior.scaling_factor,
                                 chosen, steps=steps, guidance_scale=guidance_scale, device=device)
    top1, top5 = top_k_hits(images, chosen)
    return {"n_captions": len(chosen), "concept_set_size": len(concepts), "prompt": SINGLE_EMOJI_PROMPT,
            "steps": steps, "guidance_scale": guidance_scale, "top1": float(top1.mean()),
            "top5": float(top5.mean())}, images, chosen


@torch.no_grad()
def autoencoder_properties(model: str | os.PathLike, n: int = 400, device: str = "cpu") -> dict:
    """The floor on each bundled dataset (its first ``n`` images, seed 0, as benchmarks/results.py makes them) and
    the reconstruction of ``n`` held-out scenes inside and outside the concept set: MSE in [-1, 1] and KID × 100."""
    from diffusers import AutoencoderKL

    from ..evaluation import kid
    from .datasets import DATASETS, dataset_images
    from .features import EmojiFeatures
    from .prior_training import reconstruct

    vae = AutoencoderKL.from_pretrained(Path(model) / "vae").to(device).eval()
    features = EmojiFeatures.bundled()

    def scores(images: torch.Tensor) -> dict:
        recon = reconstruct(vae, images, device)
        result = kid(features(recon), features(to_unit(images)), num_subsets=50)
        return {"mse": float(F.mse_loss(recon, to_unit(images))), "kid_x100": result.mean_x100,
                "kid_x100_std": result.std_x100}

    floors = {name: scores(dataset_images(name, n)) for name in DATASETS}
    config = recorded_pretrain_config(model)
    heldout = {name: scores(render_scenes(gen, range(n))[0]) for name, gen in heldout_corpora(config).items()}
    return {"n": n, "floor": floors, "heldout": heldout}


def demo_summary(results: str | os.PathLike | None) -> list[dict]:
    """benchmarks/results.py's per-dataset verdicts (docs/results/summary.json), if given and present."""
    if results is None or not Path(results).exists():
        return []
    return json.loads(Path(results).read_text())


def measure_prior(model: str | os.PathLike, n: int = 400, n_captions: int = 200, device: str = "cpu") -> dict:
    """Every property of the model card, measured now."""
    model = Path(model)
    scores, images, chosen = text_following(model, n_captions=n_captions, device=device)
    timings = json.loads((model / "training" / "timings.json").read_text())
    stages = {k: v for k, v in timings.items() if k.endswith("_s")}
    return {"autoencoder": autoencoder_properties(model, n=n, device=device), "text_following": scores,
            "text_following_emoji": [EmojiAtlas.bundled().names[k] for k in chosen],
            "wall_time_min": sum(stages.values()) / 60, "stages_s": stages,
            "hardware": f"{timings.get('device')} ({timings.get('threads')} threads), "
                        f"{platform.processor() or platform.machine()}"}, images


def property_rows(props: dict, summary: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(property, measured, target, met) for the model card and the benchmark's table."""
    ae = props["autoencoder"]
    floors = ae["floor"]
    floor_text = " / ".join(f"{v['kid_x100']:.1f}" for v in floors.values())
    inside, outside = ae["heldout"]["in_set"], ae["heldout"]["out_of_set"]
    ratio_mse = outside["mse"] / max(inside["mse"], 1e-12)
    ratio_kid = outside["kid_x100"] / max(inside["kid_x100"], 1e-12) if inside["kid_x100"] > 0 else float("inf")
    tf = props["text_following"]
    rows = [
        (f"autoencoder floor, KID × 100 ({' / '.join(floors)})", floor_text, f"≤ {FLOOR_TARGET:g} each",
         all(v["kid_x100"] <= FLOOR_TARGET for v in floors.values())),
        ("held-out scenes through the autoencoder, in-set → out-of-set, MSE", f"{inside['mse']:.5f} → "
         f"{outside['mse']:.5f} (×{ratio_mse:.2f})", "out-of-set within 2×", ratio_mse <= 2.0),
        ("the same, KID × 100", f"{inside['kid_x100']:.2f} → {outside['kid_x100']:.2f} (×{ratio_kid:.2f})",
         "out-of-set within 2×", ratio_kid <= 2.0),
        (f"text following over {tf['n_captions']} concepts of {tf['concept_set_size']}, top-1 / top-5",
         f"{tf['top1']:.0%} / {tf['top5']:.0%}", f"≥ {TEXT_TARGETS[0]:.0%} / ≥ {TEXT_TARGETS[1]:.0%}",
         tf["top1"] >= TEXT_TARGETS[0] and tf["top5"] >= TEXT_TARGETS[1]),
        ("pre-training wall time", f"{props['wall_time_min']:.0f} min ({props['hardware']})",
         f"≤ {WALL_TARGET_MIN:g} min", props["wall_time_min"] <= WALL_TARGET_MIN),
    ]
    if summary:
        beats = [s["dataset"] for s in summary if s.get("beats_both")]
        rows.append(("DYOD at the chosen t0 beats the VAE alone and the prior + S* alone (docs/RESULTS.md)",
                     f"{len(beats)} of {len(summary)}" + (f" ({', '.join(beats)})" if beats else ""),
                     "every bundled dataset", len(beats) == len(summary)))
    return rows


def markdown_rows(rows) -> list[str]:
    return ["| property | measured | target | met |", "|---|---|---|---|",
            *[f"| {p} | {m} | {t} | {'yes' if ok else 'no'} |" for p, m, t, ok in rows]]


def plot_training(model: Path) -> Path:
    """training/curves.png: the losses and the probes (held-out reconstruction, text following, the autoencoder floor
    where it was probed) against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = model / "training"
    read = lambda name: json.loads((work / name).read_text()) if (work / name).exists() else []  # noqa: E731
    probes = read("probes.json")
    vae = [p for p in probes if p["stage"] == "vae"]
    decoder = [p for p in probes if p["stage"] == "decoder"]  # stage 5 goes on from where stage 2 ended
    floors = sorted({k for p in vae + decoder for k in p if k.startswith("floor_")})  # priors made before: none
    fig, axes = plt.subplots(1, 5 if floors else 4, figsize=(20 if floors else 16, 3.2))
    for ax, losses, title in ((axes[0], read("vae_losses.json"), "autoencoder L1 + MSE"),
                              (axes[1], read("unet_losses.json"), "UNet ε-MSE")):
        if losses:
            k = max(1, len(losses) // 200)
            ax.plot(np.arange(len(losses) - k + 1) + k, np.convolve(losses, np.ones(k) / k, mode="valid"))
        ax.set(title=title, xlabel="step", yscale="log")
    offset = vae[-1]["seconds"] if vae else 0.0
    for key, label in (("mse_in_set", "in-set"), ("mse_out_of_set", "out-of-set")):
        line, = axes[2].plot([p["seconds"] / 60 for p in vae], [p[key] for p in vae], "o-", label=label)
        if decoder:
            axes[2].plot([(offset + p["seconds"]) / 60 for p in decoder], [p[key] for p in decoder], "s--",
                         color=line.get_color(), label=f"{label}, decoder refinement")
    axes[2].set(title="held-out reconstruction MSE", xlabel="minutes of autoencoder training (stages 2, 5)",
                yscale="log")
    axes[2].legend(fontsize="x-small")
    for key in floors:
        line, = axes[4].plot([p["seconds"] / 60 for p in vae if key in p], [p[key] for p in vae if key in p], "o-",
                             label=key[len("floor_"):])
        axes[4].plot([(offset + p["seconds"]) / 60 for p in decoder if key in p], [p[key] for p in decoder if key in p],
                     "s--", color=line.get_color())
    if floors:  # KID is unbiased, so a floor near 0 may come out below it: symlog keeps those points
        axes[4].set(title="autoencoder floor, KID × 100 (dashed: stage 5)", xlabel="minutes of autoencoder training")
        axes[4].set_yscale("symlog", linthresh=1.0)
        axes[4].legend(fontsize="x-small")
    unet = [p for p in probes if p["stage"] == "unet"]
    for key, label in (("probe_top1", "top-1"), ("probe_top5", "top-5")):
        axes[3].plot([p["seconds"] / 60 for p in unet], [p[key] for p in unet], "o-", label=label)
    axes[3].set(title="text following, 24-concept probe", xlabel="minutes of UNet training", ylim=(0, 1))
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(work / "curves.png", dpi=90)
    plt.close(fig)
    return work / "curves.png"


def write_model_card(model: str | os.PathLike, props: dict, images: torch.Tensor, summary: list[dict]) -> Path:
    """MODEL_CARD.md beside the weights: what it is, how it was trained, the measured properties and curves."""
    from ..data import tensor_to_pil
    from ..images import make_grid, save_png

    model = Path(model)
    work = model / "training"
    config = recorded_config(model)
    (work / "properties.json").write_text(json.dumps(props, indent=2))
    save_png(make_grid(tensor_to_pil(images[:48]), 8), work / "samples_single_emoji.png")
    plot_training(model)
    probes = json.loads((work / "probes.json").read_text()) if (work / "probes.json").exists() else []
    learned_vocab = len(json.loads((model / "tokenizer" / "vocab.json").read_text()))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*.safetensors")) for p in sorted(model.iterdir())
             if p.is_dir() and p.name != "training"}
    stages = props["stages_s"]
    names = props["text_following_emoji"]
    lines = [
        "# dyod reference prior (emoji world)", "",
        "A miniature latent text-to-image diffusion model in Stable Diffusion's diffusers layout, pre-trained by",
        "`dyod reference pretrain` on dyod's procedural captioned emoji scenes (Noto Color Emoji sprites), so that dyod",
        "runs, is tested and is measured offline. It is not a general image model. How it was made and why:",
        "docs/reference-prior.md.", "",
        "## Measured properties", "",
        "`.venv/bin/python benchmarks/prior_properties.py` (KID × 100 with the bundled emoji features, which nothing",
        f"was trained on; {props['autoencoder']['n']} images per set):", "",
        *markdown_rows(property_rows(props, summary)), "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| images | {config['resolution']}×{config['resolution']} RGB; VAE ×4 → 16×16×4 latents |",
        f"| concept set | every {config['concept_stride']}th emoji of the atlas in code-point order "
        f"({props['text_following']['concept_set_size']} of {len(EmojiAtlas.bundled())}), an even share of every group |",
        f"| autoencoder | AutoencoderKL, channels {config['vae_channels']}, GroupNorm in "
        f"{config.get('vae_norm_groups', 32)} groups, {config['vae_steps']} steps × batch "
        f"{config['vae_batch_size']} of freshly rendered scenes of all {len(EmojiAtlas.bundled())} emoji, L1 + MSE + "
        f"KL × {config['vae_kl_weight']:g} (the KL summed over each latent, the reconstruction over each image, as "
        "Latent Diffusion weighs them) |",
        f"| tokenizer | CLIP BPE trained on the UNet corpus' captions, vocab {learned_vocab} (at most "
        f"{config['vocab_size']}), max length "
        f"{config['max_length']} |",
        f"| text encoder | CLIPTextModel, width {config['text_width']}, {config['text_layers']} layers, "
        + (f"pre-trained with CLIP's contrastive loss against a small image tower on the corpus latents "
           f"({config['text_encoder_steps']} steps × batch {config['text_encoder_batch_size']}), then frozen |"
           if config.get("text_encoder_steps") else "trained with the UNet |"),
        f"| UNet | UNet2DConditionModel, channels {config['unet_channels']}, cross-attention from level "
        f"{config['unet_attention_from']}, ε-prediction, Min-SNR-γ {config['min_snr_gamma']:g}, {config['unet_steps']} "
        f"steps × batch {config['unet_batch_size']} on {config['corpus_size']} scenes"
        + (f" (a share {config['unnamed_share']:g} of their sprites from outside the concept set, captioned only as "
           f"\"{UNNAMED}\")" if config.get("unnamed_share") else " of the concept set")
        + (" at every sprite side from {} to {} px".format(*config["corpus_sizes"]) if config.get("corpus_sizes") else "")
        + f", caption dropout {config['caption_dropout']}, EMA {config['ema_decay']} |",
        *([f"| decoder refinement | the decoder alone"
           + (f", grown by {config['decoder_extra_layers']} identity-initialised resnet(s) a level"
              if config.get("decoder_extra_layers") else "")
           + (f", widened to channels {config['decoder_widths']} (Net2WiderNet, the function kept)"
              if config.get("decoder_widths") else "")
           + f", {config['decoder_steps']} steps × batch {config['vae_batch_size']} of fresh scenes of all emoji"
           + (" at every sprite side from {} to {} px".format(*config["decoder_sizes"]) if config.get("decoder_sizes")
              else "")
           + ", L1 + MSE" + (f" + PatchGAN × {config['adversarial_weight']:g}" if config.get('adversarial_weight') else "")
           + f", Adam {config['decoder_learning_rate']:g} (warm-up, cosine decay); the encoder, hence the UNet's "
           "latents, unchanged; decoder weights stored in float16 |"]
          if config.get("decoder_steps") else []),
        "| scheduler | DDIM config (scaled-linear betas 0.00085–0.012, 1000 steps, leading spacing) |",
        f"| hardware | {props['hardware']} |",
        f"| wall time | {props['wall_time_min']:.1f} min: " + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in stages.items())
        + " |",
        f"| weights | {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in sizes.items() if v)} |", "",
        "Probes during training (held-out reconstruction MSE; text following on 24 concepts, DDIM 20 steps):", "",
        "| stage | step | minutes | measured |", "|---|---|---|---|",
        *[f"| {p['stage']} | {p['step']} | {p['seconds'] / 60:.1f} | "
          + ", ".join(f"{k} {v}" for k, v in p.items() if k not in ('stage', 'step', 'seconds')) + " |" for p in probes],
        "", "![training curves](training/curves.png)", "",
        f"Samples of \"{SINGLE_EMOJI_PROMPT}\" (DDIM {props['text_following']['steps']} steps, guidance "
        f"{props['text_following']['guidance_scale']}) for the first 48 concepts measured: "
        + ", ".join(names[:48]) + ".", "",
        "![samples](training/samples_single_emoji.png)", "",
    ]
    card = model / "MODEL_CARD.md"
    card.write_text("\n".join(lines))
    return card


def card_for(model: str | os.PathLike, results: str | os.PathLike | None = None, device: str = "cpu",
             n: int = 400, n_captions: int = 200) -> tuple[Path, list[tuple[str, str, str, bool]]]:
    """Measure the prior and write its model card; return the card and the property rows."""
    props, images = measure_prior(model, n=n, n_captions=n_captions, device=device)
    summary = demo_summary(results)
    return write_model_card(model, props, images, summary), property_rows(props, summary)
