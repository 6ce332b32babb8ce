"""Kernel Inception Distance (Bińkowski et al., 2018) as three pure functions, apart from the feature extractors.

KID = unbiased MMD² between feature sets with the polynomial kernel k(x, y) = (γ·xᵀy + 1)³, γ = 1/d, averaged
over random subsets (the torchmetrics / torch-fidelity definition). dyod reports KID × 100."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .errors import DyodError

logger = logging.getLogger(__name__)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> torch.Tensor:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def squared_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² estimate between equally sized sets (the diagonals of k_xx and k_yy are left out)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / m**2


@dataclasses.dataclass(frozen=True)
class KIDResult:
    mean: float  # KID (not × 100)
    std: float
    subset_size: int
    num_subsets: int
    n_x: int
    n_y: int

    @property
    def mean_x100(self) -> float:
        return 100 * self.mean

    @property
    def std_x100(self) -> float:
        return 100 * self.std

    def __str__(self) -> str:
        if self.subset_size == self.n_x == self.n_y:
            # every subset is both sets whole: a spread of 0 would read as a certainty the estimate does not have
            return (f"KID×100 = {self.mean_x100:.3f} (n = {self.n_x} vs {self.n_y}, both sets whole: no spread over "
                    "subsets to report; more images in either set give one)")
        return (f"KID×100 = {self.mean_x100:.3f} ± {self.std_x100:.3f} "
                f"(n = {self.n_x} vs {self.n_y}, {self.num_subsets} subsets of {self.subset_size})")


def choose_subset_size(n_x: int, n_y: int, preferred: int = 1000) -> int:
    """torchmetrics' default is 1000, which small datasets (the paper's Nike-shoes has ~200) cannot meet: use the
    smaller set's size when it is below that."""
    size = min(preferred, n_x, n_y)
    if size < 2:
        raise DyodError(f"KID needs at least 2 samples in each set, got {n_x} and {n_y}")
    return size


def kid(x: torch.Tensor, y: torch.Tensor, subset_size: int | None = None, num_subsets: int = 100, seed: int = 0) -> KIDResult:
    """KID between feature sets x [n_x, d] and y [n_y, d]: mean and (population) std over random subsets."""
    x, y = x.double(), y.double()
    subset_size = subset_size or choose_subset_size(len(x), len(y))
    if subset_size > min(len(x), len(y)):
        raise DyodError(f"KID subset size {subset_size} exceeds the sets' sizes ({len(x)}, {len(y)})")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.stack([
        squared_mmd(x[torch.randperm(len(x), generator=generator)[:subset_size]],
                    y[torch.randperm(len(y), generator=generator)[:subset_size]])
        for _ in range(num_subsets)
    ])
    return KIDResult(float(scores.mean()), float(scores.std(unbiased=False)) if num_subsets > 1 else 0.0,
                     subset_size, num_subsets, len(x), len(y))


# -- feature extraction for folders, cached ---------------------------------------------------------------------------
def feature_extractor(name: str = "emoji", inception_weights: str | None = None, device: str = "cpu"):
    """``emoji``: the bundled emoji network (offline default); ``inception``: FID InceptionV3 from a local file."""
    if name == "emoji":
        from .world.features import EmojiFeatures

        return EmojiFeatures.bundled(device)
    if name == "inception":
        from .inception import WEIGHTS_NAME, InceptionFeatures

        if inception_weights is None:
            import os

            default = os.path.expanduser(f"~/.cache/torch/hub/checkpoints/{WEIGHTS_NAME}")
            inception_weights = default
        return InceptionFeatures(inception_weights, device)
    raise DyodError(f"--features must be emoji or inception, got {name!r}")


def extractor_key(extractor) -> str:
    """The extractor's name and a digest of its weights: features cached under one Inception file (or one emoji
    network, which `dyod world train-features` can replace) are not another's."""
    key = getattr(extractor, "_cache_key", None)
    if key is None:
        import hashlib

        digest = hashlib.sha1()
        for name, tensor in sorted(extractor.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        key = extractor._cache_key = f"{extractor.name}-{digest.hexdigest()[:16]}"
    return key


def folder_features(folder, extractor, cache_dir=None, files=None) -> tuple[torch.Tensor, dict]:
    """Features of every readable image in ``folder`` (``files``: its images as ``dataset_files`` lists them, when the
    caller has listed them already), cached by (extractor, file names, sizes, mtimes)."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from .data import dataset_files, files_fingerprint, image_features

    files = dataset_files(folder) if files is None else files
    cache_dir = Path(cache_dir or os.environ.get("DYOD_CACHE", Path.home() / ".cache" / "dyod")) / "features"
    key = files_fingerprint(files, extractor_key(extractor))
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["features"], {"cached": True, "n": len(files)}
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is computed again
            logger.warning("the cached features %s cannot be read (%s); computing them again", path, e)
    feats, skipped = image_features(folder, files, extractor)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": feats.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return feats, {"cached": False, "n": len(feats), "skipped": len(skipped)}
