"""Images <-> tensors for the projection layer: PIL RGB and ``[N, 3, H, W]`` float tensors in [-1, 1]."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> ``[N, 3, H, W]`` float32 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]  # each [H, W, 3]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_image(tensor: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> PIL RGB (rounded, clipped)."""
    arr = ((tensor.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as a JPEG at ``quality`` (Pillow's encoder, its default 4:2:0 subsampling) and decoded."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
