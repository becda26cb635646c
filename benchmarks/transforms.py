"""Image transforms of the copy-detection benchmark (DISC21-style edits), all seeded and deterministic.

Every transform is a function ``(image, rng) -> image`` on RGB PIL images; ``apply(name, image, seed)`` runs one
by name. Crops are given as the fraction of the *area* removed (a 30 % crop keeps 70 % of the pixels).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality`` and decode again."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def resize(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)


def crop(image: Image.Image, area_removed: float, rng: np.random.Generator, *, centre: bool) -> Image.Image:
    """Keep a window of ``1 - area_removed`` of the area with the image's aspect ratio."""
    assert 0.0 <= area_removed < 1.0, area_removed
    w, h = image.size
    side = float(np.sqrt(1.0 - area_removed))
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    if centre:
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    else:
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch))


def pad(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    """Grow each dimension by ``fraction`` with a solid random colour, split evenly between both sides."""
    w, h = image.size
    px, py = round(w * fraction / 2), round(h * fraction / 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(image, border=(px, py, px, py), fill=colour)


def rotate(image: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    """Rotate by +-``degrees`` (random sign) around the centre, growing the canvas, black corners."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return image.rotate(sign * degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def overlay_text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in PIL's default font plus a filled emoji-like face (circle, eyes, mouth)."""
    out = image.convert("RGB").copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    size = max(10, h // 10)
    words = ["LOOK", "BREAKING", "so true", "omg", "REAL?", "#viral", "wow"]
    text = " ".join(rng.choice(words, size=2))
    tx = int(rng.integers(0, max(1, w // 3)))
    ty = int(rng.integers(0, max(1, h - size - 2)))
    draw.text((tx, ty), text, font=_font(size), fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    r = max(6, min(w, h) // 9)
    cx = int(rng.integers(r, max(r + 1, w - r)))
    cy = int(rng.integers(r, max(r + 1, h - r)))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 204, 0), outline=(120, 80, 0), width=2)
    e = max(1, r // 5)
    for dx in (-r // 3, r // 3):
        draw.ellipse((cx + dx - e, cy - r // 3 - e, cx + dx + e, cy - r // 3 + e), fill=(40, 30, 0))
    draw.arc((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2), 20, 160, fill=(40, 30, 0), width=max(1, e))
    return out


def screenshot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The image shown at 80 % inside a grey application window with a title bar and a status bar."""
    inner = resize(image.convert("RGB"), 0.8)
    w, h = inner.size
    bar = max(16, h // 12)
    border = max(4, w // 40)
    status = max(10, h // 20)
    grey = int(rng.integers(200, 236))
    canvas = Image.new("RGB", (w + 2 * border, h + bar + status + border), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width, bar), fill=(60, 60, 64))
    for i, colour in enumerate([(255, 95, 86), (255, 189, 46), (39, 201, 63)]):
        cx, cy, r = border + bar // 2 + i * bar, bar // 2, max(3, bar // 4)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    draw.text((border + 4 * bar, bar // 4), "image.jpg - Viewer", font=_font(bar // 2), fill=(230, 230, 230))
    canvas.paste(inner, (border, bar))
    draw.text((border, bar + h + 2), "100%  1 of 12", font=_font(status - 2), fill=(40, 40, 40))
    return canvas


def combo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop 20 % (random offset), then JPEG quality 50, then a text and emoji overlay."""
    return overlay_text(jpeg(crop(image, 0.2, rng, centre=False), 50), rng)


def _crop_t(fraction: float, centre: bool) -> Transform:
    return lambda im, rng: crop(im, fraction, rng, centre=centre)


TRANSFORMS: dict[str, Transform] = {
    "identity": lambda im, rng: im.convert("RGB"),
    "jpeg30": lambda im, rng: jpeg(im, 30),
    "resize50": lambda im, rng: resize(im, 0.5),
    "crop05": _crop_t(0.05, False),
    "crop10": _crop_t(0.10, False),
    "crop20": _crop_t(0.20, False),
    "crop30": _crop_t(0.30, False),
    "crop50": _crop_t(0.50, False),
    "crop30c": _crop_t(0.30, True),
    "pad20": lambda im, rng: pad(im, 0.20, rng),
    "rotate4": lambda im, rng: rotate(im, 4.0, rng),
    "flip": lambda im, rng: ImageOps.mirror(im.convert("RGB")),
    "grayscale": lambda im, rng: ImageOps.grayscale(im).convert("RGB"),
    "blur": lambda im, rng: im.convert("RGB").filter(ImageFilter.GaussianBlur(radius=2.0)),
    "overlay": overlay_text,
    "screenshot": screenshot,
    "combo": combo,
}

# The transforms the benchmark reports by default (identity is a sanity check, not a DISC21 edit).
BENCHMARK_TRANSFORMS: tuple[str, ...] = tuple(name for name in TRANSFORMS if name != "identity")


def apply(name: str, image: Image.Image, seed: int) -> Image.Image:
    """Run transform ``name`` on ``image`` with its own seeded generator."""
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name](image, np.random.default_rng(seed))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a transformed image for the query path (PNG keeps the transform's own pixels)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
