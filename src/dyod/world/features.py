"""A small CNN that names emoji; its penultimate features are what offline KID compares (the role Inception plays
for photographs). Trained on atlas sprites under augmentation: scale, shift, background colour, other sprites
behind, blur and noise, so that it responds to *which* emoji are present rather than to pixels.

    dyod world train-features [--steps 6000]       # writes assets/emoji_features.safetensors + .json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import DyodError
from .atlas import EmojiAtlas

FEATURES_FILE = "emoji_features.safetensors"
INPUT_SIZE = 64


class EmojiFeatureNet(nn.Module):
    def __init__(self, num_classes: int, widths=(32, 64, 128, 256), feature_dim: int = 256):
        super().__init__()
        # stride-2 stem: 64 -> 32, then one stride-2 block per remaining width, down to 4 x 4
        layers, c = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"num_classes": num_classes, "widths": list(widths), "feature_dim": feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] of images in [-1, 1] at 64 × 64."""
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _place(sprites: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, size: int) -> torch.Tensor:
    """Put RGBA sprites at ``scale`` (fraction of the canvas) and centre ``shift`` (in [-1, 1]) on a size² canvas."""
    b = sprites.shape[0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta, (b, 4, size, size), align_corners=False)
    return F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmented_batch(atlas_rgba: torch.Tensor, batch_size: int, generator: torch.Generator, size: int = INPUT_SIZE,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random renders of random emoji: [B, 3, size, size] in [-1, 1] and their atlas indices."""
    n = atlas_rgba.shape[0]
    g = generator
    labels = torch.randint(n, (batch_size,), generator=g) if labels is None else labels
    b = len(labels)
    background = torch.rand(b, 3, 1, 1, generator=g)
    plain = torch.rand(b, 1, 1, 1, generator=g) < 0.3  # white or black backgrounds are common in the datasets
    background = torch.where(plain, (torch.rand(b, 1, 1, 1, generator=g) < 0.7).float().expand(-1, 3, -1, -1), background)
    canvas = background.expand(-1, -1, size, size).clone()
    # up to two smaller distractors behind the named emoji
    for _ in range(2):
        use = torch.rand(b, generator=g) < 0.35
        other = _place(atlas_rgba[torch.randint(n, (b,), generator=g)], 0.15 + 0.25 * torch.rand(b, generator=g),
                       torch.rand(b, 2, generator=g) * 1.6 - 0.8, size)
        alpha = other[:, 3:] * use.view(-1, 1, 1, 1)
        canvas = canvas * (1 - alpha) + other[:, :3] * alpha
    scale = 0.25 + 0.65 * torch.rand(b, generator=g)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - scale[:, None]) * 0.9
    main = _place(atlas_rgba[labels], scale, shift, size)
    canvas = canvas * (1 - main[:, 3:]) + main[:, :3] * main[:, 3:]
    blur = torch.rand(b, generator=g) < 0.3  # generated samples are softer than renders
    soft = F.interpolate(F.avg_pool2d(canvas, 2), size=size, mode="bilinear", align_corners=False)
    canvas = torch.where(blur.view(-1, 1, 1, 1), soft, canvas)
    canvas = canvas + torch.randn(canvas.shape, generator=g) * 0.04 * torch.rand(b, 1, 1, 1, generator=g)
    return canvas.clamp(0, 1) * 2 - 1, labels


@dataclasses.dataclass(frozen=True)
class FeatureTrainConfig:
    steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0


def to_input(images) -> torch.Tensor:
    """PIL images (of any sizes) or a [B, 3, H, W] tensor in [-1, 1] -> the network's 64 × 64 input."""
    if not isinstance(images, torch.Tensor):
        from ..data import pil_to_resized_tensor

        return pil_to_resized_tensor(images, to_input)
    if images.shape[-1] != INPUT_SIZE or images.shape[-2] != INPUT_SIZE:
        images = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.float()


@torch.no_grad()
def evaluate(model: EmojiFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict:
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size])
        top = logits.topk(5, dim=1).indices
        y = labels[i : i + batch_size, None]
        top1 += (top[:, :1] == y).any(1).sum().item()
        top5 += (top == y).any(1).sum().item()
    return {"top1": top1 / len(images), "top5": top5 / len(images), "n": len(images)}


def heldout_scenes(n_per_class: int = 2, seed: int = 12345):
    """Held-out renders through the scene renderer (PIL, Lanczos): one emoji at a random size/place/background."""
    from .scenes import BACKGROUNDS, Placement, Scene

    atlas = EmojiAtlas.bundled()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(len(atlas)):
        for _ in range(n_per_class):
            size = int(rng.integers(20, 56))
            x, y = (int(v) for v in rng.integers(0, 64 - size + 1, size=2))
            scene = Scene(64, str(rng.choice(list(BACKGROUNDS))), (Placement(k, size, x, y),), "")
            images.append(scene.render(atlas))
            labels.append(k)
    return to_input(images), torch.tensor(labels)


def train_feature_net(out: str | os.PathLike | None = None, config: FeatureTrainConfig = FeatureTrainConfig(),
                      progress: bool = True) -> dict:
    """Train the feature network on augmented atlas sprites; write weights and a JSON card; return the card."""
    torch.manual_seed(config.seed)
    atlas = EmojiAtlas.bundled()
    sprites = atlas.tensor
    model = EmojiFeatureNet(len(atlas))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()
    bar = tqdm(range(config.steps), disable=not progress, desc="feature net")
    model.train()
    for step in bar:
        x, y = augmented_batch(sprites, config.batch_size, generator)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - started
    x_aug, y_aug = augmented_batch(sprites, 4096, torch.Generator().manual_seed(config.seed + 99))
    x_scene, y_scene = heldout_scenes()
    card = {
        "num_classes": len(atlas),
        "config": dataclasses.asdict(config),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "heldout_augmented": evaluate(model, x_aug, y_aug),
        "heldout_scene_renders": evaluate(model, x_scene, y_scene),
        "command": f"dyod world train-features --steps {config.steps} --batch-size {config.batch_size}",
    }
    out = Path(out) if out else Path(str(resources.files("dyod.world") / "assets"))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / FEATURES_FILE), metadata={"config": json.dumps(model.config)})
    (out / "emoji_features.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


class EmojiFeatures:
    """Offline KID features: ``features(images) -> [N, 256]`` from the bundled emoji network."""

    name = "emoji"

    def __init__(self, model: EmojiFeatureNet, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    @functools.cache
    def bundled(cls, device: str = "cpu") -> "EmojiFeatures":
        path = resources.files("dyod.world") / "assets" / FEATURES_FILE
        if not path.is_file():
            raise DyodError(f"the bundled feature network {path} is missing; run `dyod world train-features`")
        return cls.load(Path(str(path)), device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "EmojiFeatures":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        model = EmojiFeatureNet(**config)
        model.load_state_dict(load_file(str(path)))
        return cls(model, device)

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 256) -> torch.Tensor:
        x = to_input(images)
        out = [self.model.features(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).double()

    @torch.no_grad()
    def predict(self, images, k: int = 5) -> torch.Tensor:
        x = to_input(images).to(self.device)
        return self.model(x).topk(k, dim=1).indices.cpu()
