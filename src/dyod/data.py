"""A folder of images as a dataset: recursive search, EXIF orientation, RGB or grayscale, held-out splits, skipped
files with their reasons. Colour profiles are ``dyod.colour``'s, resizing and tensors ``dyod.resizing``'s.

A file that cannot be read is skipped and recorded with its reason; it never stops a run."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .colour import deep_gray_to_8_bits, to_srgb
from .errors import DyodError
from .resizing import (  # noqa: F401 - re-exported: where the pixels of a dataset come from
    center_crop_square,
    lanczos_resize_tensor,
    lanczos_weights,
    pil_to_resized_tensor,
    pil_to_tensor,
    pil_to_uint8,
    resize_lanczos,
    tensor_to_pil,
    to_unit_range,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")
# Photos Pillow does not decode: iPhones' HEIC, JPEG XL, camera raw files, Photoshop and vector files. Left out of the
# data, and said so: silently, a folder of iPhone photos and a few JPEGs trained on the JPEGs alone.
UNREAD_IMAGE_SUFFIXES = (".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
                         ".psd", ".svg")
OUTPUT_RECORD = "dyod_output.json"  # beside the images `dyod sample|transform|interpolate|traverse` write
RUN_FILE = "run.json"  # in every run folder (``dyod.run``), with the dyod version that made it
# Raised when ``load_image`` gives some files other pixels than before (2: colour profiles converted to sRGB; 3: also
# those of palette and gray-with-alpha images), so that latents and features cached from the old pixels are computed
# again.
PIXELS_VERSION = 3


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def dataset_resolution(sizes: list[tuple[int, int]]) -> int:
    """A dataset's own resolution: the shorter side of its most common image size."""
    (w, h), _ = collections.Counter(sizes).most_common(1)[0]
    return min(w, h)


@dataclasses.dataclass
class ImageFolder:
    """The readable images of a folder, loaded as RGB PIL images (grayscale ones replicated to 3 channels), at their
    own sizes or, when loaded with a ``size``, centre-cropped and resized to it."""

    root: Path
    images: list[Image.Image]
    paths: list[Path]
    skipped: list[SkippedFile]
    sizes: list[tuple[int, int]]  # each image's own size, as read
    size: int | None = None  # the side every image was resized to, if any

    @property
    def resolution(self) -> int:
        """The dataset's own resolution: the shorter side of its most common image size."""
        return dataset_resolution(self.sizes)

    def stats(self) -> dict:
        sizes = collections.Counter(f"{w}x{h}" for w, h in self.sizes)
        return {
            "root": str(self.root.resolve()),
            "num_images": len(self.paths),
            "resolution": self.resolution,
            "sizes": dict(sizes.most_common(10)),
            "num_skipped": len(self.skipped),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }

    def __len__(self) -> int:
        return len(self.paths)


def find_image_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise DyodError(f"{root} does not exist; give a folder of images (searched recursively) or an image file")
    if root.is_file():
        return [root]
    if _is_run_record(root / RUN_FILE):
        raise DyodError(_run_folder_is_not_data(root))
    found = _files_under(root)
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    unread = sorted(p for p in found if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES and not _is_hidden(p, root))
    if unread:
        kinds = ", ".join(sorted({p.suffix.lower() for p in unread}))
        example = unread[0].relative_to(root)
        note = (f"{len(unread)} image file(s) of a kind dyod does not read ({kinds}; e.g. {example})"
                "; convert them to JPEG or PNG to use them (e.g. `magick mogrify -format jpg *.heic`)")
        if not files:
            raise DyodError(f"no image file dyod reads in {root}: it holds {note}")
        _warn_once(f"{root}: left out {note}")
    # Hidden files and folders are not the data (thumbnail caches such as .thumbnails/, macOS's ._name AppleDouble
    # files beside each image copied from a Mac), as Hugging Face's imagefolder also leaves them out.
    hidden = {f for f in files if _is_hidden(f, root)}
    if hidden:
        logger.info("%s: left out %d hidden image file(s), whose name or folder starts with '.' (e.g. %s)", root,
                    len(hidden), min(hidden).relative_to(root))
        files = [f for f in files if f not in hidden]
    # A folder dyod wrote results to also holds their grid: `dyod eval` of it, or a dataset made of it, would count
    # the grid as one more image. A run folder inside the data folder (`--out DATA/run`) holds only dyod's grids.
    results = {folder: _result_images(folder) for folder in {f.parent for f in files}}
    kept = [f for f in files if results[f.parent] is None or f.name in results[f.parent]]
    runs = [p.parent for p in found if p.name == RUN_FILE and p.parent != root and _is_run_record(p)]
    kept = [f for f in kept if not any(run in f.parents for run in runs)]
    if len(kept) < len(files):
        logger.info("%s: left out %d image(s) that dyod wrote: the grids beside its results (%s lists the results) "
                    "and what run folders inside it hold", root, len(files) - len(kept), OUTPUT_RECORD)
    return kept


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """A warning about the data, once per process: `dyod fit` lists the folder for each of its stages."""
    logger.warning("%s", message)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, through folders that are symbolic links too (a dataset assembled from links to
    folders elsewhere; pathlib's rglob does not enter them), each real folder once (a link to a parent ends there)."""
    seen, files = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()  # which of two links to one folder is kept: the first by name, on every machine
        files.extend(Path(folder) / name for name in names)
    return [f for f in files if f.is_file()]


def _run_folder_is_not_data(root: Path) -> str:
    """A run folder given where images are wanted (``eval --ref RUN``): it holds only dyod's grids, and the folder
    meant is most likely the dataset the run was trained on, which it records."""
    try:
        trained_on = json.loads((root / "data.json").read_text()).get("root")
    except (OSError, ValueError, AttributeError):
        trained_on = None
    hint = f" (the run was trained on {trained_on})" if trained_on else ""
    return (f"{root} is a dyod run folder ({RUN_FILE}), not a folder of images: the images in it are dyod's sample "
            f"grids. Give a folder of images{hint}")


def _is_run_record(path: Path) -> bool:
    try:
        return "dyod_version" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _result_images(folder: Path) -> set[str] | None:
    """The names of the result images in a folder dyod wrote results to; None for any other folder."""
    record = folder / OUTPUT_RECORD
    if not record.is_file():
        return None
    try:
        names = json.loads(record.read_text()).get("images")
    except (OSError, ValueError, AttributeError):
        names = None
    if not isinstance(names, list):  # a record written before it listed the images: everything but the grid
        return {p.name for p in folder.iterdir()} - {"grid.png"}
    return set(map(str, names))


@contextlib.contextmanager
def _open_image(path: str | os.PathLike):
    # Pillow warns above Image.MAX_IMAGE_PIXELS (89 MP) and refuses twice that as a decompression bomb. A 108-MP phone
    # photo is a photo: only the refusal stands (images are decoded one at a time and resized as they are read).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            yield im


def load_image(path: str | os.PathLike, grayscale: bool = False) -> Image.Image:
    """Open an image, apply its EXIF orientation and colour profile, flatten transparency on white, return RGB (or L
    as RGB).

    Raises ``ValueError``/``OSError`` (with PIL's reason) when the file cannot be decoded."""
    with _open_image(path) as im:
        im.seek(0)  # first frame of an animation
        im.load()
        im = ImageOps.exif_transpose(im)
    im = to_srgb(im, path)
    if im.width < 1 or im.height < 1:
        raise ValueError("image has no pixels")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = Image.fromarray(deep_gray_to_8_bits(np.asarray(im, dtype=np.float64), im.mode), "L")
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("L" if grayscale else "RGB")
    return im.convert("RGB")


def is_heldout(path: Path, root: Path, fraction: float) -> bool:
    """A stable split: a file is held out when the hash of its path (relative to the data folder) is < fraction."""
    import hashlib

    if fraction <= 0:
        return False
    rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """An image's size as ``load_image`` gives it (EXIF rotation applied), read from its header alone."""
    with _open_image(path) as im:
        w, h = im.size
        if im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # a quarter turn: the sides swap
            w, h = h, w
    return w, h


def dataset_files(root: str | os.PathLike, holdout_fraction: float = 0.0, split: str = "train") -> list[Path]:
    """The image files under ``root`` (see ``find_image_files``); with ``holdout_fraction`` > 0, ``split`` picks the
    training files ("train"), the held-out ones ("heldout"), or both ("all"). An empty selection is an error."""
    root = Path(root)
    if not 0.0 <= holdout_fraction < 1.0:
        raise DyodError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    files = find_image_files(root)
    if holdout_fraction > 0 and split != "all":
        files = [f for f in files if is_heldout(f, root, holdout_fraction) == (split == "heldout")]
        if not files:
            raise DyodError(f"the {split} split of {root} (held-out fraction {holdout_fraction}) is empty; "
                            "use more images or another --holdout-fraction")
    if not files:
        raise DyodError(
            f"no image files found in {root} (searched recursively for {', '.join(IMAGE_SUFFIXES)}); "
            "point DATA_DIR at a folder of images"
        )
    return files


def read_images(root: str | os.PathLike, files: list[Path], grayscale: bool = False, max_images: int = 0,
                size: int | None = None, allow_empty: bool = False) -> ImageFolder:
    """Read ``files`` (found under ``root``); unreadable ones are skipped and listed with their reason. With ``size``,
    each image is centre-cropped and resized to size × size with Lanczos as soon as it is read (``resize_lanczos``,
    what the stages that take ``size`` do with it anyway), so a folder of large photos is never held at full size."""
    folder = ImageFolder(root=Path(root), images=[], paths=[], skipped=[], sizes=[], size=size)
    folder.images.extend(iter_images(folder, files, grayscale, max_images))
    if not folder.images and not allow_empty:
        raise nothing_readable(folder.root, files, folder.skipped)
    return folder


def iter_images(folder: ImageFolder, files: list[Path], grayscale: bool = False,
                max_images: int = 0) -> Iterator[Image.Image]:
    """The readable images among ``files``, one at a time as they are read (at ``folder.size`` when it is set), for a
    stage that holds none of them: each one's path and size, and each skipped file with its reason, are recorded in
    ``folder`` (whose ``images`` stays as it is)."""
    for path in files:
        if max_images and len(folder.paths) >= max_images:
            break
        try:
            image = load_image(path, grayscale=grayscale)
        except Exception as e:  # noqa: BLE001 - any decoder failure skips the file; the run goes on
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if Path(path).suffix.lower() in UNREAD_IMAGE_SUFFIXES:  # a file given by name: `dyod transform x.heic`
                reason = f"a {Path(path).suffix.lower()} file, which dyod does not read: convert it to JPEG or PNG"
            folder.skipped.append(SkippedFile(str(path), reason))
            logger.warning("skipping %s (%s)", path, reason)
            continue
        folder.sizes.append(image.size)
        folder.paths.append(path)
        yield image if folder.size is None else resize_lanczos(image, folder.size)


def files_fingerprint(files: list[Path], *extra: str) -> str:
    """A key that changes when any of ``files`` is added, removed, replaced or touched (names, sizes, times), or when
    ``load_image`` reads the same file into other pixels (``PIXELS_VERSION``)."""
    import hashlib

    h = hashlib.sha1("|".join((f"pixels-{PIXELS_VERSION}", *extra)).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def nothing_readable(root: Path, files: list[Path], skipped: list[SkippedFile]) -> DyodError:
    return DyodError(f"none of the {len(files)} image files in {root} could be read; first problem: "
                     f"{skipped[0].path}: {skipped[0].reason}")


def image_features(root: str | os.PathLike, files: list[Path], extractor, chunk: int = 256,
                   progress: bool = True) -> tuple[torch.Tensor, list[SkippedFile]]:
    """``extractor``'s features of the readable images among ``files``, read ``chunk`` at a time, so that a folder of
    large photos is never held whole (256 is a multiple of the extractors' batch sizes, and each image is resized
    on its own: the numbers of reading them all at once)."""
    from tqdm.auto import tqdm

    features, skipped = [], []
    chunks = range(0, len(files), chunk)
    for start in tqdm(chunks, desc=f"features of {Path(root).name}", disable=not progress or len(chunks) < 2, leave=False):
        part = read_images(root, files[start:start + chunk], allow_empty=True)
        skipped += part.skipped
        if part.images:
            features.append(extractor(part.images))
    if not features:
        raise nothing_readable(Path(root), files, skipped)
    return torch.cat(features), skipped


def load_image_folder(root: str | os.PathLike, grayscale: bool = False, max_images: int = 0,
                      holdout_fraction: float = 0.0, split: str = "train",
                      size: int | Callable[[int], int] | None = None) -> ImageFolder:
    """Load every readable image under ``root`` (``dataset_files``, ``read_images``). ``size`` may be a function of
    the dataset's resolution (the custom VAE's training resolution is one): it is then read from the files'
    headers first."""
    files = dataset_files(root, holdout_fraction, split)
    if callable(size):
        resolution = header_resolution(files, max_images)
        size = size(resolution) if resolution else None
    return read_images(root, files, grayscale, max_images, size)


def header_resolution(files: list[Path], max_images: int = 0) -> int | None:
    """``dataset_resolution`` from the files' headers alone (None when none is readable)."""
    sizes = []
    for path in files[:max_images or None]:
        try:
            sizes.append(read_size(path))
        except Exception:  # noqa: BLE001 - unreadable files are skipped, and reported, when the images are read
            pass
    return dataset_resolution(sizes) if sizes else None
