"""What the browser UI does, without the UI: each action one call of the library the command line makes, on runs
opened once. ``dyod.ui`` lays it out in Gradio; tests drive it directly too."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .config import SampleConfig
from .errors import DyodError

logger = logging.getLogger(__name__)

MAX_IMAGES = 64  # per click: a page of results, and a bound on what one click can queue


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Each path that is a run folder, and the run folders found under each that is not (two levels down)."""
    from .run import RUN_FILE

    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / RUN_FILE).is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for pattern in (f"*/{RUN_FILE}", f"*/*/{RUN_FILE}") for p in path.glob(pattern))
        else:
            raise DyodError(f"{path} is not there: give run folders made by `dyod fit`, or a folder that holds some")
    if not runs:
        raise DyodError(f"no run folders (with {RUN_FILE}) in {', '.join(map(str, paths))}: fit one first with "
                        "`dyod fit DATA --model MODEL --out RUN`")
    return list(dict.fromkeys(runs))


def unet_calls(t0: float, num_inference_steps: int = SampleConfig.num_inference_steps) -> str:
    """What a start at t0 costs: the DDIM steps from t0, one UNet call each (a batch at a time), and the speed-up."""
    from .sampling import num_denoising_steps

    n = num_denoising_steps(t0, num_inference_steps)
    return f"{n} UNet call{'s' if n != 1 else ''} per batch ({num_inference_steps / n:.1f}× fewer than from pure noise)"


def on_white(image: Image.Image) -> Image.Image:
    """An RGB image; a transparent sketch (the pad's empty canvas) drawn on white, as a stroke painting on paper."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class Studio:
    """The runs a UI serves, each opened (and its model loaded) once, on first use."""

    def __init__(self, runs: list[str | os.PathLike], device: str | None = None, model: str | None = None,
                 out: str | os.PathLike | None = None):
        self.runs = [str(r) for r in find_runs(runs)]
        self.device, self.model = device, model
        self.out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="dyod-ui-"))
        self._pipelines: dict = {}

    def _run(self, run: str):
        from .run import Run

        if run not in self.runs:
            raise DyodError(f"{run} is not one of the runs this UI serves ({', '.join(self.runs)})")
        return Run.open(run)

    def pipeline(self, run: str):
        from .pipeline import DyodPipeline

        if run not in self._pipelines:
            self._run(run)
            self._pipelines[run] = DyodPipeline.for_sampling(run, device=self.device, model=self.model)
        return self._pipelines[run]

    def describe(self, run: str) -> str:
        """What `dyod info RUN` prints."""
        from .run_info import describe_run

        self._run(run)
        return describe_run(run)

    def default_t0(self, run: str) -> float:
        """The run's chosen t0 (``dyod tune``), else the default."""
        return self._run(run).chosen_t0() or SampleConfig.t0

    def _config(self, run: str, t0: float, guidance_scale: float | None = None, from_vae: bool = True) -> SampleConfig:
        try:
            config = SampleConfig(t0=float(t0))
            if guidance_scale is not None:
                config = replace(config, guidance_scale=float(guidance_scale))
        except ValueError as e:
            raise DyodError(str(e)) from None
        self._run(run).check_can_sample(config.prompt, (config.t0,) if from_vae else (), otherwise="set t0 to 1")
        return config

    @staticmethod
    def _count(n, what: str) -> int:
        n = int(n)
        if not 1 <= n <= MAX_IMAGES:
            raise DyodError(f"{what} must be between 1 and {MAX_IMAGES}, got {n}")
        return n

    def sketch_to_domain(self, run: str, image: Image.Image | None, t0: float, grayscale: bool = False,
                         guidance_scale: float = SampleConfig.guidance_scale, seed: int = 0,
                         n: int = 4) -> list[Image.Image]:
        """Eq. 11: the sketch (or photo) perturbed to t' = t0 and denoised with S*, ``n`` times (noise seeds seed,
        seed + 1, ...), as `dyod transform` would."""
        if image is None:
            raise DyodError("draw a sketch or upload an image first")
        config = self._config(run, t0, guidance_scale, from_vae=False)
        n = self._count(n, "the number of results")
        return self.pipeline(run).transform([on_white(image)] * n, config, seed=int(seed), grayscale=grayscale,
                                            progress=True)

    def sample(self, run: str, t0: float, n: int = 8, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image],
                                                                             list[Path]]:
        """Eq. 9-10 for seeds seed..seed+n-1: the custom VAE's samples, DYOD's from them, and DYOD's as PNG files
        with `dyod sample`'s metadata (in a folder of their own under ``self.out``)."""
        from .outputs import sample_record, save_outputs
        from .pipeline import sample_noise_seeds

        config = self._config(run, t0)
        n = self._count(n, "the number of images")
        pipe = self.pipeline(run)
        seeds = list(range(int(seed), int(seed) + n))
        images = pipe.sample(n, config, seed=int(seed), progress=True)
        vae = pipe.vae_samples(seeds, output_size=images[0].width) if config.t0 < 1.0 else []
        out = Path(tempfile.mkdtemp(prefix="sample-", dir=self._out()))
        names = [f"seed-{s:06d}.png" for s in seeds]
        record = sample_record("sample", Path(run), config, pipe, seeds=seeds, noise_seed=None, processes=1)
        save_outputs([images], names, out, None, record,
                     made=[{"seed": s, "noise_seed": e} for s, e in zip(seeds, sample_noise_seeds(seeds))])
        return vae, images, [out / name for name in names]

    def interpolate(self, run: str, t0: float, seed_a: int = 0, seed_b: int = 1, steps: int = 8,
                    image_a: Image.Image | None = None, image_b: Image.Image | None = None) -> list[Image.Image]:
        """Fig. 6: between the custom VAE's latents of two seeds (or of two images), ε held fixed."""
        config = self._config(run, t0)
        steps = self._count(steps, "the number of frames")
        pipe = self.pipeline(run)
        if (image_a is None) != (image_b is None):
            raise DyodError("give two images to interpolate between, or none to use the two seeds")
        ends = tuple(pipe.latents_of([on_white(image_a), on_white(image_b)])) if image_a is not None else None
        return pipe.interpolate(int(seed_a), int(seed_b), max(2, steps), config, fix_noise=True, ends=ends,
                                progress=True)

    def traverse(self, run: str, t0: float, seed: int = 0, active: int = 3, steps: int = 7,
                 spread: float = 3.0) -> list[tuple[int, list[Image.Image]]]:
        """Fig. 7: the ``active`` most used latent dimensions of the custom VAE, each set to ``steps`` values in
        [-spread, spread] with the rest of z and ε fixed; a (dimension, strip) pair each."""
        from .vae import model_config_of
        from .vae_training import most_used_dimensions

        config = self._config(run, t0)
        opened = self._run(run)
        latent_dim = model_config_of(opened.vae_path)["latent_dim"]
        active, steps = min(self._count(active, "the number of dimensions"), latent_dim), max(2, int(steps))
        dims, _ = most_used_dimensions(opened, active)
        values = [-spread + 2 * spread * i / (steps - 1) for i in range(steps)]
        images = self.pipeline(run).traverse(int(seed), dims, values, config, progress=True)
        return [(d, images[i * steps:(i + 1) * steps]) for i, d in enumerate(dims)]

    def _out(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out
