"""Output folders of the sampling commands: each image a PNG carrying what made it, grid.png, and the record
(``dyod_outputs.json``) that ``dyod eval``, ``dyod info`` and a ``--resume`` read. The CLI and the UI write through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import __version__
from .config import SampleConfig, read_json, to_dict, write_json
from .errors import DyodError

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


def prepare_output(folder: Path, overwrite: bool) -> Path:
    """An output folder to write into: refused if it holds something and ``overwrite`` is not given; with it, the
    earlier results cleared (``clear_previous_results``)."""
    from .run import check_output_folder

    check_output_folder(folder, overwrite)
    if overwrite:
        clear_previous_results(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def clear_previous_results(folder: Path) -> None:
    """--overwrite replaces what an earlier sample/transform/interpolate/traverse wrote in ``folder``: its result PNGs
    (each carries dyod's tEXt record), grid.png and its record. Left there, the results of a larger -n, or of an
    interrupted run, would stand beside the new ones, and a later --resume would keep them as if made with the new
    settings. Other files stay."""
    from PIL import Image

    from .data import OUTPUT_RECORD

    if not (folder / OUTPUT_RECORD).exists():
        return
    removed = 0
    for path in folder.glob("*.png"):
        try:
            with Image.open(path) as image:
                ours = PNG_KEY in getattr(image, "text", {})
        except OSError:
            continue
        if ours:
            path.unlink()
            removed += 1
    for name in ("grid.png", OUTPUT_RECORD):
        (folder / name).unlink(missing_ok=True)
    logger.info("--overwrite: removed %d earlier results from %s", removed, folder)


def check_resumable(out: Path, run: Path, config: SampleConfig, seed: int, noise_seed: int | None) -> None:
    """--resume continues only what the same run, settings and noise seed made, so that every image is of one run."""
    from .data import OUTPUT_RECORD
    from .run import Run

    record_path = out / OUTPUT_RECORD
    if not record_path.exists():
        if out.exists() and any(out.iterdir()):
            raise DyodError(f"--resume: {out} holds no {OUTPUT_RECORD}, so it is not a `dyod sample` folder; "
                            "choose another --out")
        return
    record = read_json(record_path)
    recorded = record.get("run_files")  # records from before it was kept: not checked
    changed = Run.open(run).changed_results(recorded) if recorded is not None else []
    made = {"command": record.get("command"), "run": record.get("run"), "config": record.get("config"),
            "noise_seed": record.get("noise_seed"), "seed": (record.get("seeds") or [None])[0]}
    asked = {"command": "sample", "run": str(Path(run)), "config": to_dict(config), "noise_seed": noise_seed,
             "seed": seed}
    # the same run however it is named (relative from another folder, absolute), or moved with the same S* and VAE
    same_run = (Path(record.get("run_path") or made["run"] or "").resolve() == Path(run).resolve()
                or (recorded is not None and all(recorded.values()) and not changed))
    differ = [k for k in made if made[k] != asked[k] and not (k == "run" and same_run)]
    if differ:
        raise DyodError(f"--resume: the samples in {out} were made with another {', '.join(differ)} "
                        f"({', '.join(f'{k}={made[k]!r}' for k in differ)}); run with those, or choose another --out")
    if changed:
        raise DyodError(f"--resume: the samples in {out} were made with the run's {' and '.join(changed)} as it was "
                        "before it was trained again; the new samples would not match them. Choose another --out, or "
                        "--overwrite to start this folder again")
