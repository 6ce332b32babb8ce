"""The offline reference world: atlas, scene corpus, bundled datasets, feature network."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dyod.errors import DyodError
from dyod.world.atlas import EmojiAtlas
from dyod.world.datasets import DATASETS, dataset_scene, face_indices, fruit_indices, make_dataset
from dyod.world.scenes import BACKGROUNDS, SceneGenerator, position_phrase


@pytest.fixture(scope="module")
def atlas():
    return EmojiAtlas.bundled()


def test_atlas_round_trip(atlas):
    assert len(atlas) > 1300 and atlas.tile == 64
    apple = atlas.index("red apple")
    assert atlas.entries[apple]["codepoint"] == "U+1F34E" and atlas.entries[apple]["char"] == "\U0001F34E"
    sprite = np.asarray(atlas.sprite(apple))
    assert sprite.shape == (64, 64, 4) and sprite[..., 3].max() == 255 and sprite[0, 0, 3] == 0
    red = sprite[sprite[..., 3] > 200][:, :3].mean(0)
    assert red[0] > 150 and red[0] > 2 * red[1]  # it is red
    assert torch.equal(atlas.tensor[apple], torch.from_numpy(sprite / 255.0).float().permute(2, 0, 1))
    names = set(atlas.names)
    assert len(names) == len(atlas)  # names identify emoji
    with pytest.raises(DyodError, match="no emoji named"):
        atlas.index("flying spaghetti")


def test_scenes_are_deterministic_and_captions_name_what_is_drawn(atlas):
    a, b = SceneGenerator(seed=3), SceneGenerator(seed=3)
    for i in (0, 1, 17, 999):
        sa, sb = a.scene(i), b.scene(i)
        assert sa == sb and sa.render(atlas).tobytes() == sb.render(atlas).tobytes()
    assert SceneGenerator(seed=4).scene(0) != a.scene(0)
    for i in range(200):
        scene = a.scene(i)
        assert 1 <= len(scene.placements) <= 3
        for p in scene.placements:
            assert atlas.names[p.emoji] in scene.caption
            where = position_phrase(p.x + p.size / 2, p.y + p.size / 2, 64)
            assert f"{atlas.names[p.emoji]} {where}" in scene.caption
        assert scene.caption.endswith(f"{scene.background} background")
        image = np.asarray(scene.render(atlas))
        assert image.shape == (64, 64, 3)
        corner_free = all(not (p.x <= 0 and p.y <= 0) for p in scene.placements)
        if corner_free:
            assert tuple(image[0, 0]) == BACKGROUNDS[scene.background]


def test_position_phrases():
    assert position_phrase(5, 32, 64) == "on the left"
    assert position_phrase(60, 32, 64) == "on the right"
    assert position_phrase(32, 32, 64) == "in the center"
    assert position_phrase(32, 2, 64) == "at the top"
    assert position_phrase(60, 60, 64) == "at the bottom right"


def test_apple_orange_invariants(tmp_path, atlas):
    out = make_dataset("apple-orange", tmp_path / "ao", n=40, seed=1, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["n"] == 40 and meta["resolution"] == 64 and len(list(out.glob("*.png"))) == 40
    for record in meta["images"]:
        names = sorted(p["name"] for p in record["placements"])
        assert names == ["red apple", "tangerine"]
        (a, b) = [(p["x"], p["y"], p["x"] + p["size"], p["y"] + p["size"]) for p in record["placements"]]
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # no overlap
        image = np.asarray(Image.open(out / record["file"]))
        covered = np.zeros((64, 64), bool)
        for x0, y0, x1, y1 in (a, b):
            covered[y0:y1, x0:x1] = True
        assert (image[~covered] == 255).all()  # white background everywhere else
        assert (image[covered] < 200).any()
    again = make_dataset("apple-orange", tmp_path / "ao2", n=40, seed=1, progress=False)
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in ("00000.png", "00039.png"))
    with pytest.raises(DyodError, match="not empty"):
        make_dataset("apple-orange", out, n=2, progress=False)


def test_faces_and_fruit_stack_invariants(atlas):
    faces = set(face_indices(atlas))
    assert len(faces) > 80 and atlas.index("grinning face") in faces and atlas.index("crying cat face") not in faces
    for i in range(30):
        scene = dataset_scene("faces", i)
        (p,) = scene.placements
        assert p.emoji in faces and (p.x, p.y, p.size) == (10, 10, 44)
        stack = dataset_scene("fruit-stack", i)
        assert len(stack.placements) == 3 and all(q.emoji in fruit_indices(atlas) for q in stack.placements)
        xs = {q.x for q in stack.placements}
        assert len(xs) == 1  # one column
        ys = [q.y for q in stack.placements]
        assert ys == sorted(ys) and ys[1] - ys[0] == ys[2] - ys[1] == stack.placements[0].size  # touching, stacked
    with pytest.raises(DyodError, match="unknown dataset"):
        dataset_scene("lego", 0)
    assert set(DATASETS) == {"apple-orange", "faces", "fruit-stack"}


@pytest.mark.parametrize("name", list(DATASETS))
def test_strokes_paint_each_emoji_as_a_flat_disc_of_its_mean_colour_in_its_box(name, atlas):
    """Inputs for image initialization: the scene's background and one colour per emoji, nothing else; each disc
    inside its emoji's box and covering its centre; the colour the emoji's opacity-weighted mean."""
    from dyod.world.scenes import mean_colour

    scene = dataset_scene(name, 3, seed=1)
    pixels = np.asarray(scene.render_strokes(atlas))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    painted = {mean_colour(atlas, p.emoji) for p in scene.placements}
    assert colours == painted | {BACKGROUNDS[scene.background]}
    for p in scene.placements:
        is_colour = (pixels == mean_colour(atlas, p.emoji)).all(axis=-1)
        boxes = np.zeros(pixels.shape[:2], dtype=bool)  # every box of this emoji (fruit-stack may hold one twice)
        for q in scene.placements:
            if q.emoji == p.emoji:
                boxes[q.y:q.y + q.size, q.x:q.x + q.size] = True
        assert is_colour[p.y + p.size // 2, p.x + p.size // 2] and not (is_colour & ~boxes).any()
        # a disc in its box: pi/4 of it, less the margin
        assert 0.4 < is_colour[p.y:p.y + p.size, p.x:p.x + p.size].mean() < 0.8
    rgba = np.asarray(atlas.sprite(scene.placements[0].emoji), dtype=np.float64)
    expected = (rgba[..., :3] * rgba[..., 3:]).sum(axis=(0, 1)) / rgba[..., 3].sum()
    assert np.abs(np.array(mean_colour(atlas, scene.placements[0].emoji)) - expected).max() <= 0.5


def test_the_strokes_of_a_dataset_are_its_scenes_painted(tmp_path, atlas):
    from dyod.cli import main

    assert main(["datasets", "make", "apple-orange", str(tmp_path / "s"), "-n", "3", "--seed", "1", "--strokes"]) == 0
    record = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert record["strokes"] is True and [r["file"] for r in record["images"]] == ["00000.png", "00001.png", "00002.png"]
    for i in range(3):
        scene = dataset_scene("apple-orange", i, seed=1)
        assert record["images"][i]["caption"] == scene.caption
        assert Image.open(tmp_path / "s" / f"{i:05d}.png").tobytes() == scene.render_strokes(atlas).tobytes()


def test_feature_network_separates_emoji_better_than_pixels(atlas):
    from dyod.world.features import EmojiFeatures
    from dyod.world.scenes import Placement, Scene

    features = EmojiFeatures.bundled()
    rng = np.random.default_rng(2024)  # renders the network never saw: PIL/Lanczos, unseen seed
    classes = rng.choice(len(atlas), 40, replace=False)
    images, labels = [], []
    for k in classes:
        for _ in range(4):
            size = int(rng.integers(24, 52))
            x, y = (int(v) for v in rng.integers(0, 64 - size + 1, size=2))
            images.append(Scene(64, str(rng.choice(list(BACKGROUNDS))), (Placement(int(k), size, x, y),), "").render(atlas))
            labels.append(int(k))
    labels = np.array(labels)

    def nearest_neighbour_accuracy(x: np.ndarray) -> float:
        x = x - x.mean(0)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return float((labels[sim.argmax(1)] == labels).mean())

    from dyod.data import pil_to_tensor

    feat_acc = nearest_neighbour_accuracy(features(images).numpy())
    pixel_acc = nearest_neighbour_accuracy(pil_to_tensor(images).flatten(1).numpy())
    assert feat_acc > pixel_acc + 0.3, (feat_acc, pixel_acc)
    card = json.loads((features_card_path()).read_text())
    assert card["heldout_scene_renders"]["top1"] > 0.3


def features_card_path():
    from importlib import resources

    return resources.files("dyod.world") / "assets" / "emoji_features.json"


def test_unnamed_emoji_are_drawn_at_their_share_and_captioned_only_as_icons(atlas):
    """The UNet corpus' scenes: sprites from ``unnamed`` are seen, never named; with no share, scene i is unchanged."""
    from dyod.world.scenes import UNNAMED

    assert not any(UNNAMED in name.split() for name in atlas.names)  # the word names no emoji
    named, unnamed = list(range(0, len(atlas), 4)), list(range(1, len(atlas), 4))
    mixed = SceneGenerator(seed=5, atlas=atlas, vocabulary=named, unnamed=unnamed, unnamed_share=0.5)
    scenes = [mixed.scene(i) for i in range(600)]
    placements = [p for s in scenes for p in s.placements]
    outside = [p for p in placements if p.emoji in set(unnamed)]
    assert 0.4 < len(outside) / len(placements) < 0.6
    assert all(p.emoji in set(named) for p in placements if p not in outside)
    for s in scenes:
        hidden = [p for p in s.placements if p.emoji in set(unnamed)]
        assert f" {s.caption} ".count(f" {UNNAMED} ") == len(hidden), s.caption
        assert not any(atlas.names[p.emoji] in s.caption for p in hidden), s.caption
    plain = SceneGenerator(seed=5, atlas=atlas, vocabulary=named)
    for share, hidden in ((0.0, unnamed), (0.5, ())):
        same = SceneGenerator(seed=5, atlas=atlas, vocabulary=named, unnamed=hidden, unnamed_share=share)
        assert [same.scene(i) for i in range(50)] == [plain.scene(i) for i in range(50)]


def test_a_size_range_draws_every_side_in_it_and_leaves_the_named_sizes_alone(atlas):
    """The decoder refinement's scenes: sprite sides uniform in the range (captions name the nearest named size);
    without it, scene i of a seed is what it always was."""
    from dyod.world.scenes import SIZES

    ranged = SceneGenerator(seed=3, atlas=atlas, size_range=(12, 56))
    sides = [p.size for i in range(300) for p in ranged.scene(i).placements]
    assert min(sides) == 12 and max(sides) == 56 and len(set(sides)) > 30
    scene = next(ranged.scene(i) for i in range(300) if ranged.scene(i).placements[0].size == 44)
    assert " large " in f" {scene.caption} "
    named = SceneGenerator(seed=3, atlas=atlas)
    assert {p.size for i in range(300) for p in named.scene(i).placements} == set(SIZES.values())
    with pytest.raises(ValueError, match="size_range"):
        SceneGenerator(seed=3, atlas=atlas, size_range=(40, 20))
