"""Centre crops, Lanczos resizing (PIL's, and the same as matrix products on tensors) and PIL <-> tensor conversions."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from PIL import Image


def center_crop_square(im: Image.Image) -> Image.Image:
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    with warnings.catch_warnings():  # Pillow 12 checks a crop's size as it checks an opened file's (see _open_image)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return im.crop((left, top, left + side, top + side))


def resize_lanczos(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize with Lanczos (the paper's choice, in both directions)."""
    im = center_crop_square(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return im


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor [B, 3, H, W] in [-1, 1]."""
    return to_unit_range(pil_to_uint8(images))


def pil_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> uint8 tensor [B, 3, H, W]: a dataset held a quarter of its size in float32."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], as ``pil_to_tensor`` gives them."""
    return pixels.float() / 127.5 - 1.0


def pil_to_resized_tensor(images: list[Image.Image], resize) -> torch.Tensor:
    """PIL images of any sizes -> one tensor [B, 3, h, w] in [-1, 1], in their order: the images of each size are
    stacked and passed to ``resize`` (a [b, 3, H, W] tensor -> [b, 3, h, w]) together. A folder of one size is one
    group, so it gets the very numbers of stacking it whole."""
    if not images:
        raise ValueError("pil_to_resized_tensor: no images")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    if len(groups) == 1:  # as it comes, memory layout included (a network's kernels may depend on it)
        return resize(pil_to_tensor(images))
    out: torch.Tensor | None = None
    for indices in groups.values():
        resized = resize(pil_to_tensor([images[i] for i in indices]))
        if out is None:
            out = resized.new_empty((len(images), *resized.shape[1:]))
        out[indices] = resized
    return out


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor [B, C, H, W] in [-1, 1] -> PIL RGB images."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in x]


@functools.lru_cache(maxsize=32)
def lanczos_weights(in_size: int, out_size: int) -> torch.Tensor:
    """[out_size, in_size] float64 resampling matrix of PIL's Lanczos filter (``precompute_coeffs`` in PIL's
    Resample.c): a = 3 taps widened by the scale when shrinking (anti-aliasing), each row normalized to sum 1."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / filter_scale
        w = torch.where((x >= -3) & (x < 3), torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(x))
        weights[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return weights


def lanczos_resize_tensor(x: torch.Tensor, size: int, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """Lanczos resize of a [B, C, H, W] float tensor on its own device, as PIL resizes a float ("F") image:
    the horizontal pass, rounded to float32, then the vertical pass, each a product with ``lanczos_weights``.
    ``accumulate``: the passes' precision, float64 as PIL's, except on Apple's mps, which has no float64: float32
    there (within 1e-5 of PIL's)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    dtype = x.dtype
    accumulate = accumulate or (torch.float32 if x.device.type == "mps" else torch.float64)
    # built once per size pair (a Python loop over rows)
    wx = lanczos_weights(x.shape[-1], size).to(x.device, accumulate)
    wy = lanczos_weights(x.shape[-2], size).to(x.device, accumulate)
    rows = (x.to(accumulate) @ wx.T).float()  # [B, C, H, size]
    return (wy @ rows.to(accumulate)).float().to(dtype)  # [B, C, size, size]
