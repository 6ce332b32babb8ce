"""The frozen VAE's posterior for every image of a dataset, computed once: what the dataset prompt trains on.

The dataset is never held (a large one at 512 px would not fit in memory): each image is encoded as it is read and
only the posterior's mean and std are kept, in RAM or memory-mapped on disk when large, and latents are sampled from them at
each step, which is what encoding every step would give, without the VAE in the loop."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import pil_to_tensor, resize_lanczos
from .prior import Prior

logger = logging.getLogger(__name__)


class LatentCache:
    """Posterior mean and std of the frozen VAE for every image: [N, C, h, w] each, in RAM or memory-mapped."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std
        self.data: dict = {}  # what ``build`` was told about the images (``describe``)

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = index.numpy()
        if isinstance(self.mean, torch.Tensor):
            return self.mean[index], self.std[index]
        return torch.from_numpy(np.asarray(self.mean[idx])), torch.from_numpy(np.asarray(self.std[idx]))

    @classmethod
    @torch.no_grad()
    def build(cls, images: Iterable, count: int, prior: Prior, folder: Path, max_ram_mb: int, batch_size: int = 8,
              progress: bool = True, key: dict | None = None, describe: Callable[[], dict] | None = None):
        """Encode ``images`` (any iterable of at most ``count`` PIL images, consumed ``batch_size`` at a time: a
        dataset read as it goes is never held) with the prior's VAE.

        Above ``max_ram_mb`` the cache is memory-mapped ``.npy`` files in ``folder``, reused by a later call with the
        same ``key`` (say, the files' fingerprint; the prior and the shape always count) without reading an image;
        ``describe()``, called once the images are read, is stored with it and comes back as ``data`` either way."""
        h = prior.resolution // prior.vae_scale_factor
        shape = (count, prior.vae.config.latent_channels, h, h)
        nbytes = 2 * 4 * math.prod(shape)
        on_disk = nbytes > max_ram_mb * 2**20
        meta = {"model": prior.model, "shape": list(shape), "key": key or {}}
        if on_disk:
            folder.mkdir(parents=True, exist_ok=True)
            meta_path = folder / "latents.json"
            paths = folder / "latents_mean.npy", folder / "latents_std.npy"
            try:  # a damaged record (an interrupted write) means the cache is made again
                stored = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                stored = stored if isinstance(stored, dict) else {}
            except (OSError, ValueError):
                stored = {}
            if {k: stored.get(k) for k in meta} == meta and all(p.exists() for p in paths):
                logger.info("reusing the latent cache in %s", folder)
                n = stored["num_images"]
                cache = cls(np.load(paths[0], mmap_mode="r")[:n], np.load(paths[1], mmap_mode="r")[:n])
                cache.data = stored.get("data", {})
                return cache
            meta_path.unlink(missing_ok=True)  # written again only when these files are complete
            mean = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.float32, shape=shape)
            std = np.lib.format.open_memmap(paths[1], mode="w+", dtype=np.float32, shape=shape)
        else:
            mean, std = torch.empty(shape), torch.empty(shape)
        vae = prior.vae
        device = vae.device
        images = iter(images)
        filled = 0
        with tqdm(total=count, disable=not progress, desc="encoding dataset", leave=False) as bar:
            while chunk := list(itertools.islice(images, batch_size)):
                x = pil_to_tensor([resize_lanczos(im, prior.resolution) for im in chunk]).to(device=device, dtype=vae.dtype)
                posterior = vae.encode(x).latent_dist
                m, s = posterior.mean.float().cpu(), posterior.std.float().cpu()
                end = filled + len(chunk)
                mean[filled:end] = m.numpy() if on_disk else m
                std[filled:end] = s.numpy() if on_disk else s
                filled = end
                bar.update(len(chunk))
        data = describe() if describe else {}
        if on_disk:
            mean.flush(), std.flush()
            meta_path.write_text(json.dumps({**meta, "num_images": filled, "data": data}))
            logger.info("latent cache of %.0f MB written to %s", nbytes / 2**20, folder)
        cache = cls(mean[:filled], std[:filled])
        cache.data = data
        return cache
