"""Per-sample randomness: one generator per (seed, stream), so a seed gives the same image at any batch size.

DYOD's randomness is (z, ε): the custom VAE's latent and the forward noise of q(x_t0 | x'). They come from separate
streams of the same seed, so either can be held fixed while the other changes (Fig. 6)."""

from __future__ import annotations

import numpy as np
import torch

STREAM_Z = 0  # z ~ N(0, I), the custom generator's latent
STREAM_NOISE = 1  # ε of Eq. 4, the perturbation to t0


def generator(seed: int, stream: int) -> torch.Generator:
    # the seed enters as two 32-bit words: seeds past 2**64 would alias smaller ones (randn_per_seed refuses them)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def randn_per_seed(seeds: list[int], shape: tuple[int, ...], stream: int) -> torch.Tensor:
    """Stack one N(0, I) draw of ``shape`` per seed, drawn on the CPU (the same numbers on any device)."""
    if any(not 0 <= s < 2**64 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**64), got {seeds}")
    return torch.stack([torch.randn(shape, generator=generator(s, stream)) for s in seeds])
