"""The emoji atlas: RGBA sprites of every named single-code-point emoji, built by ``scripts/build_atlas.py``."""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np
import torch
from PIL import Image

from ..errors import DyodError


class EmojiAtlas:
    def __init__(self, image: Image.Image, meta: dict):
        self.tile = int(meta["tile"])
        self.columns = int(meta["columns"])
        self.entries = meta["emoji"]
        self.names = [e["name"] for e in self.entries]
        self._index = {name: i for i, name in enumerate(self.names)}
        self._image = image.convert("RGBA")

    @classmethod
    @functools.cache
    def bundled(cls) -> "EmojiAtlas":
        assets = resources.files("dyod.world") / "assets"
        with (assets / "emoji_atlas.png").open("rb") as f:
            image = Image.open(f)
            image.load()
        meta = json.loads((assets / "emoji_atlas.json").read_text())
        return cls(image, meta)

    def __len__(self) -> int:
        return len(self.entries)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise DyodError(f"no emoji named {name!r} in the atlas") from None

    def sprite(self, index: int) -> Image.Image:
        """The RGBA tile of one emoji (tile × tile, content centred, aspect kept)."""
        r, c = divmod(index, self.columns)
        t = self.tile
        return self._image.crop((c * t, r * t, (c + 1) * t, (r + 1) * t))

    def sprite_at(self, index: int, size: int) -> Image.Image:
        sprite = self.sprite(index)
        if size != self.tile:
            sprite = sprite.convert("RGBa").resize((size, size), Image.Resampling.LANCZOS).convert("RGBA")
        return sprite

    @functools.cached_property
    def tensor(self) -> torch.Tensor:
        """All sprites as float RGBA in [0, 1]: [N, 4, tile, tile] (for batched augmentation)."""
        arr = np.asarray(self._image, dtype=np.float32) / 255.0
        t = self.tile
        tiles = [arr[(i // self.columns) * t : (i // self.columns + 1) * t, (i % self.columns) * t : (i % self.columns + 1) * t]
                 for i in range(len(self))]
        return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()

    def find(self, predicate) -> list[int]:
        return [i for i, name in enumerate(self.names) if predicate(name)]
