"""Image grids, strips and PNG output."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image

from .errors import write_atomically


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile equally sized images row by row (ncols defaults to a near-square grid)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def labeled_rows(rows: list[tuple[str, list[Image.Image]]], label_width: int = 150, pad: int = 2) -> Image.Image:
    """A row of equally sized images per label, the label written at the left: figures that say what each row is."""
    from PIL import ImageDraw

    strips = [make_grid(images, len(images), pad) for _, images in rows]
    width, height = label_width + max(s.width for s in strips), sum(s.height for s in strips)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, _), strip in zip(rows, strips):
        canvas.paste(strip, (label_width, y))
        draw.text((4, y + strip.height // 2 - 6), label, fill=(0, 0, 0))
        y += strip.height
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Save a PNG atomically (temporary file, then rename), with ``text`` as tEXt chunks (what made the image)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), "image")
    return path


def save_images(images: list[Image.Image], folder: str | os.PathLike, names: list[str],
                texts: list[dict[str, str]] | None = None) -> list[Path]:
    texts = texts or [None] * len(images)
    return [save_png(im, Path(folder) / name, text) for im, name, text in zip(images, names, texts)]
