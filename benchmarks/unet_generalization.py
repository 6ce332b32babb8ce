"""How far the prior's denoising moves scenes it was taught against scenes of emoji it never saw.

    .venv/bin/python benchmarks/unet_generalization.py [--model PRIOR] [--n 200] [--strength 0.3]

Held-out scenes of the concept set and of the emoji outside it (docs/reference-prior.md), each through diffusers'
StableDiffusionImg2ImgPipeline with its own caption (strength = DYOD's t0, DDIM 50, guidance 3.0) and through the
prior's autoencoder alone; KID × 100 against the scenes themselves with the bundled emoji features. DYOD starts the
reverse process from t0 like this, so a UNet that moves what it was never told about moves a user's data too."""

from __future__ import annotations

import argparse
import time

import torch

from dyod.config import PretrainConfig
from dyod.evaluation import feature_extractor, kid
from dyod.prior import bundled_prior_path
from dyod.world.concepts import heldout_corpora, render_scenes, to_unit
from dyod.world.prior_training import reconstruct


def measure(model, n: int = 200, strength: float = 0.3, guidance_scale: float = 3.0, steps: int = 50,
            batch_size: int = 50, seed: int = 0) -> dict[str, dict[str, float]]:
    """{set: {"autoencoder": KID × 100, "img2img": KID × 100}} for the in-set and out-of-set held-out scenes."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extractor = feature_extractor("emoji")
    results = {}
    for name, scenes in heldout_corpora(PretrainConfig()).items():
        images, captions = render_scenes(scenes, range(n))
        x = to_unit(images)
        denoised = torch.cat([
            pipe(captions[i:i + batch_size], image=(x[i:i + batch_size] + 1) / 2, strength=strength,
                 num_inference_steps=steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(seed + i), output_type="pt").images * 2 - 1
            for i in range(0, n, batch_size)])
        through = reconstruct(pipe.vae, images, "cpu")
        reference = extractor(x)
        results[name] = {label: kid(extractor(images), reference, num_subsets=50, seed=seed).mean_x100
                         for label, images in (("autoencoder", through), ("img2img", denoised))}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a prior in diffusers layout (default: the bundled one)")
    parser.add_argument("--n", type=int, default=200, help="held-out scenes per set")
    parser.add_argument("--strength", type=float, default=0.3, help="img2img strength, i.e. DYOD's t0 / T")
    args = parser.parse_args(argv)
    started = time.time()
    results = measure(args.model or bundled_prior_path(), n=args.n, strength=args.strength)
    print(f"| held-out scenes | through the autoencoder | img2img at strength {args.strength} |")
    print("|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['autoencoder']:.2f} | {row['img2img']:.2f} |")
    print(f"\n({args.n} scenes a set, KID × 100 against themselves; {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
