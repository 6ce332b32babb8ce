"""The dataset loader: recursive search, EXIF orientation, odd formats, unreadable files, empty folders."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dyod.data import (
    OUTPUT_RECORD,
    dataset_files,
    find_image_files,
    image_features,
    lanczos_resize_tensor,
    load_image,
    load_image_folder,
    pil_to_tensor,
    read_size,
    resize_lanczos,
    tensor_to_pil,
)
from dyod.errors import DyodError


def test_recursive_search_and_skipped_files_are_reported(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a" / "b" / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    data = Image.new("RGB", (20, 20)).tobytes()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:60])
    (tmp_path / "notes.txt").write_bytes(data)  # not an image suffix: ignored, not "skipped"
    folder = load_image_folder(tmp_path)
    assert len(folder) == 2
    assert sorted(p.name for p in folder.paths) == ["blue.jpg", "red.png"]
    skipped = {s.path.split("/")[-1]: s.reason for s in folder.skipped}
    assert set(skipped) == {"empty.png", "text.png", "truncated.png"}
    assert all(reason for reason in skipped.values())
    stats = folder.stats()
    assert stats["num_skipped"] == 3 and stats["resolution"] == 20


def test_hidden_files_and_folders_are_not_the_data(tmp_path, caplog):
    """A thumbnail cache (.thumbnails/) would add copies of the images, and macOS's ._name files beside each image
    copied from a Mac are not images; upper-case suffixes are images."""
    root = tmp_path / ".my-data"  # the folder given may itself be hidden
    (root / ".thumbnails").mkdir(parents=True)
    (root / "sub").mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(root / "A.PNG")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "sub" / "b.Jpeg", format="JPEG")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / ".thumbnails" / "A.png")
    (root / "._A.PNG").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level("INFO", logger="dyod.data"):
        assert [f.relative_to(root).as_posix() for f in find_image_files(root)] == ["A.PNG", "sub/b.Jpeg"]
    assert "left out 2 hidden image file(s)" in caplog.text
    folder = load_image_folder(root)
    assert len(folder) == 2 and not folder.skipped


def test_photos_of_kinds_dyod_does_not_read_are_named_not_silently_left_out(tmp_path, caplog):
    """A folder of iPhone photos (HEIC) and a few JPEGs trained on the JPEGs alone and said nothing; a folder of HEIC
    alone said "no image files found". AVIF (Pillow decodes it) and .jfif (a JPEG) are read."""
    from PIL import features

    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "mixed" / "a.jpg")
    Image.new("RGB", (8, 8), (30, 200, 30)).save(tmp_path / "mixed" / "b.jfif", format="JPEG")
    for name in ("IMG_0001.HEIC", "sub/IMG_0002.heic", "raw.dng", ".hidden.heic"):
        (tmp_path / "mixed" / name).write_bytes(b"\0\0\0\x18ftypheic")
    expected = ["a.jpg", "b.jfif"]
    if features.check("avif"):
        Image.new("RGB", (8, 8), (30, 30, 200)).save(tmp_path / "mixed" / "c.avif")
        expected.append("c.avif")
    with caplog.at_level("WARNING", logger="dyod.data"):
        files = find_image_files(tmp_path / "mixed")
    assert [f.name for f in files] == expected
    assert "left out 3 image file(s) of a kind dyod does not read (.dng, .heic; e.g. IMG_0001.HEIC); convert them " \
           "to JPEG or PNG" in caplog.text
    assert len(load_image_folder(tmp_path / "mixed").images) == len(expected)
    (tmp_path / "iphone").mkdir()
    (tmp_path / "iphone" / "IMG_0003.heic").write_bytes(b"\0")
    with pytest.raises(DyodError, match=r"no image file dyod reads in .*iphone: it holds 1 image file\(s\) of a kind "
                                        r"dyod does not read \(\.heic; e\.g\. IMG_0003\.heic\)"):
        dataset_files(tmp_path / "iphone")
    with pytest.raises(DyodError, match=r"IMG_0003\.heic: a \.heic file, which dyod does not read: convert it to JPEG"):
        load_image_folder(tmp_path / "iphone" / "IMG_0003.heic")  # named as a file, as `dyod transform` takes inputs


def test_folders_linked_into_the_data_folder_are_searched_once(tmp_path):
    """A dataset made of links to folders elsewhere is searched through them; a link back up ends there."""
    elsewhere, root = tmp_path / "photos", tmp_path / "data"
    elsewhere.mkdir()
    (root / "own").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(elsewhere / "cat.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "own" / "dog.png")
    (root / "cats").symlink_to(elsewhere, target_is_directory=True)
    (root / "own" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "cats-again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: once
    files = [f.relative_to(root).as_posix() for f in find_image_files(root)]
    assert files == ["cats/cat.png", "own/dog.png"]


def test_empty_folder_and_unreadable_only_folder_are_clear_errors(tmp_path):
    with pytest.raises(DyodError, match="no image files found in"):
        load_image_folder(tmp_path)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(DyodError, match="none of the 1 image files .* could be read; first problem: .*bad.png"):
        load_image_folder(tmp_path)
    with pytest.raises(DyodError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_the_grid_beside_dyod_results_is_not_an_image_of_the_folder(tmp_path):
    """A folder `dyod sample` wrote holds its samples and grid.png: evaluating it, or training on it, takes the
    results its record lists; other folders, and other files in the tree, are taken whole."""
    samples, plain = tmp_path / "samples", tmp_path / "plain"
    for folder in (samples, plain):
        folder.mkdir()
        for name in ("seed-000000.png", "seed-000001.png", "grid.png"):
            Image.new("RGB", (8, 8)).save(folder / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    (samples / OUTPUT_RECORD).write_text(json.dumps({"images": ["seed-000000.png", "seed-000001.png"]}))
    names = [p.relative_to(tmp_path).as_posix() for p in find_image_files(tmp_path)]
    assert names == ["plain/grid.png", "plain/seed-000000.png", "plain/seed-000001.png",
                     "samples/seed-000000.png", "samples/seed-000001.png", "top.png"]
    assert len(load_image_folder(samples)) == 2
    (samples / OUTPUT_RECORD).write_text(json.dumps({"images": ["seed-000001.png"]}))  # the record decides
    assert [p.name for p in find_image_files(samples)] == ["seed-000001.png"]
    for record in ('{"command": "sample"}', "not json"):  # a record from before the list, or a broken one
        (samples / OUTPUT_RECORD).write_text(record)
        assert [p.name for p in find_image_files(samples)] == ["seed-000000.png", "seed-000001.png"]



def test_a_run_folder_inside_the_data_folder_is_not_data(tmp_path):
    """`dyod fit DATA --out DATA/run`: the VAE's sample grids and t0 sweeps the run folder collects are not images
    of the dataset (a run.json that dyod did not write leaves its folder in)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    for folder, record in (("run", {"dyod_version": "0.1.0", "stages": {}}), ("other", {"name": "not dyod"})):
        (tmp_path / folder / "vae" / "samples").mkdir(parents=True)
        (tmp_path / folder / "run.json").write_text(json.dumps(record))
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "vae" / "samples" / "epoch-0001.png")
    names = [p.relative_to(tmp_path).as_posix() for p in find_image_files(tmp_path)]
    assert names == ["other/vae/samples/epoch-0001.png", "photo.png"]
    # the run folder itself given as the folder of images (`dyod eval SAMPLES --ref RUN`, `dyod fit RUN`): before, its
    # grids were scored or trained on; now refused, naming the dataset the run records
    with pytest.raises(DyodError, match=r"run is a dyod run folder \(run.json\), not a folder of images: the images in "
                                        r"it are dyod's sample grids. Give a folder of images$"):
        find_image_files(tmp_path / "run")
    (tmp_path / "run" / "data.json").write_text(json.dumps({"root": "/photos/cats", "num_images": 1}))
    with pytest.raises(DyodError, match=r"Give a folder of images \(the run was trained on /photos/cats\)"):
        find_image_files(tmp_path / "run")
    assert len(find_image_files(tmp_path / "other")) == 1  # a run.json dyod did not write: an ordinary folder


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[:8].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80  # the red strip is now on top


# Display P3's primaries as a profile states them (adapted to the D50 white of the profile connection space), with
# a plain gamma curve; and the sRGB primaries LittleCMS's built-in sRGB profile states.
P3_COLUMNS = np.array([[0.5151, 0.2920, 0.1571], [0.2412, 0.6922, 0.0666], [-0.0011, 0.0419, 0.7841]])
SRGB_COLUMNS = np.array([[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169],
                         [0.0139322, 0.0971045, 0.7141733]])
GAMMA_U8F8 = 563  # 2.2 as the ICC's u8Fixed8Number stores it: 563 / 256


def _matrix_profile(description: str, columns: np.ndarray | None, gamma_u8f8: int = GAMMA_U8F8) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix and gamma curves), written here byte by byte so that the test
    needs no profile file: the kind a camera or phone embeds in its photos. ``columns`` None: a gray profile (one
    gamma curve), as scanners embed."""
    import struct

    tags = [*([] if columns is None else [(name, _icc_xyz(*columns[:, i]))
                                          for i, name in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]),
            *[(name, b"curv" + bytes(4) + struct.pack(">IH", 1, gamma_u8f8))
              for name in ((b"kTRC",) if columns is None else (b"rTRC", b"gTRC", b"bTRC"))]]
    return _icc_profile(description, b"mntr", b"GRAY" if columns is None else b"RGB ", tags)


def _icc_s15(v: float) -> bytes:
    import struct

    return struct.pack(">i", round(v * 65536))


def _icc_xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _icc_s15(x) + _icc_s15(y) + _icc_s15(z)


def _icc_profile(description: str, device_class: bytes, space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """An ICC v2 profile of ``tags`` besides a description, the D50 media white and a copyright, connected by XYZ."""
    import struct

    text = description.encode() + b"\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)),
            (b"wtpt", _icc_xyz(0.9642, 1.0, 0.8249)),
            (b"cprt", b"text" + bytes(4) + b"none\0"), *tags]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for name, body in tags:
        body += bytes(-len(body) % 4)
        table += name + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + device_class + space + b"XYZ " + bytes(12)
              + b"acsp" + bytes(4 + 4 + 4 + 4 + 8) + struct.pack(">I", 0) + _icc_xyz(0.9642, 1.0, 0.8249)[8:]
              + bytes(4 + 16 + 28))
    return header + struct.pack(">I", len(tags)) + table + data


def _print_profile(description: str, grid: int = 17) -> bytes:
    """A CMYK print profile as printers' profiles are made: a table (``grid`` points a channel, 17 as is usual) from
    the inks to XYZ, here of a simple ink model (``_cmyk_to_linear_srgb``) in sRGB's primaries."""
    import struct

    g = np.linspace(0, 1, grid)
    cmyk = np.stack(np.meshgrid(g, g, g, g, indexing="ij"), -1)  # the first channel varies slowest
    table = np.round(_cmyk_to_linear_srgb(cmyk) @ SRGB_COLUMNS.T * 32768).astype(">u2")  # XYZ: 0x8000 is 1.0
    a2b0 = (b"mft2" + bytes(4) + bytes([4, 3, grid, 0]) + b"".join(_icc_s15(v) for v in np.eye(3).ravel())
            + struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 65535] * 4) + table.tobytes()
            + struct.pack(">6H", *[0, 65535] * 3))  # identity curves before and after the table
    return _icc_profile(description, b"prtr", b"CMYK", [(b"A2B0", a2b0)])


def _cmyk_to_linear_srgb(cmyk: np.ndarray) -> np.ndarray:
    """Each ink takes away its primary's light, black all of it: linear sRGB (1 - c)(1 - k), (1 - m)(1 - k), ..."""
    return (1 - cmyk[..., :3]) * (1 - cmyk[..., 3:])


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    return 255.0 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _p3_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """The reference: decode the gamma, P3's primaries to XYZ, XYZ to sRGB's, clip, sRGB's transfer curve."""
    linear = (rgb / 255.0) ** (GAMMA_U8F8 / 256)
    srgb = np.clip(linear @ (np.linalg.inv(SRGB_COLUMNS) @ P3_COLUMNS).T, 0, 1)
    return _srgb_encode(srgb)


def test_photos_in_another_colour_profile_are_read_as_srgb(tmp_path, caplog):
    """Photos tagged Display P3 (phones), Adobe RGB (cameras) were read as if their numbers were sRGB: colours washed
    out. Now converted through the embedded profile, as a reference computation of the colours does; an sRGB-tagged
    or untagged image reads as its pixels; a damaged profile is warned of and the image still read."""
    from PIL import ImageCms

    rng = np.random.default_rng(0)
    pixels = np.concatenate([rng.integers(0, 256, (8, 16, 3)), [[[200, 60, 40]] * 16, [[40, 200, 60]] * 16]])
    pixels = pixels.astype(np.uint8)
    image = Image.fromarray(pixels)
    image.save(tmp_path / "p3.png", icc_profile=_matrix_profile("Display P3 (test)", P3_COLUMNS))
    image.save(tmp_path / "p3.jpg", icc_profile=_matrix_profile("Display P3 (test)", P3_COLUMNS), quality=100,
               subsampling=0)
    image.save(tmp_path / "untagged.png")
    image.save(tmp_path / "srgb.png", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    image.save(tmp_path / "damaged.png", icc_profile=b"not a profile at all")

    expected = _p3_to_srgb(pixels.astype(np.float64))
    got = np.asarray(load_image(tmp_path / "p3.png")).astype(np.float64)
    assert np.abs(got - expected).max() <= 3  # LittleCMS's 8-bit tables against the exact arithmetic
    assert np.abs(got - pixels).max() > 20  # not the pixels as stored: P3's red is redder than sRGB's
    assert got[8, 0, 0] > 200 + 10 and got[8, 0, 1] < 60  # P3 (200, 60, 40) is a more saturated red in sRGB
    jpeg = np.asarray(load_image(tmp_path / "p3.jpg")).astype(np.float64)
    assert np.abs(jpeg - expected).mean() < 3  # the same through JPEG's compression
    assert np.array_equal(np.asarray(load_image(tmp_path / "untagged.png")), pixels)
    assert np.array_equal(np.asarray(load_image(tmp_path / "srgb.png")), pixels)
    with caplog.at_level("WARNING", logger="dyod.colour"):
        damaged = load_image(tmp_path / "damaged.png")
    assert np.array_equal(np.asarray(damaged), pixels)
    assert "damaged.png: its colour profile cannot be used" in caplog.text
    # with transparency: converted, then flattened on white as before
    rgba = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]), "RGBA")
    rgba.save(tmp_path / "p3_rgba.png", icc_profile=_matrix_profile("Display P3 (test)", P3_COLUMNS))
    assert np.abs(np.asarray(load_image(tmp_path / "p3_rgba.png")).astype(np.float64) - expected).max() <= 3
    # a grayscale scan tagged gray gamma 1.8: its mid-grey is lighter in sRGB (128 -> about 146)
    ramp = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (4, 1))
    Image.fromarray(ramp, "L").save(tmp_path / "gray18.png", icc_profile=_matrix_profile("Gray 1.8 (test)", None, 461))
    linear = (ramp / 255.0) ** (461 / 256)
    grey = _srgb_encode(linear)
    for grayscale in (False, True):
        read = np.asarray(load_image(tmp_path / "gray18.png", grayscale=grayscale)).astype(np.float64)
        assert np.abs(read - grey[..., None]).max() <= 3 and np.abs(read - ramp[..., None]).max() > 10


def test_palette_and_gray_alpha_images_with_a_profile_are_converted_too(tmp_path):
    """A palette PNG (a GIF-like export) and a gray-with-alpha PNG tagged with a profile were read unconverted: the
    palette's colours and the gray levels are numbers in the profile's space as well. Transparency still flattens on
    white, after the colours are converted."""
    rng = np.random.default_rng(1)
    colours = np.concatenate([rng.integers(0, 256, (14, 3)), [[200, 60, 40], [40, 200, 60]]]).astype(np.uint8)
    index = np.tile(np.arange(16, dtype=np.uint8), (4, 1))
    palette = Image.fromarray(index, "P")
    palette.putpalette(colours.ravel().tolist())
    palette.save(tmp_path / "p3_palette.png", icc_profile=_matrix_profile("Display P3 (test)", P3_COLUMNS))
    palette.save(tmp_path / "p3_palette_transparent.png", transparency=15,
                 icc_profile=_matrix_profile("Display P3 (test)", P3_COLUMNS))
    expected = _p3_to_srgb(colours[index].astype(np.float64))
    got = np.asarray(load_image(tmp_path / "p3_palette.png")).astype(np.float64)
    assert np.abs(got - expected).max() <= 3 and np.abs(got - colours[index]).max() > 20
    transparent = np.asarray(load_image(tmp_path / "p3_palette_transparent.png")).astype(np.float64)
    assert np.array_equal(transparent[:, 15], np.full((4, 3), 255.0))  # the transparent entry: white
    assert np.abs(transparent[:, :15] - expected[:, :15]).max() <= 3

    ramp = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (4, 1))
    alpha = np.full_like(ramp, 255)
    alpha[:, -1] = 0
    Image.fromarray(np.dstack([ramp, alpha]), "LA").save(
        tmp_path / "gray18_alpha.png", icc_profile=_matrix_profile("Gray 1.8 (test)", None, 461))
    linear = (ramp / 255.0) ** (461 / 256)
    grey = _srgb_encode(linear)
    grey[:, -1] = 255.0  # transparent: white
    for grayscale in (False, True):
        read = np.asarray(load_image(tmp_path / "gray18_alpha.png", grayscale=grayscale)).astype(np.float64)
        assert np.abs(read - grey[..., None]).max() <= 3 and np.abs(read - ramp[..., None]).max() > 10


def test_cmyk_images_with_a_print_profile_are_converted_through_it(tmp_path):
    """A CMYK TIFF or JPEG (a print shop's file) tagged with its print profile: the inks become sRGB through the
    profile's table, as the ink model the profile was made from says, not Pillow's naive 255 - C - K."""
    rng = np.random.default_rng(2)
    inks = rng.integers(0, 256, (32, 32, 4)).astype(np.uint8)
    inks[..., 3] //= 2  # up to half black: in the near-black LittleCMS's 8-bit tables are coarse (below)
    image = Image.fromarray(inks, "CMYK")
    profile = _print_profile("Print (test)")
    image.save(tmp_path / "print.tif", icc_profile=profile)
    image.save(tmp_path / "print.jpg", icc_profile=profile, quality=100)
    image.save(tmp_path / "untagged.tif")

    linear = _cmyk_to_linear_srgb(inks / 255.0)
    expected = _srgb_encode(linear)
    got = np.asarray(load_image(tmp_path / "print.tif")).astype(np.float64)
    naive = np.asarray(load_image(tmp_path / "untagged.tif")).astype(np.float64)
    assert np.array_equal(naive, np.asarray(image.convert("RGB")))  # untagged: Pillow's conversion, as before
    assert np.abs(naive - expected).mean() > 30  # which is not what the profile says
    # LittleCMS joins the profiles into one 8-bit table and interpolates the encoded values, which is coarse where
    # sRGB's curve is steep (up to 16 levels in the darkest tones): under a level on average, within 0.02 of the light
    assert np.abs(got - expected).mean() < 2
    decoded = np.where(got <= 255 * 0.04045, got / 255 / 12.92, ((got / 255 + 0.055) / 1.055) ** 2.4)
    assert np.abs(decoded - linear).max() < 0.02
    jpeg = np.asarray(load_image(tmp_path / "print.jpg")).astype(np.float64)
    assert np.abs(jpeg - expected).mean() < 2  # the same through JPEG's compression (and its inverted CMYK)


def test_cached_latents_and_features_are_keyed_by_how_pixels_are_read(tmp_path, monkeypatch):
    """Latents and KID features cached before colour profiles were converted hold the old pixels' values: the key
    under which they are cached changes with ``PIXELS_VERSION``, as with a file replaced."""
    import dyod.data

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    files = [tmp_path / "a.png"]
    now = dyod.data.files_fingerprint(files, "extractor")
    assert dyod.data.files_fingerprint(files, "extractor") == now
    monkeypatch.setattr(dyod.data, "PIXELS_VERSION", dyod.data.PIXELS_VERSION - 1)
    assert dyod.data.files_fingerprint(files, "extractor") != now


def _photos(folder):
    """Non-square images of several sizes, one of them EXIF-rotated, and one unreadable file."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i, (w, h) in enumerate([(90, 60), (90, 60), (90, 60), (48, 80), (200, 150)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 70 x 50 on disk is 50 x 70
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / "5.jpg", exif=exif.tobytes())
    (folder / "6.png").write_text("not an image")
    return folder


def test_loading_at_a_size_resizes_each_image_as_it_is_read(tmp_path):
    """With ``size`` the images are what resizing the full images gives, pixel for pixel, and never held at full
    size; the dataset's own sizes (stats, resolution) are those of the files."""
    folder = _photos(tmp_path / "photos")
    full = load_image_folder(folder)
    small = load_image_folder(folder, size=32)
    assert small.size == 32 and [im.size for im in small.images] == [(32, 32)] * 6
    for a, b in zip(full.images, small.images):
        assert np.array_equal(np.asarray(resize_lanczos(a, 32)), np.asarray(b))
    assert small.sizes == full.sizes == [(90, 60)] * 3 + [(48, 80), (200, 150), (50, 70)]
    assert small.stats() == full.stats() and small.resolution == full.resolution == 60
    assert [s.path.split("/")[-1] for s in small.skipped] == ["6.png"]
    # a size chosen from the dataset's resolution (the custom VAE's) is chosen before any image is read
    seen = []
    chosen = load_image_folder(folder, size=lambda resolution: seen.append(resolution) or 16)
    assert seen == [60] and chosen.size == 16 and chosen.images[0].size == (16, 16)
    assert [read_size(p) for p in full.paths] == full.sizes  # headers give the sizes load_image gives


def test_features_of_a_folder_read_in_chunks_are_those_of_reading_it_whole(tmp_path):
    folder = _photos(tmp_path / "photos")
    files = dataset_files(folder)

    def extractor(images):  # any per-image function shows the order and the skipping
        return torch.tensor([[float(np.asarray(im).mean()), im.size[0]] for im in images], dtype=torch.float64)

    whole = extractor(load_image_folder(folder).images)
    for chunk in (1, 2, 4, 256):
        features, skipped = image_features(folder, files, extractor, chunk=chunk)
        assert torch.equal(features, whole) and [s.path.split("/")[-1] for s in skipped] == ["6.png"]
    with pytest.raises(DyodError, match="none of the 1 image files .* could be read; first problem: .*6.png"):
        image_features(folder, [folder / "6.png"], extractor)


def test_modes_become_rgb_and_grayscale_on_request(tmp_path):
    arr16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.save(tmp_path / "transparent.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    deep = load_image(tmp_path / "deep.png")
    # 16 bits to 8 by the format's range (v / 257), not stretched to each image's own minimum and maximum
    assert deep.mode == "RGB" and np.array_equal(np.asarray(deep)[..., 0], np.round(arr16 / 257.0).astype(np.uint8))
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert np.asarray(load_image(tmp_path / "white16.png")).min() == 255  # was black
    Image.new("F", (4, 4), 0.5).save(tmp_path / "half.tiff")
    assert np.asarray(load_image(tmp_path / "half.tiff")).max() == 128  # floats in [0, 1]
    Image.fromarray(np.arange(16, dtype=np.float32).reshape(4, 4) * 1000).save(tmp_path / "unscaled.tiff")
    unscaled = np.asarray(load_image(tmp_path / "unscaled.tiff"))  # no standard range: the image's own
    assert unscaled.min() == 0 and unscaled.max() == 255
    assert np.asarray(load_image(tmp_path / "transparent.png")).min() == 255  # transparent -> white
    assert np.asarray(load_image(tmp_path / "palette.png")).min() == 255
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg")).mean(axis=(0, 1))
    assert cmyk[0] > 200 and cmyk[1] < 60
    gray = np.asarray(load_image(tmp_path / "cmyk.jpg", grayscale=True))
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], gray[..., 1])


def test_tensor_round_trip_and_lanczos_resize():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    x = pil_to_tensor([im])
    assert x.shape == (1, 3, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(x)[0]), np.asarray(im))
    # A smooth image (8-bit PIL clips Lanczos overshoot between its two passes; the float path does not).
    yy, xx = np.mgrid[0:12, 0:12]
    smooth = np.stack([xx * 15 + 40, yy * 15 + 40, (xx + yy) * 8 + 30], -1).astype(np.uint8)
    im = Image.fromarray(smooth)
    up = lanczos_resize_tensor(pil_to_tensor([im]), 24)
    ref = pil_to_tensor([im.resize((24, 24), Image.Resampling.LANCZOS)])
    assert up.shape == (1, 3, 24, 24)
    assert (up - ref).abs().max() < 3 / 127.5  # the same filter, without 8-bit rounding
    assert torch.equal(lanczos_resize_tensor(x, 12), x)


@pytest.mark.parametrize("size,out", [(12, 24), (64, 512), (512, 64), (30, 17), (17, 30)])
def test_lanczos_resize_is_pil_float_resize(size, out):
    """The matrix form computes exactly what PIL's "F"-mode Lanczos computes, up and down (with anti-aliasing)."""
    x = torch.from_numpy(np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32))
    ours = lanczos_resize_tensor(x, out)
    ref = torch.stack([
        torch.stack([torch.from_numpy(np.array(Image.fromarray(c.numpy(), "F").resize((out, out), Image.Resampling.LANCZOS)))
                     for c in image])
        for image in x
    ])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # in float32, as on Apple's mps (no float64 there): within 1e-5 of PIL's
    torch.testing.assert_close(lanczos_resize_tensor(x, out, accumulate=torch.float32), ref, rtol=0, atol=1e-5)
