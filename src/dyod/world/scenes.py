"""The captioned scene corpus: a seeded, endless generator of small scenes of 1-3 emoji on a plain background,
each with an English caption built from the emoji names and the layout. The reference prior is pre-trained on it.

    "a large red apple on the left and a small tangerine at the top right on a white background"
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .atlas import EmojiAtlas

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (245, 220, 60),
    "green": (60, 160, 70),
    "blue": (50, 90, 200),
    "light blue": (160, 200, 240),
    "purple": (130, 60, 170),
    "pink": (245, 170, 200),
    "brown": (120, 80, 40),
    "beige": (235, 220, 190),
}

UNNAMED = "icon"  # how a caption names a sprite it is not told about (no emoji name holds the word)

# Pixel sizes at 64 px, scaled with the resolution.
SIZES: dict[str, int] = {"small": 16, "medium": 24, "large": 36}


@dataclasses.dataclass(frozen=True)
class Placement:
    emoji: int  # atlas index
    size: int  # sprite side in pixels
    x: int  # top-left corner
    y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclasses.dataclass(frozen=True)
class Scene:
    resolution: int
    background: str
    placements: tuple[Placement, ...]
    caption: str

    def render(self, atlas: EmojiAtlas | None = None) -> Image.Image:
        atlas = atlas or EmojiAtlas.bundled()
        canvas = Image.new("RGBA", (self.resolution, self.resolution), BACKGROUNDS[self.background] + (255,))
        for p in self.placements:
            canvas.alpha_composite(atlas.sprite_at(p.emoji, p.size), (p.x, p.y))
        return canvas.convert("RGB")

    def render_strokes(self, atlas: EmojiAtlas | None = None) -> Image.Image:
        """The scene as a person might paint it for image initialization (Eq. 11, the paper's Fig. 5): each emoji a
        flat disc of its mean colour filling most of its box, on the scene's background, without anti-aliasing (the
        image holds the background's colour and one colour per emoji, nothing else)."""
        atlas = atlas or EmojiAtlas.bundled()
        canvas = Image.new("RGB", (self.resolution, self.resolution), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(canvas)
        for p in self.placements:
            inset = p.size // 10  # emoji leave a margin in their tile
            draw.ellipse((p.x + inset, p.y + inset, p.x + p.size - 1 - inset, p.y + p.size - 1 - inset),
                         fill=mean_colour(atlas, p.emoji))
        return canvas


def mean_colour(atlas: EmojiAtlas, index: int) -> tuple[int, int, int]:
    """The emoji's colour on average over its opaque pixels (weighted by opacity)."""
    rgba = np.asarray(atlas.sprite(index), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    return tuple(int(round(c)) for c in (rgba[..., :3] * alpha).sum(axis=(0, 1)) / max(alpha.sum(), 1e-9))


def position_phrase(cx: float, cy: float, resolution: int) -> str:
    """Where a sprite's centre lies, in thirds of the canvas: "on the left", "at the top right", "in the center"."""
    h = ("left", "center", "right")[min(2, int(3 * cx / resolution))]
    v = ("top", "middle", "bottom")[min(2, int(3 * cy / resolution))]
    if v == "middle":
        return "in the center" if h == "center" else f"on the {h}"
    return f"at the {v}" if h == "center" else f"at the {v} {h}"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def describe(atlas: EmojiAtlas, placements: Sequence[Placement], size_names: Sequence[str | None], background: str,
             resolution: int, unnamed: frozenset[int] = frozenset()) -> str:
    parts = []
    for p, size_name in zip(placements, size_names):
        name = UNNAMED if p.emoji in unnamed else atlas.names[p.emoji]
        noun = f"{size_name} {name}" if size_name else name
        where = position_phrase(p.x + p.size / 2, p.y + p.size / 2, resolution)
        parts.append(f"{article(noun)} {noun} {where}")
    return " and ".join(parts) + f" on {article(background)} {background} background"


class SceneGenerator:
    """Scene ``i`` of seed ``s`` is always the same scene: ``scene(i)`` draws from ``default_rng([s, i])``.

    ``emphasis`` lists atlas indices drawn with probability ``emphasis_weight`` (the rest uniformly), so a small prior
    sees the emoji that the bundled datasets need often enough. ``size_range`` (sides at 64 px, both included) draws
    every sprite's side uniformly instead of the three named sizes: an autoencoder that learns from it draws emoji at
    every scale a user's images may hold (the caption names the nearest named size). ``unnamed`` lists emoji drawn with
    probability ``unnamed_share`` and captioned only as "icon": seen, never named."""

    def __init__(self, seed: int = 0, resolution: int = 64, atlas: EmojiAtlas | None = None, max_objects: int = 3,
                 emphasis: Sequence[int] = (), emphasis_weight: float = 0.0, vocabulary: Sequence[int] | None = None,
                 size_range: tuple[int, int] | None = None, unnamed: Sequence[int] = (), unnamed_share: float = 0.0):
        if size_range is not None and not 1 <= size_range[0] <= size_range[1] <= 64:
            raise ValueError(f"size_range must be (low, high) with 1 <= low <= high <= 64, got {size_range}")
        self.seed, self.resolution, self.max_objects, self.size_range = seed, resolution, max_objects, size_range
        self.atlas = atlas or EmojiAtlas.bundled()
        self.vocabulary = np.asarray(vocabulary if vocabulary is not None else range(len(self.atlas)))
        self.emphasis = np.asarray(emphasis, dtype=np.int64)
        self.emphasis_weight = emphasis_weight if len(self.emphasis) else 0.0
        self.unnamed = np.asarray(unnamed, dtype=np.int64)
        self.unnamed_share = unnamed_share if len(self.unnamed) else 0.0
        self._unnamed_set = frozenset(int(i) for i in self.unnamed)

    def _emoji(self, rng: np.random.Generator) -> int:
        if self.unnamed_share and rng.random() < self.unnamed_share:
            return int(rng.choice(self.unnamed))
        if self.emphasis_weight and rng.random() < self.emphasis_weight:
            return int(rng.choice(self.emphasis))
        return int(rng.choice(self.vocabulary))

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        res = self.resolution
        n = int(rng.integers(1, self.max_objects + 1))
        background = str(rng.choice(list(BACKGROUNDS)))
        placements: list[Placement] = []
        size_names: list[str | None] = []
        for _ in range(n):
            size_name = str(rng.choice(list(SIZES) if n == 1 else ["small", "medium"]))
            size = SIZES[size_name] * res // 64
            if self.size_range is not None:
                side = int(rng.integers(self.size_range[0], self.size_range[1] + 1))
                size_name = min(SIZES, key=lambda name: abs(SIZES[name] - side))
                size = max(1, side * res // 64)
            for _attempt in range(50):
                x, y = (int(v) for v in rng.integers(0, res - size + 1, size=2))
                candidate = Placement(self._emoji(rng), size, x, y)
                if not any(overlaps(candidate.box, p.box) for p in placements):
                    placements.append(candidate)
                    size_names.append(size_name)
                    break
        caption = describe(self.atlas, placements, size_names, background, res, self._unnamed_set)
        return Scene(res, background, tuple(placements), caption)

    def __iter__(self) -> Iterator[Scene]:
        i = 0
        while True:
            yield self.scene(i)
            i += 1
