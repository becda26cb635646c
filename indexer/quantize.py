"""INT8 variants of ONNX CLIP models (onnxruntime dynamic quantization), kept only when they agree with FP32.

``sleuth models quantize onnx:PATH`` writes ``PATH.int8.onnx`` (weights INT8, activations quantized at run
time: no calibration set) with the preprocessing JSON beside it, then embeds ``check_images`` with both models
and keeps the INT8 file only when every image's cosine of INT8 to FP32 is at least ``min_cosine``
(``benchmarks/scale.py int8`` measures the copy-detection recall and throughput on eval-v1 as well).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.embedders import load_embedder, onnx_preprocess_path, parse_model_id
from indexer.errors import ModelUnavailableError

MIN_COSINE = 0.98  # the tolerance: below it on any check image, the INT8 model is refused


@dataclass
class QuantizeResult:
    model_id: str  # the INT8 model's id (onnx:...int8.onnx)
    path: Path
    images: int
    min_cosine: float
    mean_cosine: float
    kept: bool
    fp32_bytes: int
    int8_bytes: int


def int8_path(path: Path) -> Path:
    return path.with_name(path.stem + ".int8.onnx")


def quantize_onnx(
    model_id: str, *, check_images: list[Image.Image], min_cosine: float = MIN_COSINE
) -> QuantizeResult:
    """Quantize the ONNX model ``model_id`` to INT8 and check it against FP32 on ``check_images``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kind, rest = parse_model_id(model_id)
    if kind != "onnx":
        raise ModelUnavailableError(f"{model_id!r}: only onnx:PATH models can be quantized")
    if not check_images:
        raise ModelUnavailableError("quantize needs images to check the INT8 model against FP32")
    src = Path(rest).expanduser()
    fp32 = load_embedder(model_id)  # also checks that the file loads
    out = int8_path(src)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    preprocess = onnx_preprocess_path(src)
    if preprocess is not None and preprocess.name == src.with_suffix(".json").name:
        shutil.copyfile(preprocess, out.with_suffix(".json"))
    int8_id = f"onnx:{out}"
    int8 = load_embedder(int8_id)
    a, b = fp32.embed(check_images), int8.embed(check_images)  # [n, dim] unit vectors each
    cosines = np.sum(a * b, axis=1)
    kept = bool(cosines.min() >= min_cosine)
    result = QuantizeResult(int8_id, out, len(check_images), float(cosines.min()), float(cosines.mean()), kept,
                            src.stat().st_size, out.stat().st_size)  # fmt: skip
    if not kept:
        out.unlink(missing_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
    return result
