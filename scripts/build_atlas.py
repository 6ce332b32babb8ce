"""Build dyod's emoji atlas from Debian's Noto Color Emoji font (fonts-noto-color-emoji).

Every single-code-point emoji with a Unicode name (symbols: categories So and Sm; no regional indicators, skin-tone
modifiers or format characters) is rendered from the font's colour bitmaps, cropped to its bounding box, scaled
to fit a TILE×TILE square (Lanczos, aspect kept, centred) and packed row by row into one RGBA PNG, with a JSON of
names and code points. Users and CI never need the font: they use the committed atlas.

    apt-get install fonts-noto-color-emoji && pip install fonttools
    python scripts/build_atlas.py [--font PATH] [--tile 64]
"""

import argparse
import json
import math
import unicodedata
from pathlib import Path

from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
OUT = Path(__file__).resolve().parent.parent / "src" / "dyod" / "world" / "assets"


def emoji_code_points(font_path: str) -> list[int]:
    cmap = TTFont(font_path).getBestCmap()
    keep = []
    for cp in sorted(cmap):
        ch = chr(cp)
        if cp < 0x80 or unicodedata.name(ch, None) is None:
            continue
        if unicodedata.category(ch) not in ("So", "Sm"):
            continue
        if 0x1F1E6 <= cp <= 0x1F1FF or 0x1F3FB <= cp <= 0x1F3FF:  # regional indicators, skin-tone modifiers
            continue
        keep.append(cp)
    return keep


def render(font: ImageFont.FreeTypeFont, cp: int, tile: int) -> Image.Image | None:
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), chr(cp), font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    sprite = canvas.crop(box)
    scale = tile / max(sprite.size)
    size = (max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale)))
    # premultiply alpha before resampling so transparent pixels do not bleed black into the edges
    sprite = sprite.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    out = Image.new("RGBA", (tile, tile), (0, 0, 0, 0))
    out.paste(sprite, ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=FONT)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    font = ImageFont.truetype(args.font, 109)  # the size of Noto's colour bitmaps
    sprites, entries = [], []
    for cp in emoji_code_points(args.font):
        sprite = render(font, cp, args.tile)
        if sprite is None:
            continue
        entries.append({"codepoint": f"U+{cp:04X}", "char": chr(cp), "name": unicodedata.name(chr(cp)).lower()})
        sprites.append(sprite)
    columns = math.ceil(math.sqrt(len(sprites)))
    rows = math.ceil(len(sprites) / columns)
    atlas = Image.new("RGBA", (columns * args.tile, rows * args.tile), (0, 0, 0, 0))
    for i, sprite in enumerate(sprites):
        r, c = divmod(i, columns)
        atlas.paste(sprite, (c * args.tile, r * args.tile))
    args.out.mkdir(parents=True, exist_ok=True)
    atlas.save(args.out / "emoji_atlas.png", optimize=True)
    meta = {
        "source": "Noto Color Emoji (fonts-noto-color-emoji), SIL Open Font License 1.1",
        "unicode_version": unicodedata.unidata_version,
        "tile": args.tile,
        "columns": columns,
        "count": len(entries),
        "emoji": entries,
    }
    (args.out / "emoji_atlas.json").write_text(json.dumps(meta, ensure_ascii=False, indent=0) + "\n")
    print(f"{len(entries)} emoji, atlas {atlas.size}, {(args.out / 'emoji_atlas.png').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
