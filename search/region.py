"""Region-of-interest queries: search a rectangle of an image (the page's crop box, ``sleuth search --region``).

The region is cut from the decoded image (after EXIF orientation, so it is what a viewer shows), saved as a PNG
and decoded again through the one decode path: the region is then a query like any other image, with its own
SHA-256 (so the exact tier does not match the whole image it was cut from).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from indexer.decode import DecodedImage, decode_image
from indexer.errors import SleuthError
from indexer.settings import Limits

MIN_SIDE = 16  # pixels: a smaller region carries too little to search
_REGION = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


@dataclass(frozen=True)
class Region:
    """A rectangle in the pixels of the (orientation-corrected) image: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Region:
        """``"x,y,w,h"`` in pixels; SleuthError when it is not four non-negative integers."""
        match = _REGION.match(text or "")
        if match is None:
            raise SleuthError(f"a region is x,y,width,height in pixels (four integers), not {text!r}")
        x, y, w, h = (int(g) for g in match.groups())
        return cls(x, y, w, h)

    def to_json(self, of: DecodedImage) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "of_sha256": of.sha256}


def crop_to_region(decoded: DecodedImage, region: Region, *, limits: Limits) -> tuple[DecodedImage, bytes]:
    """The region of ``decoded`` as a decoded query and its PNG bytes. The rectangle is clipped to the image;
    SleuthError when what remains is smaller than ``MIN_SIDE`` on a side. The region is in the original's pixels
    (``decoded.width`` x ``decoded.height``), also when the image was decoded at a working size."""
    left, top = min(region.x, decoded.width), min(region.y, decoded.height)
    right = min(region.x + region.width, decoded.width)
    bottom = min(region.y + region.height, decoded.height)
    if right - left < MIN_SIDE or bottom - top < MIN_SIDE:
        raise SleuthError(
            f"the region {region.x},{region.y},{region.width},{region.height} leaves less than {MIN_SIDE} px "
            f"of the {decoded.width}x{decoded.height} image on a side"
        )
    box = (left, top, right, bottom)
    if decoded.scale != 1.0:  # the region is in the original's pixels; the image was decoded at working size
        box = tuple(
            min(round(v * decoded.scale), limit) for v, limit in zip(box, decoded.image.size * 2, strict=True)
        )  # type: ignore[assignment]
    buf = io.BytesIO()
    decoded.image.crop(box).save(buf, format="PNG")
    data = buf.getvalue()
    return decode_image(data, limits=limits), data
