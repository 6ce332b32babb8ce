"""A folder of images as a dataset: recursive search, EXIF orientation, colour profiles, RGB or grayscale, Lanczos
resizing.

A file that cannot be read is skipped and recorded with its reason; it never stops a run."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .errors import DyodError, first_line

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
    im = _to_srgb(im, path)
    if im.width < 1 or im.height < 1:
        raise ValueError("image has no pixels")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = Image.fromarray(_deep_gray_to_8_bits(np.asarray(im, dtype=np.float64), im.mode), "L")
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("L" if grayscale else "RGB")
    return im.convert("RGB")


def _to_srgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """The pixels in sRGB, the colours the model was trained on and what viewers assume of an untagged image. A photo
    tagged with another colour profile (Display P3 from phones, Adobe RGB from cameras, a print profile on a CMYK
    file, a gray gamma on a scan) means other colours by the same numbers: read as they are, they came out washed out
    or shifted. Converted with the embedded profile (LittleCMS through Pillow, its default perceptual intent); an image
    tagged sRGB and an untagged one are left as they are. A profile that cannot be used is warned of and ignored."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im
    from PIL import ImageCms

    original, alpha = im, None
    if im.mode in ("P", "PA"):  # a palette's colours are numbers in the profile's space as well
        im = im.convert("RGBA")
    elif im.mode == "LA":  # LittleCMS converts gray without alpha: the alpha is set back after
        im, alpha = im.getchannel("L"), im.getchannel("A")
    if im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return original
    try:
        transform = _to_srgb_transform(icc, im.mode)
        if transform is None:
            return original
        converted = ImageCms.applyTransform(im, transform)
    except Exception as e:  # noqa: BLE001 - a profile that cannot be used never costs the image
        logger.warning("%s: its colour profile cannot be used (%s); its pixels are read as sRGB", path,
                       first_line(e) or type(e).__name__)
        return original
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


@functools.lru_cache(maxsize=8)  # a dataset's photos mostly share one or two profiles
def _to_srgb_transform(icc: bytes, mode: str):
    """The LittleCMS transform from the profile ``icc`` to sRGB, or None when the profile is sRGB already."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if "srgb" in (ImageCms.getProfileDescription(profile) or "").lower():
        return None
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, out_mode)


def _deep_gray_to_8_bits(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float grayscale to 8 bits by the format's own range, as PNG viewers show them, not by each
    image's own minimum and maximum (which would stretch every image of a dataset to full contrast, and made a
    uniform one black): 16-bit data / 65535 (PIL opens 16-bit PNGs as I;16 or as 32-bit I), floats in [0, 1] × 1.
    Values outside those ranges (true 32-bit or unscaled float data) have no standard range: each image's own."""
    lo, hi = float(arr.min()), float(arr.max())
    if mode.startswith("I") and 0 <= lo and hi <= 65535:
        unit = arr / 65535.0
    elif mode == "F" and 0 <= lo and hi <= 1:
        unit = arr
    else:
        unit = (arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5)
    return (unit * 255.0).round().astype(np.uint8)


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
