"""``dyod demo``: the whole method end to end on the bundled defaults, with a Markdown report.

Makes the ``apple-orange`` dataset, fits DYOD on the bundled reference prior (dataset prompt + custom VAE), samples
at several t0 and at t0 = 1 (the prior with S* alone), and compares every set to the dataset with offline KID; then
shows the latent manipulation (an interpolation, a traversal) at the best t0 and image initialization of painted
strokes at each t0."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from pathlib import Path

from .config import InversionConfig, SampleConfig, VAEConfig, to_dict, write_json
from .images import labeled_rows, make_grid, save_png

logger = logging.getLogger(__name__)

TRAVERSAL_VALUES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # z_u in prior standard deviations, as Fig. 7's rows
STROKES = 8  # painted inputs for image initialization, a row of the grid
OVERVIEW_IMAGES = 8  # a row of overview.png: the dataset, the VAE alone, DYOD at the best t0, the prior + S* alone
ALONE = "prior + S* alone (t0 = 1)"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (defaults sized for 2 CPU cores, well under 15 minutes)."""

    dataset: str = "apple-orange"
    num_images: int = 400
    inversion_steps: int = 300
    inversion_batch_size: int = 8
    vae_epochs: int = 40
    vae_latent_dim: int = 32
    num_samples: int = 200
    t0s: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    seed: int = 0


def run_demo(out: str | os.PathLike, config: DemoConfig = DemoConfig(), model: str = "emoji-prior",
             overwrite: bool = False, progress: bool = True) -> Path:
    from .data import load_image_folder
    from .evaluation import kid
    from .inversion import invert
    from .pipeline import DyodPipeline
    from .run import Run, check_output_folder
    from .sweep import SweepRow, plot_sweep, prompt_without_token, t0_label
    from .vae import most_active_dimensions
    from .vae_training import run_latent_activity, train_vae
    from .world.atlas import EmojiAtlas
    from .world.datasets import dataset_scene, make_dataset
    from .world.features import EmojiFeatures

    out = check_output_folder(out, overwrite, "demo folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = {}

    t = time.time()
    data_dir = make_dataset(config.dataset, out / "data", n=config.num_images, seed=config.seed, overwrite=True,
                            progress=progress)
    run = out / "run"
    invert(data_dir, model, run, InversionConfig(steps=config.inversion_steps, batch_size=config.inversion_batch_size,
           learning_rate=5e-3, seed=config.seed, checkpoint_every=0), overwrite=True, progress=progress)
    timings["dataset prompt"] = time.time() - t
    t = time.time()
    train_vae(data_dir, run, VAEConfig(epochs=config.vae_epochs, batch_size=32, latent_dim=config.vae_latent_dim,
              seed=config.seed, sample_every=max(1, config.vae_epochs // 4)), overwrite=True, progress=progress)
    timings["custom VAE"] = time.time() - t

    features = EmojiFeatures.bundled()
    data_images = load_image_folder(data_dir).images
    data_features = features(data_images)
    pipe = DyodPipeline.for_sampling(run)
    seeds = list(range(config.seed, config.seed + config.num_samples))

    rows, first = [], {}  # first: each row's first images, for the overview figure
    t = time.time()
    vae_images = pipe.vae_samples(seeds)
    score = kid(features(vae_images), data_features, num_subsets=50)
    save_png(make_grid(vae_images[:32], 8), out / "samples_vae_alone.png")
    rows.append(("VAE alone", "-", "-", time.time() - t, score, "samples_vae_alone.png"))
    for t0 in config.t0s:
        sample_config = SampleConfig(t0=t0, num_inference_steps=config.num_inference_steps,
                                     guidance_scale=config.guidance_scale, batch_size=50)
        t = time.time()
        images = pipe.sample(config.num_samples, sample_config, seed=config.seed, progress=progress)
        seconds = time.time() - t
        name = f"samples_t0_{t0:.2f}.png"
        save_png(make_grid(images[:32], 8), out / name)
        label = f"DYOD t0 = {t0_label(t0)}" if t0 < 1 else ALONE
        first[label] = images[:OVERVIEW_IMAGES]
        rows.append((label, pipe.last_unet_calls, f"×{config.num_inference_steps / pipe.last_unet_calls:.2f}",
                     seconds, kid(features(images), data_features, num_subsets=50), name))
    save_png(make_grid(data_images[:32], 8), out / "dataset.png")
    # The diagnosis: every DYOD sample leaves through the prior's autoencoder, so the dataset's own images through it
    # score what no t0 can beat with this prior.
    t = time.time()
    floor_images = pipe.round_trip(data_images[:config.num_samples])
    floor = kid(features(floor_images), data_features, num_subsets=50)
    save_png(make_grid(floor_images[:32], 8), out / "dataset_through_autoencoder.png")
    floor_row = ("dataset images through the prior's autoencoder (the floor)", "-", "-", time.time() - t, floor,
                 "dataset_through_autoencoder.png")
    prompt_grids = sorted((run / "inversion" / "samples").glob("step-*.png"))
    plot_sweep([SweepRow(label, t0, score.mean_x100, score.std_x100, 0 if calls == "-" else calls,
                         seconds / config.num_samples, config.num_samples)
                for (label, calls, _, seconds, score, _), t0 in zip(rows, (None, *config.t0s))],
               out / "kid_vs_t0.png", title=f"{config.dataset} on {model}", floor=floor.mean_x100)

    # Latent manipulation at the best t0: between the VAE latents of two seeds with ε held fixed (Fig. 6), and the
    # dimensions the dataset uses most, each traversed with the rest of z and ε fixed, a row each (Fig. 7).
    best_t0, best = min(((t0, row) for t0, row in zip(config.t0s, rows[1:]) if t0 < 1), key=lambda r: r[1][4].mean)
    alone = [("prior + S* alone", first[ALONE])] if ALONE in first else []
    k = min(OVERVIEW_IMAGES, len(vae_images))
    save_png(labeled_rows([("dataset", data_images[:k]), ("custom VAE alone", vae_images[:k]),
                           (best[0], first[best[0]]), *alone]), out / "overview.png")
    t = time.time()
    manipulation = SampleConfig(t0=best_t0, num_inference_steps=config.num_inference_steps,
                                guidance_scale=config.guidance_scale, batch_size=50)
    ends = [config.seed, config.seed + 1]
    frames = pipe.interpolate(*ends, steps=8, config=manipulation, progress=False)
    save_png(make_grid(frames, len(frames)), out / "interpolation.png")
    fitted = Run.open(run)
    activity = run_latent_activity(fitted)  # as its training recorded it
    dims, variance = most_active_dimensions(activity, 3), activity["posterior_mean_variance"]
    save_png(make_grid(pipe.traverse(config.seed, dims, list(TRAVERSAL_VALUES), manipulation, progress=False),
                       len(TRAVERSAL_VALUES)), out / "traversal.png")
    timings["latent manipulation"] = time.time() - t

    # Image initialization (Eq. 11): scenes the dataset does not hold (the next seed), painted as flat discs of their
    # emoji's colours, perturbed to each t' < 1 of the table and denoised with S*.
    t = time.time()
    atlas = EmojiAtlas.bundled()
    strokes = [dataset_scene(config.dataset, i, config.seed + 1).render_strokes(atlas) for i in range(STROKES)]
    stroke_t0s = [t0 for t0 in config.t0s if t0 < 1]
    transformed = [pipe.transform(strokes, dataclasses.replace(manipulation, t0=t0), seed=config.seed, progress=False)
                   for t0 in stroke_t0s]
    # and the paper's baseline: at the best t0, the prompt without S* (the word S* started from)
    baseline = prompt_without_token(fitted)
    transformed.append(pipe.transform(strokes, dataclasses.replace(manipulation, prompt=baseline), seed=config.seed,
                                      progress=False))
    save_png(make_grid(strokes + [im for row in transformed for im in row], STROKES), out / "image_initialization.png")
    timings["image initialization"] = time.time() - t
    wall = time.time() - started

    vae_alone, alone = rows[0][4], next((r[4] for r in rows if r[0].startswith("prior")), None)
    lines = [
        "# dyod demo",
        "",
        f"Dataset: `{config.dataset}`, {config.num_images} images at 64 px (`{data_dir}`). Model: `{model}`.",
        f"Run folder: `{run}`. Samples: {config.num_samples} per row, seeds {seeds[0]}–{seeds[-1]}, DDIM T = "
        f"{config.num_inference_steps}, guidance {config.guidance_scale}.",
        "KID × 100 against the dataset with the bundled emoji feature network (mean ± std over 50 subsets).",
        "",
        "| sampler | UNet calls | speed-up (T/t0) | s / image | KID × 100 | samples |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | {calls} | {speed} | {seconds / config.num_samples:.3f} | {score.mean_x100:.2f} ± {score.std_x100:.2f} | ![]({img}) |"
          for label, calls, speed, seconds, score, img in rows + [floor_row]],
        "",
        f"Best DYOD row: **{best[0]}**, KID × 100 = {best[4].mean_x100:.2f}. {verdict(best[4], vae_alone, alone, floor)}",
        "",
        "![KID against t0](kid_vs_t0.png)",
        "",
        "At a glance (seeds as in the table; the best DYOD row): ![](overview.png)",
        "",
        "Dataset: ![](dataset.png)",
        "",
        *([f"What the learned prompt gives as it trains (prior + S* alone, {prompt_grids[0].stem} is the initializer word "
           f"\"{InversionConfig().initializer}\", {prompt_grids[-1].stem} the final S*): "
           + " ".join(f"![]({p.relative_to(out)})" for p in (prompt_grids[0], prompt_grids[-1])), ""]
          if len(prompt_grids) > 1 else []),
        f"## Latent manipulation at t0 = {t0_label(best_t0)} (the best DYOD row)",
        "",
        f"Between the custom VAE's latents of seeds {ends[0]} and {ends[1]}, the forward noise ε held fixed (Fig. 6): "
        "![](interpolation.png)",
        "",
        f"The {len(dims)} latent dimensions the dataset uses most ({', '.join(map(str, dims))}: the largest variances "
        "of the VAE's posterior mean over the dataset, "
        f"{', '.join(f'{variance[d]:.2f}' for d in dims)}; {activity['active_dimensions']} of "
        f"{len(variance)} dimensions are active, above {activity['active_threshold']}), "
        f"each set to {TRAVERSAL_VALUES[0]:g} … {TRAVERSAL_VALUES[-1]:g} with the rest of z (seed {config.seed}) and ε "
        "fixed, a row each (Fig. 7): ![](traversal.png)",
        "",
        "## Image initialization (Eq. 11)",
        "",
        f"{STROKES} scenes of `{config.dataset}` the dataset does not hold (seed {config.seed + 1}), painted as flat "
        "discs of their emoji's colours (the top row; `dyod datasets make --strokes` writes such inputs), each "
        f"perturbed to t' = {', '.join(t0_label(t0) for t0 in stroke_t0s)} (the rows below) and denoised with S*; the "
        f"last row, the paper's baseline: t' = {t0_label(best_t0)} with \"{baseline}\", the prompt without S* (Fig. 5): "
        "![](image_initialization.png)",
        "",
        f"Time: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; total {wall / 60:.1f} min on "
        f"{platform.machine()} ({os.cpu_count()} CPUs).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    write_json(out / "demo.json", {"config": to_dict(config), "model": model, "wall_time_s": round(wall, 1),
                                   "rows": [{"sampler": r[0], "unet_calls": r[1], "seconds": round(r[3], 2),
                                             "kid_x100": r[4].mean_x100, "kid_x100_std": r[4].std_x100} for r in rows],
                                   "autoencoder_floor": {"kid_x100": floor.mean_x100, "kid_x100_std": floor.std_x100},
                                   "latent_manipulation": {"t0": best_t0, "interpolation_seeds": ends,
                                                           "traversed_dimensions": dims,
                                                           "traversal_values": list(TRAVERSAL_VALUES)},
                                   "image_initialization": {"strokes": STROKES, "stroke_seed": config.seed + 1,
                                                            "t0s": stroke_t0s, "baseline_prompt": baseline,
                                                            "baseline_t0": best_t0}})
    logger.info("demo report: %s", out / "report.md")
    return out / "report.md"


def verdict(best, vae_alone, prior_alone, floor) -> str:
    """What the KID numbers say, in a sentence: whether DYOD beat both baselines and, where it did not beat the VAE
    alone, whether the prior's autoencoder floor allowed it (KID results: lower is better)."""
    beats_prior = prior_alone is None or best.mean < prior_alone.mean
    if best.mean < vae_alone.mean and beats_prior:
        return "DYOD beats both baselines."
    said = "DYOD beats the prior + S* alone but not the VAE alone." if beats_prior else "DYOD beats neither baseline."
    if best.mean >= vae_alone.mean and floor.mean >= vae_alone.mean:
        said += (f" No t0 can beat the VAE alone with this prior: its autoencoder alone turns the dataset's own images into a set scoring "
                 f"{floor.mean_x100:.2f}, above the VAE alone's {vae_alone.mean_x100:.2f}, and every DYOD sample is "
                 "decoded by it (Stable Diffusion's autoencoder is close to lossless at this scale; the miniature "
                 "prior's is not).")
    return said
