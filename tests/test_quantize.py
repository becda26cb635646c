"""INT8 CLIP: the quantized ONNX model is written, checked against FP32, and refused when it disagrees."""

from __future__ import annotations

from pathlib import Path

from indexer.embedders import OpenClipEmbedder, load_embedder
from indexer.quantize import int8_path, quantize_onnx
from tests.test_embedders import export_visual_to_onnx, sample_images
from tests.tiny_models import make_tiny_open_clip_dir


def _tiny_onnx(tmp_path: Path) -> Path:
    torch_model = load_embedder(make_tiny_open_clip_dir(tmp_path / "clip"))
    assert isinstance(torch_model, OpenClipEmbedder)
    path = tmp_path / "tiny.onnx"
    export_visual_to_onnx(torch_model, path)
    return path


def test_int8_model_is_kept_when_it_agrees_with_fp32_and_loads_as_a_clip_model(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path)
    result = quantize_onnx(f"onnx:{path}", check_images=sample_images(6), min_cosine=0.5)
    assert result.kept and result.path == int8_path(path) and result.path.exists()
    assert 0.5 <= result.min_cosine <= result.mean_cosine <= 1.0001
    int8 = load_embedder(result.model_id)
    assert int8.embed(sample_images(2)).shape == (2, load_embedder(f"onnx:{path}").dim)


def test_int8_model_is_refused_and_removed_below_the_tolerance(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path)
    result = quantize_onnx(f"onnx:{path}", check_images=sample_images(4), min_cosine=1.01)
    assert not result.kept and not int8_path(path).exists()
