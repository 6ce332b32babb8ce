"""dyod: customize a pre-trained text-to-image diffusion model to your own data (DYOD).

Stages, one module each: ``inversion`` (dataset prompt, Eq. 7), ``vae`` (custom generator), ``sampling`` (DDIM from
t0, Eq. 9-11), ``pipeline`` (distribution and image initialization, latent manipulation)."""

__version__ = "0.1.0"

from .config import DataConfig, InversionConfig, SampleConfig, VAEConfig  # noqa: E402
from .errors import DyodError  # noqa: E402

__all__ = [
    "DataConfig",
    "DyodError",
    "InversionConfig",
    "SampleConfig",
    "VAEConfig",
    "invert",
    "train_vae",
    "fit",
    "DyodPipeline",
    "load_prior",
    "Run",
    "export_embedding",
]


def __getattr__(name):  # lazy: importing dyod does not import diffusers
    if name in ("invert",):
        from .inversion import invert

        return invert
    if name == "train_vae":
        from .vae_training import train_vae

        return train_vae
    if name == "fit":
        from .fitting import fit

        return fit
    if name == "DyodPipeline":
        from .pipeline import DyodPipeline

        return DyodPipeline
    if name == "load_prior":
        from .prior import load_prior

        return load_prior
    if name == "export_embedding":
        from .export import export_embedding

        return export_embedding
    if name == "Run":
        from .run import Run

        return Run
    raise AttributeError(name)
