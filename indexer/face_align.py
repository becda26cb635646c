"""FFHQ-style face alignment from 5 landmarks (the recipe the FFHQ dataset was cropped with).

From the eyes and the mouth corners:

* ``eye_avg`` = mean of the eyes, ``eye_to_eye`` = right eye - left eye,
  ``eye_to_mouth`` = mean of the mouth corners - ``eye_avg``;
* the quad's horizontal axis is ``eye_to_eye`` minus ``eye_to_mouth`` turned by 90 degrees (so both the
  eye line and the face's vertical axis set the rotation), its half-side is
  ``max(2.0 * |eye_to_eye|, 1.8 * |eye_to_mouth|)`` and its centre ``eye_avg + 0.1 * eye_to_mouth``;
* the quad is mapped onto the output square with a bilinear quad transform. When the quad is much larger than the
  output, the image is first shrunk with an antialiasing filter; when the quad leaves the image, the image is
  reflect-padded and the padding blurred towards its outer edge so the mirror copy does not look like content.

With these rules the eyes of an upright face land at the same output positions for every face, which is what
FFHQ-trained generators expect (and what makes face embeddings comparable).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

# 5 points (x, y): left eye, right eye, nose, mouth left, mouth right, in continuous pixel coordinates
# (pixel (i, j) covers [i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5)).
Landmarks = Sequence[Sequence[float]]


@dataclass(frozen=True)
class AlignQuad:
    """The oriented square in source pixels that becomes the aligned output."""

    corners: np.ndarray  # [4, 2]: top-left, bottom-left, bottom-right, top-right (x, y)
    side: float  # side length in source pixels


def ffhq_quad(landmarks: Landmarks) -> AlignQuad:
    """The FFHQ crop square for a face with 5 landmarks (only the eyes and mouth corners are used)."""
    points = np.asarray(landmarks, dtype=np.float64)  # [5, 2]
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"expected 5 finite (x, y) landmarks, got shape {points.shape}")
    eye_left, eye_right, _nose, mouth_left, mouth_right = points
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_avg

    # Axis: the eye line minus the eye-to-mouth vector turned by 90 degrees (downwards becomes leftwards,
    # image y points down), so both terms point to the image-right side of an upright face.
    axis_x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    norm = float(np.hypot(*axis_x))
    if norm < 1e-6:
        raise ValueError("degenerate landmarks: eyes and mouth coincide")
    half = max(2.0 * float(np.hypot(*eye_to_eye)), 1.8 * float(np.hypot(*eye_to_mouth)))
    axis_x = axis_x / norm * half  # [2] half-side along the face's horizontal
    axis_y = np.array([-axis_x[1], axis_x[0]])  # [2] half-side along the face's vertical (downwards)
    centre = eye_avg + 0.1 * eye_to_mouth
    corners = np.stack(
        [
            centre - axis_x - axis_y,
            centre - axis_x + axis_y,
            centre + axis_x + axis_y,
            centre + axis_x - axis_y,
        ]
    )  # [4, 2]
    return AlignQuad(corners=corners, side=2.0 * half)


def align_face(image: Image.Image, landmarks: Landmarks, *, size: int) -> Image.Image:
    """The face as an upright RGB ``size`` x ``size`` crop, FFHQ-aligned from its 5 landmarks."""
    if size < 1:
        raise ValueError("size must be positive")
    img = image.convert("RGB")
    quad = ffhq_quad(landmarks)
    corners, side = quad.corners.copy(), quad.side

    # 1. Shrink (antialiased) when the quad is more than twice the output.
    shrink = int(math.floor(side / size * 0.5))
    if shrink > 1:
        new_size = (max(1, round(img.width / shrink)), max(1, round(img.height / shrink)))
        sx, sy = new_size[0] / img.width, new_size[1] / img.height
        img = img.resize(new_size, Image.Resampling.LANCZOS)
        corners = corners * np.array([sx, sy])
        side = side * (sx + sy) / 2

    # 2. Crop to the quad's bounding box plus a border (keeps the transform and padding cheap).
    border = max(round(side * 0.1), 3)
    left, top = (int(v) - border for v in np.floor(corners.min(axis=0)))
    right, bottom = (int(v) + border for v in np.ceil(corners.max(axis=0)))
    crop = (max(left, 0), max(top, 0), min(right, img.width), min(bottom, img.height))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError("the face quad does not overlap the image")
    if crop != (0, 0, img.width, img.height):
        img = img.crop(crop)
        corners = corners - np.array(crop[:2])

    # 3. Reflect-pad where the quad (plus border) leaves the image.
    # The crop was clamped to the image; whatever was clamped away is padding (all four are >= 0).
    pad = (int(crop[0] - left), int(crop[1] - top), int(right - crop[2]), int(bottom - crop[3]))
    if any(p > 0 for p in pad):
        img = reflect_pad(img, pad, blur=max(side * 0.02, 1.0))
        corners = corners + np.array(pad[:2])

    # 4. Map the quad onto the output square; supersample then downscale with an antialiasing filter.
    transform_size = int(min(max(size, round(side)), 4 * size))
    data = corners.flatten().tolist()  # PIL's quad corners are continuous coordinates, like the landmarks
    out = img.transform(
        (transform_size, transform_size), Image.Transform.QUAD, data, Image.Resampling.BILINEAR
    )
    if transform_size != size:
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return out


def reflect_pad(img: Image.Image, pad: tuple[int, int, int, int], *, blur: float) -> Image.Image:
    """Mirror the image outwards by ``pad`` = (left, top, right, bottom) pixels, then hide the mirror copy:
    the padded band is blurred (fading in over the outer third of the original next to a padded side) and
    blended towards the image's median colour the further it lies from the original."""
    array = np.asarray(img, dtype=np.float32)  # [H, W, 3]
    left, top, right, bottom = pad
    h, w = array.shape[:2]
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="reflect")  # [H+t+b, W+l+r, 3]
    ph, pw = padded.shape[:2]

    # Signed distance from the original image's padded sides, in pad widths: > 0 in the padding
    # (1 at its outer edge), < 0 inside the original. Unpadded sides do not count.
    xs = np.arange(pw, dtype=np.float32)[None, :]  # [1, pw]
    ys = np.arange(ph, dtype=np.float32)[:, None]  # [ph, 1]
    far = np.full((ph, pw), -np.inf, dtype=np.float32)  # [ph, pw]
    if left:
        far = np.maximum(far, (left - xs) / left)
    if right:
        far = np.maximum(far, (xs - (left + w - 1)) / right)
    if top:
        far = np.maximum(far, (top - ys) / top)
    if bottom:
        far = np.maximum(far, (ys - (top + h - 1)) / bottom)
    blur_weight = np.clip(3.0 * far + 1.0, 0.0, 1.0)[..., None]  # [ph, pw, 1]
    median_weight = np.clip(far, 0.0, 1.0)[..., None]  # [ph, pw, 1]

    blurred = np.asarray(
        Image.fromarray(np.rint(padded).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)),
        dtype=np.float32,
    )  # [ph, pw, 3]
    median = np.median(array.reshape(-1, 3), axis=0)  # [3]
    mixed = padded + (blurred - padded) * blur_weight
    mixed = mixed + (median - mixed) * median_weight
    return Image.fromarray(np.rint(mixed).clip(0, 255).astype(np.uint8))
