"""Bundled custom datasets made from the atlas, each an analogue of one of the paper's datasets. What defines each
is what a text prompt cannot pin down: count, layout, size and background.

=============  ==========  ===========  ===============================================================
name           resolution  default n    what it is
=============  ==========  ===========  ===============================================================
apple-orange   64 × 64     2000         a red apple and a tangerine (24 px) at random, not overlapping,
                                        on white: the paper's own construction of Apple-orange
faces          64 × 64     1000         one smiley face (44 px), centred, on white (cf. Lego-face)
fruit-stack    64 × 64     1000         exactly three fruits (18 px) stacked in a centred column, on
                                        beige: geometry is the defining trait
=============  ==========  ===========  ===============================================================
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import read_json, write_json
from ..errors import DyodError
from ..run import check_output_folder
from .atlas import EmojiAtlas
from .scenes import Placement, Scene, describe, overlaps

FACE_BLOCKS = (range(0x1F600, 0x1F650), range(0x1F910, 0x1F930), range(0x1F970, 0x1F980))
FRUITS = ("red apple", "green apple", "tangerine", "lemon", "banana", "pear", "peach", "cherries", "strawberry",
          "grapes", "watermelon", "kiwifruit", "mango", "blueberries", "pineapple", "melon", "coconut")


def face_indices(atlas: EmojiAtlas) -> list[int]:
    """Smiley faces: names with "face" in the emoticon blocks, without cat faces, people and gestures."""
    excluded = ("cat face", "person", "face palm", "gesture", "monkey")
    keep = []
    for i, e in enumerate(atlas.entries):
        cp = int(e["codepoint"][2:], 16)
        if any(cp in block for block in FACE_BLOCKS) and "face" in e["name"] \
                and not any(word in e["name"] for word in excluded):
            keep.append(i)
    return keep


def fruit_indices(atlas: EmojiAtlas) -> list[int]:
    return [atlas.index(name) for name in FRUITS]


def _apple_orange(rng: np.random.Generator, atlas: EmojiAtlas, res: int) -> Scene:
    size = 24 * res // 64
    while True:  # draw the pair jointly: an apple near the centre can leave no room for the orange
        x1, y1, x2, y2 = (int(v) for v in rng.integers(0, res - size + 1, size=4))
        placements = [Placement(atlas.index("red apple"), size, x1, y1), Placement(atlas.index("tangerine"), size, x2, y2)]
        if not overlaps(placements[0].box, placements[1].box):
            break
    return Scene(res, "white", tuple(placements), describe(atlas, placements, [None, None], "white", res))


def _faces(rng: np.random.Generator, atlas: EmojiAtlas, res: int) -> Scene:
    size = 44 * res // 64
    offset = (res - size) // 2
    p = Placement(int(rng.choice(face_indices(atlas))), size, offset, offset)
    return Scene(res, "white", (p,), describe(atlas, [p], ["large"], "white", res))


def _fruit_stack(rng: np.random.Generator, atlas: EmojiAtlas, res: int) -> Scene:
    size = 18 * res // 64
    top = (res - 3 * size) // 2
    x = (res - size) // 2
    fruits = rng.choice(fruit_indices(atlas), size=3)
    placements = tuple(Placement(int(f), size, x, top + k * size) for k, f in enumerate(fruits))
    caption = "a stack of " + ", ".join(atlas.names[p.emoji] for p in placements) + " on a beige background"
    return Scene(res, "beige", placements, caption)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    default_n: int
    resolution: int
    make_scene: Callable[[np.random.Generator, EmojiAtlas, int], Scene]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("apple-orange", 2000, 64, _apple_orange,
                    "a red apple and a tangerine at random places, not overlapping, on white"),
        DatasetSpec("faces", 1000, 64, _faces, "one smiley face, centred, at a fixed size, on white"),
        DatasetSpec("fruit-stack", 1000, 64, _fruit_stack, "exactly three fruits stacked in a centred column, on beige"),
    )
}


def dataset_scene(name: str, index: int, seed: int = 0) -> Scene:
    spec = _spec(name)
    return spec.make_scene(np.random.default_rng([seed, index]), EmojiAtlas.bundled(), spec.resolution)


def dataset_images(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images of dataset ``name`` as uint8 [n, 3, H, W], as ``make_dataset`` writes them."""
    atlas = EmojiAtlas.bundled()
    return torch.from_numpy(np.stack([np.asarray(dataset_scene(name, i, seed).render(atlas))
                                      for i in range(n)])).permute(0, 3, 1, 2)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DyodError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def make_dataset(name: str, out: str | os.PathLike, n: int | None = None, seed: int = 0, overwrite: bool = False,
                 progress: bool = True, strokes: bool = False) -> Path:
    """Write ``n`` PNG images of dataset ``name`` and ``dataset.json`` (captions and placements) to ``out``.
    ``strokes``: each scene painted as flat discs (``Scene.render_strokes``), inputs for image initialization; with
    another ``seed`` than the dataset's, scenes the dataset does not hold."""
    spec = _spec(name)
    n = spec.default_n if n is None else n
    if n < 1:
        raise DyodError(f"--n must be >= 1, got {n}")
    out = check_output_folder(out, overwrite, "dataset folder", flag="folder")
    if overwrite and (out / "dataset.json").exists():
        # the images an earlier, larger dataset left past the new n would otherwise stay and be trained on
        for record in read_json(out / "dataset.json").get("images", []):
            (out / Path(record["file"]).name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atlas = EmojiAtlas.bundled()
    records = []
    for i in tqdm(range(n), disable=not progress, desc=name, leave=False):
        scene = dataset_scene(name, i, seed)
        file = f"{i:05d}.png"
        (scene.render_strokes(atlas) if strokes else scene.render(atlas)).save(out / file)
        records.append({"file": file, "caption": scene.caption, "background": scene.background,
                        "placements": [dataclasses.asdict(p) | {"name": atlas.names[p.emoji]} for p in scene.placements]})
    write_json(out / "dataset.json", {"name": name, "n": n, "seed": seed, "strokes": strokes, "resolution": spec.resolution,
                                      "description": spec.description, "images": records})
    return out
