"""``dyod demo``: the whole method end to end on bundled defaults, with a Markdown report of what it made."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from .config import DataConfig, InversionConfig, SampleConfig, VAEConfig, to_dict, write_json
from .errors import DyodError
from .images import make_grid, save_png

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (defaults sized for 2 CPU cores)."""

    num_images: int = 48
    inversion_steps: int = 60
    vae_epochs: int = 60
    num_samples: int = 16
    t0s: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    num_inference_steps: int = 50
    seed: int = 0


def run_demo(out: str | os.PathLike, config: DemoConfig = DemoConfig(), model: str | None = None,
             overwrite: bool = False, progress: bool = True) -> Path:
    """Make a dataset, fit DYOD on it (dataset prompt + custom VAE), sample at several t0, write ``report.md``."""
    from .inversion import invert
    from .pipeline import DyodPipeline
    from .testing import make_shapes_dataset, make_tiny_model
    from .vae_training import train_vae

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DyodError(f"demo folder {out} is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data_dir = make_shapes_dataset(out / "data", n=config.num_images, size=32, seed=config.seed)
    if model is None:
        model = str(make_tiny_model(out / "model", seed=config.seed))
        model_note = "a tiny randomly initialized SD-shaped model built in code (pipeline smoke test)"
    else:
        model_note = model
    run = out / "run"
    invert(data_dir, model, run, InversionConfig(steps=config.inversion_steps, batch_size=4, seed=config.seed),
           DataConfig(), overwrite=True, progress=progress)
    train_vae(data_dir, run, VAEConfig(epochs=config.vae_epochs, batch_size=16, latent_dim=16, seed=config.seed),
              overwrite=True, progress=progress)
    pipe = DyodPipeline.from_run(run)
    rows = []
    for t0 in config.t0s:
        sample_config = SampleConfig(t0=t0, num_inference_steps=config.num_inference_steps)
        t = time.time()
        images = pipe.sample(config.num_samples, sample_config, seed=config.seed, progress=progress)
        seconds = time.time() - t
        grid = save_png(make_grid(images, 8), out / f"samples_t0_{t0:.2f}.png")
        rows.append((t0, pipe.last_unet_calls, seconds / len(images), grid.name))
    vae_only = pipe._to_output(pipe.vae_images(pipe.z(list(range(config.seed, config.seed + config.num_samples)))), None)
    save_png(make_grid(vae_only, 8), out / "samples_vae_alone.png")
    save_png(make_grid(pipe_data_images(data_dir, config.num_samples), 8), out / "dataset.png")
    wall = time.time() - started
    lines = [
        "# dyod demo",
        "",
        f"Model: {model_note}. Dataset: {config.num_images} procedural images in `{data_dir}`.",
        f"Run folder: `{run}`. Wall time: {wall:.0f} s.",
        "",
        "| t0 | UNet calls | s / image | samples |",
        "|---|---|---|---|",
        *[f"| {t0:.2f} | {calls} | {s:.3f} | ![]({name}) |" for t0, calls, s, name in rows],
        "| VAE alone | 0 | - | ![](samples_vae_alone.png) |",
        "",
        "Dataset: ![](dataset.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    write_json(out / "demo_config.json", {**to_dict(config), "model": model, "wall_time_s": round(wall, 1)})
    logger.info("demo report: %s", out / "report.md")
    return out / "report.md"


def pipe_data_images(data_dir: Path, n: int):
    from .data import load_image_folder

    return load_image_folder(data_dir, max_images=n).images
