"""DYOD sampling on a run: distribution initialization (Eq. 9-10), image initialization (Eq. 11), and latent
manipulation (Fig. 6-7), on top of the pure DDIM functions in ``sampling``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import SampleConfig
from .data import lanczos_resize_tensor, pil_to_tensor, resize_lanczos, tensor_to_pil
from .embeddings import expand_prompt, load_into, load_learned_embeds
from .errors import DyodError
from .guidance import GuidedDenoiser, encode_prompts
from .prior import Prior, load_prior
from .run import Run
from .sampling import Schedule, sample_ddim, start_latents
from .seeding import STREAM_NOISE, STREAM_Z, randn_per_seed
from .vae import VanillaVAE, load_vae

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class DyodPipeline:
    """The frozen prior with the learned S*, and (optionally) the custom VAE of a run."""

    def __init__(
        self,
        prior: Prior,
        token: str | None,
        num_vectors: int = 1,
        custom_vae: VanillaVAE | None = None,
        output_resolution: int | None = None,
        grayscale: bool = False,
    ):
        self.prior = prior
        self.token = token
        self.num_vectors = num_vectors
        self.custom_vae = custom_vae
        self._warned: set[tuple[str, str]] = set()  # each prompt's warning once, not once a batch
        # Lanczos down to the dataset's resolution; a dataset larger than the model (camera photos) gets the model's:
        # upsampling would add pixels, not detail (a 3000-px dataset made 3000-px PNGs of 512-px samples)
        self.output_resolution = min(output_resolution or prior.resolution, prior.resolution)
        # a run fitted to grayscale data (--grayscale) gives grayscale images, as its dataset was read: the prior's
        # decoder may tint what it draws
        self.grayscale = grayscale
        self.last_unet_calls = 0
        self.compiled = False  # set by optimize(compile=...): batches are then padded to one shape

    @classmethod
    def from_run(cls, run: str | os.PathLike | Run, device: str | None = None, dtype: torch.dtype = torch.float32,
                 model: str | os.PathLike | None = None) -> "DyodPipeline":
        """The run's prior, S* and custom VAE. ``model``: load the prior from there instead of where the run records it
        (the same model moved, or a run copied to another machine); a model whose facts differ from the recorded
        ones (resolution, prediction type, latent channels, text width) is refused: S* and the VAE belong to it."""
        run = run if isinstance(run, Run) else Run.open(run)
        device = device or default_device()
        try:
            prior = load_prior(model or run.model, device=device, dtype=dtype)
        except DyodError as e:
            if model is None and "could not load" in str(e):
                raise DyodError(f"{e}\n  (the model run {run.path} records; if it has moved, give its new place with "
                                "--model)") from e
            raise
        if model is not None:
            _check_same_facts(run, prior)
        token, num_vectors = None, 1
        if run.embeddings_path.exists():
            token, vectors = load_learned_embeds(run.embeddings_path)
            load_into(prior.tokenizer, prior.text_encoder, token, vectors)
            num_vectors = vectors.shape[0]
        else:
            logger.warning("run %s has no dataset prompt yet: prompts cannot use S*", run.path)
        custom_vae = load_vae(run.vae_path, device) if run.vae_weights_path.exists() else None
        grayscale = bool(run.info.get("data_config", {}).get("grayscale", False))
        return cls(prior, token, num_vectors, custom_vae, run.data_resolution, grayscale)

    @classmethod
    def for_sampling(cls, run: str | os.PathLike | Run, device: str | None = None, precision: str = "auto",
                     compile: str | None = None, model: str | os.PathLike | None = None) -> "DyodPipeline":
        """``from_run`` with the sampling defaults of the command line: the prior in ``precision`` (auto: fp16 on
        CUDA, fp32 on the CPU) and, on CUDA or when ``compile`` is given, ``optimize()``."""
        from .performance import check_compile_device, check_compile_mode, resolve_precision

        device = device or default_device()
        compile = check_compile_mode(compile)
        check_compile_device(compile, device)  # before loading anything
        pipe = cls.from_run(run, device=device, dtype=resolve_precision(precision, device), model=model)
        if torch.device(device).type == "cuda" or compile is not None:
            pipe.optimize(compile=compile)
        return pipe

    def optimize(self, channels_last: bool | None = None, fuse_projections: bool = True,
                 compile: str | None = None, compile_backend: str = "inductor") -> "DyodPipeline":
        """GPU speed-ups that keep the numbers up to rounding (``performance.optimize_for_sampling``): fused q/k/v
        projections, cuDNN autotuning, and optionally ``torch.compile`` of the UNet and the autoencoder in a mode
        ("default", "reduce-overhead" for CUDA graphs, "max-autotune"), with channels-last convolutions (``None``:
        only when compiling, see ``performance.use_channels_last``). The denoising loop has fixed shapes, so it
        compiles once per batch size, and ``_batched`` pads the last batch to the full size."""
        from .performance import check_compile_mode, optimize_for_sampling

        optimize_for_sampling(self.prior, channels_last=channels_last, fuse_projections=fuse_projections,
                              compile_mode=compile, compile_backend=compile_backend)
        self.compiled = self.compiled or check_compile_mode(compile) is not None
        return self

    @property
    def device(self) -> torch.device:
        return self.prior.unet.device

    # -- pieces -----------------------------------------------------------------------------------------------
    def prompt(self, template: str) -> str:
        if "{}" in template and self.token is None:
            raise DyodError("this run has no learned token yet; run `dyod invert` first or give a prompt without {}")
        # S* written out ("a photo of <dyod>") expands as {} does: a multi-vector token needs all its vectors, as
        # diffusers' maybe_convert_prompt gives them
        uses_token = "{}" in template or (self.token is not None and self.token in template)
        return expand_prompt(template, self.token, self.num_vectors) if uses_token else template

    def denoiser(self, config: SampleConfig) -> GuidedDenoiser:
        self._warn_of_captured_words(config)
        cond = encode_prompts(self.prior.tokenizer, self.prior.text_encoder, [self.prompt(config.prompt)])
        uncond = encode_prompts(self.prior.tokenizer, self.prior.text_encoder, [config.negative_prompt])
        return GuidedDenoiser(self.prior.unet, cond, uncond, config.guidance_scale)

    def _warn_of_captured_words(self, config: SampleConfig) -> None:
        """The tokenizer reads the learned token wherever a text holds it, inside other words too: say so where a
        prompt holds it besides its {} (a placeholder such as "photo" in "a photo of {}"), or the negative prompt does."""
        token = self.token
        if token is None or (config.prompt, config.negative_prompt) in self._warned:
            return
        self._warned.add((config.prompt, config.negative_prompt))
        if "{}" in config.prompt and token in config.prompt.replace("{}", "\0"):
            logger.warning("the prompt %r holds the learned token %r besides its {}: the model reads S* there too",
                           config.prompt, token)
        if token in config.negative_prompt:
            logger.warning("the negative prompt %r holds the learned token %r: the model reads S* there (guidance "
                           "then steers away from the dataset)", config.negative_prompt, token)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] at the model's resolution -> scaled latents (posterior mean: no extra randomness)."""
        vae = self.prior.vae
        # one memory format whatever the pixels came from (PIL arrays arrive channels-last): a compiled encoder
        # guards on strides and would compile again
        latents = vae.encode(images.to(self.device, vae.dtype).contiguous()).latent_dist.mean
        return latents.float() * self.prior.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.prior.vae
        return vae.decode((latents / self.prior.scaling_factor).to(self.device, vae.dtype)).sample.float().clamp(-1, 1)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        h = self.prior.resolution // self.prior.vae_scale_factor
        return randn_per_seed(seeds, (self.prior.latent_channels, h, h), STREAM_NOISE)

    def z(self, seeds: list[int]) -> torch.Tensor:
        return randn_per_seed(seeds, (self._require_vae().latent_dim,), STREAM_Z)

    @torch.no_grad()
    def latents_of(self, images: list[Image.Image]) -> torch.Tensor:
        """Where images lie in the custom VAE's latent space: the posterior means E_q[z | x], each image read as the
        VAE's training read its data (centre-cropped, Lanczos to the VAE's resolution; grayscale for a grayscale run),
        to interpolate between or traverse from as from a seed's z."""
        vae = self._require_vae()
        inputs = [im.convert("L").convert("RGB") if self.grayscale else im.convert("RGB") for im in images]
        mu, _ = vae.encode(pil_to_tensor([resize_lanczos(im, vae.resolution) for im in inputs])
                           .to(next(vae.parameters()).device))
        return mu.float().cpu()

    def _require_vae(self) -> VanillaVAE:
        if self.custom_vae is None:
            raise DyodError("this run has no custom VAE; run `dyod train-vae` (or `dyod fit`) first, or use --t0 1.0")
        return self.custom_vae

    @torch.no_grad()
    def vae_images(self, z: torch.Tensor) -> torch.Tensor:
        """x' ~ p_theta(x' | z): the custom VAE's decoding, in [-1, 1] at its own resolution (the "VAE alone")."""
        vae = self._require_vae()
        return vae.decode(z.to(next(vae.parameters()).device)).float()

    def vae_samples(self, seeds: list[int], output_size: int | None = None) -> list[Image.Image]:
        """The custom VAE alone, z from each seed (the paper's "VAE" baseline)."""
        return self.to_images(self.vae_images(self.z(seeds)), output_size)

    # -- the reverse process from t0 ------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise_from(
        self, init_latents: torch.Tensor | None, noise: torch.Tensor, t0: float, config: SampleConfig, progress: bool = False
    ) -> torch.Tensor:
        """x_{t0} ~ q(x_{t0} | x') then deterministic DDIM to x_0 (Eq. 9 and 11); latents in, latents out."""
        schedule = Schedule.from_scheduler_config(self.prior.scheduler_config, config.num_inference_steps)
        timesteps = schedule.start(t0)
        model = self.denoiser(config)
        noise = noise.to(self.device, torch.float32)
        init = None if init_latents is None else init_latents.to(self.device, torch.float32)
        # One memory format whatever x' came from (the autoencoder may be channels-last): a compiled UNet then
        # sees the same strides every call and compiles once.
        x = start_latents(init, noise, schedule, t0).contiguous()
        out = sample_ddim(model, x, timesteps, schedule, progress=progress)
        self.last_unet_calls = model.calls
        return out

    def round_trip(self, images: list[Image.Image], batch_size: int = 64) -> list[Image.Image]:
        """Images through the prior's autoencoder alone (Lanczos up, encode to the posterior mean, decode, Lanczos
        down), a batch at a time: every DYOD sample is decoded by it, so the dataset's own images made this way set
        the floor no t0 can score below."""
        out = []
        for start in range(0, len(images), batch_size):
            x = pil_to_tensor([resize_lanczos(im, self.prior.resolution) for im in images[start:start + batch_size]])
            out += self.to_images(self.decode(self.encode(x)))
        return out

    def to_images(self, images: torch.Tensor, size: int | None = None) -> list[Image.Image]:
        """Decoded pixels in [-1, 1] -> Lanczos to the output size where the images are (in float) -> 8-bit PIL
        (for a grayscale run, to grayscale kept as RGB, as ``load_image`` reads its dataset)."""
        if not torch.isfinite(images).all():  # never a black PNG for a NaN: say so, and keep the batches made before
            raise DyodError("the model's output holds non-finite values (NaN or inf), which would be written as black "
                            "images; nothing of this batch was written. Usual causes: a guidance scale far outside "
                            "the usual 1-20 (--guidance-scale), or fp16 overflow (try --precision fp32)")
        pils = tensor_to_pil(lanczos_resize_tensor(images, size or self.output_resolution))
        return [im.convert("L").convert("RGB") for im in pils] if self.grayscale else pils

    def _batched(self, n: int, config: SampleConfig, progress: bool, fn) -> list[Image.Image]:
        return [image for batch in self._iter_batched(n, config, progress, fn) for image in batch]

    def _iter_batched(self, n: int, config: SampleConfig, progress: bool, fn) -> Iterator[list[Image.Image]]:
        """``fn(indices)`` over batches of ``config.batch_size`` items, each batch's results as they come. Compiled,
        every batch runs at that size, the last one padded with copies of its last item (whose outputs are dropped):
        a compiled UNet and autoencoder compile again for each new batch shape (about a minute for reduce-overhead at
        SD scale), so a run of 100 images at batch 8 would otherwise compile twice. Each item's randomness comes from
        its own seed, so the padding changes no output beyond rounding."""
        for start in tqdm(range(0, n, config.batch_size), disable=not progress, desc="sampling", leave=False):
            indices = list(range(start, min(n, start + config.batch_size)))
            kept = len(indices)
            if self.compiled:
                indices += indices[-1:] * (config.batch_size - kept)
            yield fn(indices)[:kept]

    # -- the paper's two paths -------------------------------------------------------------------------------------
    @torch.no_grad()
    def distribution_initialization(self, z: torch.Tensor | None, noise: torch.Tensor, config: SampleConfig,
                                    output_size: int | None = None) -> list[Image.Image]:
        """Eq. 9-10 for one batch: the custom generator's x' = D(z), Lanczos up to the prior's resolution, perturbed to
        t0 by q(x_t0 | x') with ε = ``noise``, deterministic DDIM from t0 conditioned on S*, Lanczos down. At t0 = 1
        the start is pure noise and z is unused: the prior with S* alone."""
        init = None
        if config.t0 < 1.0:
            x_prime = self.vae_images(z)  # x' = D(z), the custom generator's sample
            x_prime = lanczos_resize_tensor(x_prime, self.prior.resolution).clamp(-1, 1)  # up, Lanczos
            init = self.encode(x_prime)  # into the prior's latent space
        latents = self.denoise_from(init, noise, config.t0, config)  # q(x_t0 | x'), then DDIM to x_0
        return self.to_images(self.decode(latents), output_size)  # decode, down to the dataset's resolution

    @torch.no_grad()
    def image_initialization(self, images: list[Image.Image], noise: torch.Tensor, config: SampleConfig,
                             output_size: int | None = None) -> list[Image.Image]:
        """Eq. 11 for one batch: the user's images y (strokes, photos), Lanczos to the prior's resolution, perturbed to
        t' = ``config.t0`` by q(y_t' | y) with ε = ``noise``, deterministic DDIM from t' conditioned on S*."""
        y = pil_to_tensor([resize_lanczos(im, self.prior.resolution) for im in images])
        latents = self.denoise_from(self.encode(y), noise, config.t0, config)  # q(y_t' | y), then DDIM to y_0
        return self.to_images(self.decode(latents), output_size)

    def generate(self, z: torch.Tensor | None, noise: torch.Tensor, config: SampleConfig = SampleConfig(),
                 progress: bool = False, output_size: int | None = None) -> list[Image.Image]:
        """Distribution initialization (Eq. 9-10) from explicit randomness (z, ε), in batches; z is ignored at t0 = 1."""
        def run(batch: list[int]) -> list[Image.Image]:
            return self.distribution_initialization(None if z is None else z[batch], noise[batch], config, output_size)

        return self._batched(len(noise), config, progress, run)

    def sample(self, n: int, config: SampleConfig = SampleConfig(), seed: int = 0, noise_seed: int | None = None,
               progress: bool = True) -> list[Image.Image]:
        """n samples with seeds seed..seed+n-1 (z and ε from each seed; ``noise_seed`` fixes ε for all)."""
        return [image for batch in self.iter_samples(n, config, seed, noise_seed, progress) for image in batch]

    def iter_samples(self, n: int, config: SampleConfig = SampleConfig(), seed: int = 0, noise_seed: int | None = None,
                     progress: bool = True) -> Iterator[list[Image.Image]]:
        """``sample``, a batch of ``config.batch_size`` images at a time, each batch as soon as it is made: a run of
        50,000 samples holds one batch's randomness and images, and can write them as they come. Each sample's
        randomness comes from its own seed, so the images are ``sample``'s."""
        if n < 1:
            raise DyodError(f"the number of samples must be >= 1, got {n}")
        return self.iter_seeds(list(range(seed, seed + n)), config, noise_seed, progress)

    def iter_seeds(self, seeds: list[int], config: SampleConfig = SampleConfig(), noise_seed: int | None = None,
                   progress: bool = True) -> Iterator[list[Image.Image]]:
        """The samples of any seeds (``iter_samples`` gives consecutive ones), a batch at a time: what a stopped run
        left to do, say. A seed gives the same image whatever its batch (up to a level of rounding)."""
        starts = range(0, len(seeds), config.batch_size)
        for start in tqdm(starts, disable=not progress or len(starts) < 2, desc="sampling", leave=False):
            batch = seeds[start:start + config.batch_size]
            z = self.z(batch) if config.t0 < 1.0 else None
            yield self.generate(z, self.noise(sample_noise_seeds(batch, noise_seed)), config, progress=False)

    def transform(self, images: list[Image.Image], config: SampleConfig = SampleConfig(), seed: int = 0,
                  grayscale: bool = False, progress: bool = True, output_size: int | None = None) -> list[Image.Image]:
        """Image initialization (Eq. 11): perturb each input to t' = config.t0 and denoise it with S*."""
        return [image for batch in self.iter_transform(images, config, seed, grayscale, progress, output_size)
                for image in batch]

    def iter_transform(self, images: list[Image.Image], config: SampleConfig = SampleConfig(), seed: int = 0,
                       grayscale: bool = False, progress: bool = True,
                       output_size: int | None = None) -> Iterator[list[Image.Image]]:
        """``transform``, a batch of results at a time as each is made (input i always uses noise seed seed + i)."""
        if not images:
            raise DyodError("no input images to transform")
        if config.t0 == 1.0:
            logger.warning("t0 = 1 starts from pure noise and leaves the input images unused: each result is the "
                           "prior's sample for its seed, whatever the input (give a t0 below 1)")

        def run(batch: list[int]) -> list[Image.Image]:  # pixels and noise a batch at a time: 3 MiB an input at 512 px
            inputs = [images[i].convert("L").convert("RGB") if grayscale else images[i] for i in batch]
            return self.image_initialization(inputs, self.noise([seed + i for i in batch]), config, output_size)

        return self._iter_batched(len(images), config, progress, run)

    def interpolate(self, seed_a: int, seed_b: int, steps: int = 8, config: SampleConfig = SampleConfig(),
                    fix_noise: bool = True, noise_seed: int | None = None, progress: bool = True,
                    ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Image.Image]:
        """Fig. 6: z = z1 + λ(z2 - z1) for λ in [0, 1]; ε the same for every frame when fix_noise. ``ends``: z1 and
        z2 given (``latents_of`` two images) instead of drawn from the seeds, which then draw ε alone."""
        if steps < 2:
            raise DyodError(f"interpolation needs at least 2 steps, got {steps}")
        _warn_if_z_unused(config, "interpolation")
        z1, z2 = self.z([seed_a, seed_b]) if ends is None else ends
        lambdas = torch.linspace(0, 1, steps)
        z = torch.stack([z1 + lam * (z2 - z1) for lam in lambdas])
        noise = self.noise(interpolation_noise_seeds(seed_a, steps, fix_noise, noise_seed))
        return self.generate(z, noise, config, progress)

    def traverse(self, seed: int, dim: int | Sequence[int], values: list[float], config: SampleConfig = SampleConfig(),
                 progress: bool = True, z: torch.Tensor | None = None) -> list[Image.Image]:
        """Fig. 7: set one coordinate of z to each value, the rest of z and ε fixed. With several dimensions, one such
        row after another (row i varies ``dim[i]``; every row starts from the same z and ε). ``z``: the latent to
        start from (``latents_of`` an image) instead of the seed's, which then draws ε alone."""
        latent_dim = self._require_vae().latent_dim
        _warn_if_z_unused(config, "traversal")
        dims = [dim] if isinstance(dim, int) else list(dim)
        if not dims:
            raise DyodError("traverse needs at least one dimension")
        for d in dims:
            if not 0 <= d < latent_dim:
                raise DyodError(f"dim must be in [0, {latent_dim - 1}]: this custom VAE has {latent_dim} latent "
                                f"dimensions; got {d}")
        z = (self.z([seed]) if z is None else z.reshape(1, -1)).repeat(len(dims) * len(values), 1)
        for row, d in enumerate(dims):
            z[row * len(values):(row + 1) * len(values), d] = torch.tensor(values, dtype=z.dtype)
        noise = self.noise([seed] * len(z))
        return self.generate(z, noise, config, progress)


def sample_noise_seeds(seeds: list[int], noise_seed: int | None = None) -> list[int]:
    """The seed of each sample's ε: its own seed, or ``noise_seed`` for every sample."""
    return list(seeds) if noise_seed is None else [noise_seed] * len(seeds)


def interpolation_noise_seeds(seed_a: int, steps: int, fix_noise: bool, noise_seed: int | None = None) -> list[int]:
    """The seed of each frame's ε in ``interpolate``: one for every frame (``fix_noise``) or one more per frame, from
    ``noise_seed`` or else the first seed."""
    base = seed_a if noise_seed is None else noise_seed
    return [base] * steps if fix_noise else list(range(base, base + steps))


def _check_same_facts(run: Run, prior: Prior) -> None:
    recorded = run.info.get("prior", {})
    loaded = prior.describe()
    keys = ("resolution", "prediction_type", "latent_channels", "embedding_dim")
    differ = [k for k in keys if k in recorded and recorded[k] != loaded[k]]
    if differ:
        raise DyodError(f"--model {prior.model} is not the model run {run.path} was fitted on ({run.info.get('model')}): "
                        + ", ".join(f"{k} {loaded[k]!r} where the run records {recorded[k]!r}" for k in differ))


def _warn_if_z_unused(config: SampleConfig, what: str) -> None:
    if config.t0 == 1.0:
        logger.warning("t0 = 1 starts from pure noise and leaves the VAE latent z unused: every frame of this %s comes "
                       "out the same unless the noise changes (give a t0 below 1)", what)


def load_input_images(paths: list[str | os.PathLike], grayscale: bool = False,
                      size: int | None = None) -> tuple[list[Image.Image], list[Path], list]:
    """Inputs for ``transform``: files or folders (searched recursively); unreadable files are reported (and logged).
    With ``size`` (the model's resolution) each input is cropped and resized as it is read, as ``transform`` would,
    so that a folder of photos is not held at full size; ``grayscale`` converts as ``transform`` would."""
    from .data import find_image_files, read_images

    images, names, skipped = [], [], []
    for p in paths:
        found = read_images(p, find_image_files(p), grayscale=grayscale, size=size, allow_empty=True)
        images += found.images
        names += found.paths
        skipped += [(s.path, s.reason) for s in found.skipped]
    if not images:
        raise DyodError(f"no readable input images in {', '.join(map(str, paths))}")
    return images, names, skipped
