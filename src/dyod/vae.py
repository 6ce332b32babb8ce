"""Stage 2, the custom generator p_theta(x' | z): the vanilla VAE of PyTorch-VAE (Subramanian, 2020).

Conv encoder (stride-2 conv + BatchNorm + LeakyReLU per hidden width) to mu/log-variance, a mirrored transposed-conv
decoder with a tanh output in [-1, 1]. Loss: MSE reconstruction + beta · kld_weight · KL, with PyTorch-VAE's
kld_weight = 0.00025 by default."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from .config import VAEConfig, from_dict, read_json, to_dict
from .errors import DyodError, write_atomically

logger = logging.getLogger(__name__)


def check_resolution(resolution: int, hidden_dims: tuple[int, ...]) -> None:
    if resolution < 16 or resolution & (resolution - 1):
        raise DyodError(f"the VAE resolution must be a power of two >= 16, got {resolution}")
    if resolution >> len(hidden_dims) < 1:
        raise DyodError(f"{len(hidden_dims)} stride-2 layers are too many for a {resolution}px VAE")


def default_hidden_dims(resolution: int, base: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch-VAE's widths, one layer per halving, down to a 2x2 map (5 layers at 64 px)."""
    layers = int(math.log2(resolution)) - 1
    dims = list(base[:layers])
    while len(dims) < layers:
        dims.append(dims[-1])
    return tuple(dims)


class VanillaVAE(nn.Module):
    def __init__(self, resolution: int = 64, latent_dim: int = 128, hidden_dims=(32, 64, 128, 256, 512), in_channels: int = 3):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        check_resolution(resolution, hidden_dims)
        self.resolution, self.latent_dim, self.hidden_dims, self.in_channels = resolution, latent_dim, hidden_dims, in_channels
        self.bottom = resolution >> len(hidden_dims)  # spatial size after the encoder

        layers, channels = [], in_channels
        for h in hidden_dims:
            layers.append(nn.Sequential(nn.Conv2d(channels, h, 3, stride=2, padding=1), nn.BatchNorm2d(h), nn.LeakyReLU()))
            channels = h
        self.encoder = nn.Sequential(*layers)
        flat = hidden_dims[-1] * self.bottom**2
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_var = nn.Linear(flat, latent_dim)

        self.decoder_input = nn.Linear(latent_dim, flat)
        rev = hidden_dims[::-1]
        layers = []
        for a, b in zip(rev[:-1], rev[1:]):
            layers.append(
                nn.Sequential(
                    nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(b), nn.LeakyReLU()
                )
            )
        self.decoder = nn.Sequential(*layers)
        self.final_layer = nn.Sequential(
            nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(rev[-1]),
            nn.LeakyReLU(),
            nn.Conv2d(rev[-1], in_channels, 3, padding=1),
            nn.Tanh(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.flatten(self.encoder(x), start_dim=1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_input(z).view(-1, self.hidden_dims[-1], self.bottom, self.bottom)
        return self.final_layer(self.decoder(h))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mu, log_var = self.encode(x)
        noise = torch.randn_like(mu) if noise is None else noise
        z = mu + noise * torch.exp(0.5 * log_var)  # reparameterization
        return self.decode(z), mu, log_var

    def config(self) -> dict:
        return {
            "resolution": self.resolution,
            "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims),
            "in_channels": self.in_channels,
        }


def vae_loss(recons: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, kl_scale: float):
    """PyTorch-VAE's loss: MSE + kl_scale · KL(q(z|x) || N(0, I)), KL summed over z and averaged over the batch."""
    recons_loss = F.mse_loss(recons, x)
    kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
    return recons_loss + kl_scale * kld, recons_loss.detach(), kld.detach()


ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): a dimension is active where Var_x(E_q[z_u | x]) > 0.01


@torch.no_grad()
def latent_activity(model: VanillaVAE, pixels: torch.Tensor, batch_size: int = 256) -> dict:
    """How much the dataset uses each dimension of z (which to traverse, Fig. 7): over the images, the variance of
    the posterior mean E_q[z_u | x] (Burda et al., 2016's activity: a dimension the encoder maps every image to the
    same place is one the decoder has learned to ignore, and traversing it changes nothing) and the mean
    KL(q(z_u | x) || N(0, 1)). ``pixels``: uint8, (N, C, H, W) at the VAE's resolution. The model is put in eval mode
    (its batch norms use their running statistics, as when it generates)."""
    from .data import to_unit_range

    if not len(pixels):
        raise DyodError("the latent activity needs at least one image")
    model.eval()
    device = next(model.parameters()).device
    means, kl_sum = [], torch.zeros(model.latent_dim, dtype=torch.float64)
    for start in range(0, len(pixels), batch_size):
        mu, log_var = model.encode(to_unit_range(pixels[start:start + batch_size]).to(device))
        mu, log_var = mu.double().cpu(), log_var.double().cpu()
        means.append(mu)
        kl_sum += (-0.5 * (1 + log_var - mu**2 - log_var.exp())).sum(dim=0)
    means = torch.cat(means)
    variance = means.var(dim=0, unbiased=False)
    return {"num_images": len(means), "active_threshold": ACTIVE_THRESHOLD,
            "active_dimensions": int((variance > ACTIVE_THRESHOLD).sum()),
            "posterior_mean_variance": variance.tolist(), "mean_kl": (kl_sum / len(means)).tolist()}


def most_active_dimensions(activity: dict, k: int) -> list[int]:
    """The ``k`` dimensions of largest posterior-mean variance, the largest first (ties: the lower index)."""
    variance = activity["posterior_mean_variance"]
    return sorted(range(len(variance)), key=lambda d: (-variance[d], d))[:k]


def save_vae(model: VanillaVAE, folder: str | os.PathLike, train_config: VAEConfig | None = None, extra: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)), "custom VAE's weights")
    config = {"model": model.config(), **(extra or {})}
    if train_config is not None:
        config["training"] = to_dict(train_config)
    text = json.dumps(config, indent=2) + "\n"
    write_atomically(folder / "config.json", lambda tmp: tmp.write_text(text), "custom VAE's config")


def load_vae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> VanillaVAE:
    model = VanillaVAE(**model_config_of(folder))
    from .checkpoint import read_safetensors

    weights = Path(folder) / "model.safetensors"
    state = read_safetensors(weights, "custom VAE's weights", "train it again with `dyod train-vae --overwrite`")
    damaged = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if damaged:  # its samples would be NaN, and so every image made from them
        raise DyodError(f"{weights} holds non-finite values (NaN or inf, in {damaged[0]}"
                        f"{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}): train the custom VAE "
                        "again with `dyod train-vae DATA --out RUN --overwrite`")
    model.load_state_dict(state)
    return model.to(device).eval()


def model_config_of(folder: str | os.PathLike) -> dict:
    """The architecture of the VAE saved in ``folder`` (resolution, latent_dim, hidden_dims), read without loading
    it; a folder without both files is refused with what to do."""
    folder = Path(folder)
    for p in (folder / "model.safetensors", folder / "config.json"):
        if not p.exists():
            pickles = sorted(str(q.name) for q in folder.glob("*") if q.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" ({', '.join(pickles)} found: pickles are refused, save as safetensors)" if pickles else ""
            raise DyodError(f"the custom VAE in {folder} lacks {p.name}{hint}; run `dyod train-vae` first")
    model = read_json(folder / "config.json").get("model")
    if not isinstance(model, dict):
        raise DyodError(f"{folder / 'config.json'} records no \"model\" (the VAE's architecture); the file may be "
                        "damaged: train the VAE again with `dyod train-vae --overwrite`")
    return model


def training_config_of(folder: str | os.PathLike) -> VAEConfig:
    return from_dict(VAEConfig, read_json(Path(folder) / "config.json").get("training", {}))
