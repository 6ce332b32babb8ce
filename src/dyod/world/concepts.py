"""What the reference prior learns from: the concept set its captions name, and the scene corpora drawn from it.

The concept set is every ``stride``-th emoji of the atlas in code-point order. The atlas is sorted by code point and
Unicode allocates each group (faces, people, animals, food, travel, activities, objects, symbols) in contiguous runs,
so an even stride takes about the same share of every group, whatever the bundled datasets hold. The autoencoder
learns from scenes of every emoji (it must draw what the UNet is never told about); the UNet sees every emoji too, but
its captions name the concept set alone (the others are each an "icon")."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import PretrainConfig
from .atlas import EmojiAtlas
from .datasets import face_indices, fruit_indices
from .scenes import SceneGenerator

SINGLE_EMOJI_PROMPT = "a large {} in the center on a white background"
HELDOUT_SEED = 10_000  # scenes of this seed and the next are never trained on


def concept_set(atlas: EmojiAtlas, stride: int) -> list[int]:
    """The emoji the UNet's captions name: every ``stride``-th in code-point order, an even share of every group."""
    return list(range(0, len(atlas), stride))


def outside_concepts(atlas: EmojiAtlas, stride: int) -> list[int]:
    concepts = set(concept_set(atlas, stride))
    return [i for i in range(len(atlas)) if i not in concepts]


def _emphasis(config: PretrainConfig, atlas: EmojiAtlas) -> dict:
    if not config.emphasis_weight:
        return {}
    return {"emphasis": fruit_indices(atlas) + face_indices(atlas), "emphasis_weight": config.emphasis_weight}


def concept_corpus(config: PretrainConfig, seed: int | None = None, **scene_options) -> SceneGenerator:
    """Scenes whose captions name the concept set alone (``scene_options``: more of SceneGenerator's)."""
    atlas = EmojiAtlas.bundled()
    return SceneGenerator(seed=config.corpus_seed if seed is None else seed, resolution=config.resolution, atlas=atlas,
                          vocabulary=concept_set(atlas, config.concept_stride), **scene_options,
                          **_emphasis(config, atlas))


def unet_corpus(config: PretrainConfig, seed: int | None = None) -> SceneGenerator:
    """What the UNet and the text encoder learn from: scenes whose sprites come from outside the concept set with
    probability ``unnamed_share``, captioned only as "icon" (seen, never named: SD, too, saw far more than its
    captions name), at every side in ``corpus_sizes``; the captions name the concept set alone."""
    return concept_corpus(config, seed, unnamed=outside_concepts(EmojiAtlas.bundled(), config.concept_stride),
                          unnamed_share=config.unnamed_share, size_range=tuple(config.corpus_sizes) or None)


def atlas_corpus(config: PretrainConfig, seed: int | None = None, vocabulary: Sequence[int] | None = None,
                 size_range: tuple[int, int] | None = None) -> SceneGenerator:
    """Scenes of every emoji of the atlas (or of ``vocabulary``): what the autoencoder learns to draw; with
    ``size_range``, at every sprite side in it rather than the three named sizes."""
    atlas = EmojiAtlas.bundled()
    return SceneGenerator(seed=config.corpus_seed + 1 if seed is None else seed, resolution=config.resolution,
                          atlas=atlas, vocabulary=vocabulary, size_range=size_range, **_emphasis(config, atlas))


def heldout_corpora(config: PretrainConfig) -> dict[str, SceneGenerator]:
    """Scenes never trained on: of the concept set (in-set), and of the emoji outside it alone (out-of-set)."""
    atlas = EmojiAtlas.bundled()
    return {"in_set": concept_corpus(config, seed=HELDOUT_SEED),
            "out_of_set": atlas_corpus(config, seed=HELDOUT_SEED + 1,
                                       vocabulary=outside_concepts(atlas, config.concept_stride))}


def render_scenes(gen: SceneGenerator, indices, progress: bool = False,
                  desc: str = "rendering") -> tuple[torch.Tensor, list[str]]:
    """Scenes ``indices`` of ``gen`` as uint8 [N, 3, H, W] and their captions."""
    indices = list(indices)
    res = gen.resolution
    images = np.empty((len(indices), res, res, 3), dtype=np.uint8)
    captions = []
    for k, i in enumerate(tqdm(indices, disable=not progress, desc=desc)):
        scene = gen.scene(i)
        images[k] = np.asarray(scene.render(gen.atlas))
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2), captions


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1
