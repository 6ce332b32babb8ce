"""Output folders of the sampling commands: each image a PNG carrying what made it, grid.png, and the record
(``dyod_outputs.json``) that ``dyod eval``, ``dyod info`` and a ``--resume`` read. The CLI and the UI write through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import __version__
from .config import SampleConfig, to_dict, write_json

logger = logging.getLogger(__name__)

GRID_MAX = 64  # grid.png shows the first 64 results: a grid of 50,000 samples would be gigapixels
PNG_KEY = "dyod"  # the tEXt chunk of each result: JSON of what made it (run, model, settings, seed, ...)


def sample_record(command: str, run: Path, config: SampleConfig, pipe, **extra) -> dict:
    """What a sampling command made its images with: the run (and the SHA-256 of its S* and custom VAE), the model,
    the settings, where the reverse process starts and how many UNet calls a batch costs."""
    from .run import Run
    from .sampling import Schedule, num_denoising_steps

    schedule = Schedule.from_scheduler_config(pipe.prior.scheduler_config, config.num_inference_steps)
    n = num_denoising_steps(config.t0, config.num_inference_steps)
    return {
        "command": command,
        "run": str(run),
        "run_path": str(Path(run).resolve()),
        "model": pipe.prior.model,
        "run_files": Run.open(run).results_fingerprint(),  # SHA-256 of the S* and the custom VAE sampled with
        "config": to_dict(config),
        "start_timestep": "pure noise (x_T)" if config.t0 == 1.0 else int(schedule.start(config.t0)[0]),
        "denoising_steps": n,
        "unet_calls_per_batch": n,
        **extra,
    }


def png_texts(record: dict | None, made: list[dict] | None, first: int, count: int) -> list[dict[str, str]] | None:
    """The tEXt chunk of images ``first``..``first + count - 1``: the record's command, run, model and settings, and
    ``made[i]`` (its seed, input or latent value), so that an image copied away from its folder can be made again."""
    if record is None:
        return None
    common = {"dyod_version": __version__, **{k: record[k] for k in ("command", "run", "model", "config") if k in record}}
    return [{PNG_KEY: json.dumps({**common, **(made[first + i] if made else {})})} for i in range(count)]


def write_batches(batches, names, out: Path, record: dict | None = None, made: list[dict] | None = None) -> int:
    """Save the images as they come (a long run stopped midway keeps what it made), each PNG carrying what made it
    (``png_texts``); returns how many were written."""
    from .images import save_images

    written = 0
    for images in batches:
        save_images(images, out, names[written:written + len(images)], png_texts(record, made, written, len(images)))
        written += len(images)
    return written


def finish_outputs(out: Path, ncols: int | None, record: dict, listed: list[str], grid_max: int = GRID_MAX) -> None:
    """grid.png of the first ``grid_max`` of the folder's results (read back from disk) and the record listing
    them."""
    from PIL import Image

    from .data import OUTPUT_RECORD
    from .images import make_grid, save_png

    save_png(make_grid([Image.open(out / name) for name in listed[:grid_max]], ncols), out / "grid.png")
    write_json(out / OUTPUT_RECORD, {**record, "images": listed})  # what `dyod eval OUT` counts (not the grid)
    logger.info("wrote %d image%s and grid.png to %s", len(listed), "" if len(listed) == 1 else "s", out)


def save_outputs(batches, names, out: Path, ncols: int | None, record: dict, listed: list[str] | None = None,
                 made: list[dict] | None = None, grid_max: int = GRID_MAX) -> None:
    """``write_batches``, then ``finish_outputs``: grid.png of the first ``grid_max`` results, ``ncols`` a row, and the
    record that lists them (``listed``: all the folder's results, in order, when a resumed run adds ``names`` to those
    it found)."""
    written = write_batches(batches, names, out, record, made)
    finish_outputs(out, ncols, record, names[:written] if listed is None else listed, grid_max)
