"""CLIP embedders: local open_clip folders, ONNX towers, offline hub tags, model ids and their errors."""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from indexer.embedders import (
    ImageEmbedder,
    OnnxEmbedder,
    OpenClipEmbedder,
    Preprocess,
    check_model,
    load_embedder,
    model_key_for,
    parse_model_id,
    preprocess_from_json,
)
from indexer.errors import ModelUnavailableError
from tests.tiny_models import TINY_EMBED_DIM, TINY_IMAGE_SIZE, make_tiny_open_clip_dir


def sample_images(count: int = 5) -> list[Image.Image]:
    """Images of assorted sizes and aspect ratios (portrait, landscape, square, smaller than the model input)."""
    sizes = [(80, 60), (45, 120), (64, 64), (20, 25), (301, 157), (33, 90), (128, 128)]
    images = []
    for i in range(count):
        rng = np.random.default_rng(i)
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(250, 20 * i, 40))
        images.append(image)
    return images


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_clip")
    make_tiny_open_clip_dir(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_embedder(tiny_dir: Path) -> OpenClipEmbedder:
    embedder = load_embedder(f"local-dir:{tiny_dir}", batch_size=2)
    assert isinstance(embedder, OpenClipEmbedder)
    return embedder


def export_visual_to_onnx(embedder: OpenClipEmbedder, path: Path) -> None:
    """The tiny model's image tower as ONNX with a dynamic batch axis (input pixel_values, output image_embeds)."""
    size = embedder.preprocess.image_size
    dummy = torch.zeros(2, 3, *size)  # [N, 3, H, W]
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            embedder._visual,
            (dummy,),
            str(path),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


# --- local-dir -----------------------------------------------------------------------------------
def test_local_dir_embeds_unit_rows_of_the_config_dim(tiny_embedder: OpenClipEmbedder) -> None:
    assert isinstance(tiny_embedder, ImageEmbedder)
    vectors = tiny_embedder.embed(sample_images(5))
    assert vectors.shape == (5, TINY_EMBED_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert tiny_embedder.dim == TINY_EMBED_DIM
    assert len(tiny_embedder.weights_sha256) == 64
    assert tiny_embedder.model_key == model_key_for(tiny_embedder.model_id, tiny_embedder.weights_sha256)
    assert len(tiny_embedder.model_key) == 16


def test_batched_embedding_equals_one_by_one(tiny_embedder: OpenClipEmbedder) -> None:
    images = sample_images(5)  # batch_size 2: chunks of 2, 2, 1
    batched = tiny_embedder.embed(images)
    single = np.concatenate([tiny_embedder.embed([image]) for image in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_embedding_is_deterministic_across_loads(tiny_dir: Path, tiny_embedder: OpenClipEmbedder) -> None:
    images = sample_images(3)
    again = load_embedder(f"local-dir:{tiny_dir}")
    np.testing.assert_array_equal(tiny_embedder.embed(images), tiny_embedder.embed(images))
    np.testing.assert_allclose(tiny_embedder.embed(images), again.embed(images), atol=1e-6)
    assert again.model_key == tiny_embedder.model_key


def test_different_images_get_different_vectors(tiny_embedder: OpenClipEmbedder) -> None:
    vectors = tiny_embedder.embed(sample_images(4))
    similarity = vectors @ vectors.T  # [4, 4]
    off_diagonal = similarity[~np.eye(4, dtype=bool)]
    assert off_diagonal.max() < 0.9999


def test_preprocessing_matches_open_clip_transform(tiny_dir: Path, tiny_embedder: OpenClipEmbedder) -> None:
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}", load_weights=False)
    images = sample_images(6)
    ours = tiny_embedder.preprocess(images)  # [N, 3, H, W]
    reference = torch.stack([transform(image) for image in images]).numpy()
    assert ours.shape == (6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("resize_mode", ["squash", "longest"])
def test_other_resize_modes_match_open_clip(tmp_path: Path, resize_mode: str) -> None:
    import open_clip

    model_id = make_tiny_open_clip_dir(
        tmp_path / resize_mode, resize_mode=resize_mode, interpolation="bilinear"
    )
    embedder = load_embedder(model_id)
    assert isinstance(embedder, OpenClipEmbedder)
    _, _, transform = open_clip.create_model_and_transforms(model_id, load_weights=False)
    images = sample_images(6)
    reference = torch.stack([transform(image) for image in images]).numpy()
    np.testing.assert_allclose(embedder.preprocess(images), reference, atol=1e-5)


def test_local_dir_reads_bin_weights_with_the_same_result(
    tmp_path: Path, tiny_embedder: OpenClipEmbedder
) -> None:
    model_id = make_tiny_open_clip_dir(tmp_path / "bin", weights="bin")
    embedder = load_embedder(model_id)
    images = sample_images(3)
    np.testing.assert_allclose(embedder.embed(images), tiny_embedder.embed(images), atol=1e-6)
    assert embedder.weights_sha256 != tiny_embedder.weights_sha256  # a different file


def test_other_weights_give_another_model_key(tmp_path: Path, tiny_embedder: OpenClipEmbedder) -> None:
    model_id = make_tiny_open_clip_dir(tmp_path / "seed1", seed=1)
    other = load_embedder(model_id)
    assert other.weights_sha256 != tiny_embedder.weights_sha256
    assert other.model_key != tiny_embedder.model_key


def test_missing_local_dir_weights_error_names_the_file(tmp_path: Path) -> None:
    make_tiny_open_clip_dir(tmp_path)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError) as info:
        load_embedder(f"local-dir:{tmp_path}")
    assert "open_clip_model.safetensors" in str(info.value)
    assert "SLEUTH_CLIP_MODEL" in str(info.value)


def test_missing_local_dir_config_error_names_the_file(tmp_path: Path) -> None:
    make_tiny_open_clip_dir(tmp_path)
    (tmp_path / "open_clip_config.json").unlink()
    with pytest.raises(ModelUnavailableError, match="open_clip_config.json"):
        load_embedder(f"local-dir:{tmp_path}")


def test_missing_local_dir_folder_is_model_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="SLEUTH_CLIP_MODEL"):
        load_embedder(f"local-dir:{tmp_path / 'nowhere'}")


def test_weights_that_do_not_fit_the_config_are_model_unavailable(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_id = make_tiny_open_clip_dir(tmp_path)
    weights = tmp_path / "open_clip_model.safetensors"
    state = load_file(str(weights))
    del state["visual.proj"]
    save_file(state, str(weights))
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        load_embedder(model_id)


# --- ONNX ----------------------------------------------------------------------------------------
def test_onnx_embedder_agrees_with_torch_without_json(
    tmp_path: Path, tiny_embedder: OpenClipEmbedder
) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    export_visual_to_onnx(tiny_embedder, onnx_path)
    embedder = load_embedder(f"onnx:{onnx_path}", batch_size=3, threads=1)
    assert isinstance(embedder, OnnxEmbedder)
    # no JSON: CLIP's standard preprocessing at the model's fixed input size
    assert embedder.preprocess == Preprocess(image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    assert embedder.dim == TINY_EMBED_DIM
    images = sample_images(7)
    vectors = embedder.embed(images)
    np.testing.assert_allclose(vectors, tiny_embedder.embed(images), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, embedder.embed(images))  # deterministic
    single = np.concatenate([embedder.embed([image]) for image in images])
    np.testing.assert_allclose(vectors, single, atol=1e-5)


def test_onnx_embedder_agrees_with_torch_with_preprocess_json(tmp_path: Path) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model_id = make_tiny_open_clip_dir(tmp_path / "custom", mean=mean, std=std, interpolation="bilinear")
    torch_embedder = load_embedder(model_id)
    assert isinstance(torch_embedder, OpenClipEmbedder)
    onnx_path = tmp_path / "model.onnx"
    export_visual_to_onnx(torch_embedder, onnx_path)
    images = sample_images(5)

    without_json = load_embedder(str(onnx_path))  # bare .onnx path
    assert not np.allclose(without_json.embed(images), torch_embedder.embed(images), atol=1e-4)

    config = {"image_size": TINY_IMAGE_SIZE, "mean": mean, "std": std, "interpolation": "bilinear"}
    (tmp_path / "model.json").write_text(json.dumps(config), encoding="utf-8")
    with_json = load_embedder(f"onnx:{onnx_path}")
    np.testing.assert_allclose(with_json.embed(images), torch_embedder.embed(images), atol=1e-4)


def test_onnx_reads_hugging_face_preprocessor_config(tmp_path: Path) -> None:
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    model_id = make_tiny_open_clip_dir(tmp_path / "hf", mean=mean, std=std)
    torch_embedder = load_embedder(model_id)
    assert isinstance(torch_embedder, OpenClipEmbedder)
    onnx_path = tmp_path / "export" / "model.onnx"
    onnx_path.parent.mkdir()
    export_visual_to_onnx(torch_embedder, onnx_path)
    hf_config = {
        "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        "size": {"shortest_edge": TINY_IMAGE_SIZE},
        "do_center_crop": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    (onnx_path.parent / "preprocessor_config.json").write_text(json.dumps(hf_config), encoding="utf-8")
    embedder = load_embedder(f"onnx:{onnx_path}")
    images = sample_images(4)
    np.testing.assert_allclose(embedder.embed(images), torch_embedder.embed(images), atol=1e-4)


def test_onnx_json_whose_size_disagrees_with_the_model_is_rejected(
    tmp_path: Path, tiny_embedder: OpenClipEmbedder
) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    export_visual_to_onnx(tiny_embedder, onnx_path)
    (tmp_path / "preprocess.json").write_text(json.dumps({"image_size": 224}), encoding="utf-8")
    with pytest.raises(ModelUnavailableError, match="preprocess.json"):
        load_embedder(f"onnx:{onnx_path}")


def test_missing_onnx_file_error_names_file_and_setting(tmp_path: Path) -> None:
    missing = tmp_path / "clip-image.onnx"
    with pytest.raises(ModelUnavailableError) as info:
        load_embedder(f"onnx:{missing}")
    assert str(missing) in str(info.value)
    assert "SLEUTH_CLIP_MODEL" in str(info.value) and "--clip-model" in str(info.value)


def test_corrupt_onnx_file_is_model_unavailable(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ModelUnavailableError, match="onnxruntime cannot load"):
        load_embedder(f"onnx:{broken}")


# --- open_clip hub tags ---------------------------------------------------------------------------
def test_open_clip_tag_offline_fails_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub must not be contacted offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    with pytest.raises(ModelUnavailableError) as info:
        load_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert "unreachable" in message
    assert "SLEUTH_CLIP_MODEL" in message and "onnx:" in message and "local-dir:" in message


def test_open_clip_tag_online_but_unreachable_fails_after_one_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    probes: list[str] = []

    def unreachable(request: urllib.request.Request, timeout: float) -> None:
        probes.append(request.full_url)
        raise urllib.error.URLError("Name or service not known")

    def no_retry_loop(*args: object, **kwargs: object) -> None:
        raise AssertionError("hf_hub_download (which retries for ~45 s) must not run when the probe fails")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_retry_loop)
    with pytest.raises(ModelUnavailableError, match="hub is unreachable .*Name or service not known"):
        load_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert len(probes) == 1 and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in probes[0]


def test_open_clip_tag_weights_come_from_the_hub_cache_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip
    from huggingface_hub import constants

    from indexer.embedders import _resolve_tag_weights

    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40, encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    path = _resolve_tag_weights("open_clip:ViT-B-32/laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k", cfg)
    assert path == snapshot / "open_clip_model.safetensors"


def test_unknown_open_clip_tag_or_arch_is_model_unavailable() -> None:
    with pytest.raises(ModelUnavailableError, match="unknown tag"):
        load_embedder("open_clip:ViT-B-32/no_such_tag")
    with pytest.raises(ModelUnavailableError, match="no architecture"):
        load_embedder("open_clip:NoSuchNet/openai")
    with pytest.raises(ModelUnavailableError, match="ARCH/TAG"):
        load_embedder("open_clip:ViT-B-32")


# --- ids, checks, preprocessing configs ------------------------------------------------------------
def test_parse_model_id_kinds(tmp_path: Path) -> None:
    assert parse_model_id("open_clip:ViT-B-32/laion2b_s34b_b79k") == (
        "open_clip",
        "ViT-B-32/laion2b_s34b_b79k",
    )
    assert parse_model_id("local-dir:/models/clip") == ("local-dir", "/models/clip")
    assert parse_model_id("onnx:~/m.onnx") == ("onnx", "~/m.onnx")
    assert parse_model_id("/somewhere/model.onnx") == ("onnx", "/somewhere/model.onnx")
    assert parse_model_id(str(tmp_path)) == ("local-dir", str(tmp_path))
    assert parse_model_id("file:///weights/model.pt") == ("file", "/weights/model.pt")
    assert parse_model_id("ViT-B-32/openai") == ("file", "ViT-B-32/openai")
    with pytest.raises(ModelUnavailableError):
        parse_model_id("  ")
    with pytest.raises(ModelUnavailableError):
        parse_model_id("onnx:")


def test_bare_folder_and_unusable_paths(
    tmp_path: Path, tiny_embedder: OpenClipEmbedder, tiny_dir: Path
) -> None:
    bare = load_embedder(str(tiny_dir))
    np.testing.assert_allclose(bare.embed(sample_images(2)), tiny_embedder.embed(sample_images(2)), atol=1e-6)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelUnavailableError, match="neither an .onnx file nor an open_clip folder"):
        load_embedder(str(weights))
    with pytest.raises(ModelUnavailableError, match="open_clip:ARCH/TAG"):
        load_embedder("ViT-B-32/openai")


def test_check_model_reports_ok_and_failures(
    tiny_dir: Path, tiny_embedder: OpenClipEmbedder, tmp_path: Path
) -> None:
    good = check_model(f"local-dir:{tiny_dir}")
    assert good.ok and good.kind == "local-dir" and good.dim == TINY_EMBED_DIM
    assert good.weights_sha256 == tiny_embedder.weights_sha256
    assert good.path is not None and good.path.endswith("open_clip_model.safetensors")
    bad = check_model(f"onnx:{tmp_path / 'absent.onnx'}")
    assert not bad.ok and bad.kind == "onnx" and "absent.onnx" in bad.message
    empty = check_model("")
    assert not empty.ok and empty.kind == "unknown"


def test_preprocess_from_json_keys() -> None:
    assert preprocess_from_json({}) == Preprocess()
    custom = preprocess_from_json(
        {
            "image_size": [48, 64],
            "mean": [0.5] * 3,
            "std": 0.5,
            "interpolation": "bilinear",
            "resize_mode": "longest",
        }
    )
    assert custom.image_size == (48, 64) and custom.std == (0.5, 0.5, 0.5)
    assert custom.interpolation == "bilinear" and custom.resize_mode == "longest"
    assert preprocess_from_json({"image_size": 64, "crop": False}).resize_mode == "squash"
    hf = preprocess_from_json({"size": {"shortest_edge": 256}, "crop_size": 224, "resample": 2})
    assert hf.image_size == (224, 224) and hf.resize_size == 256 and hf.interpolation == "bilinear"
    with pytest.raises(ValueError):
        preprocess_from_json({"resize_mode": "stretch"})
    with pytest.raises(ValueError):
        preprocess_from_json({"mean": [0.5, 0.5]})


def test_preprocess_output_shape_and_values_for_mixed_modes() -> None:
    images = [Image.new("RGB", (100, 50), (255, 0, 0)), Image.new("L", (30, 90), 255)]
    pixels = Preprocess(image_size=(24, 40), resize_mode="longest", fill_color=0)(images)
    assert pixels.shape == (2, 3, 24, 40) and pixels.dtype == np.float32
    red = (1.0 - np.array(Preprocess().mean)) / np.array(Preprocess().std)
    assert np.isclose(pixels[0, 0, 12, 20], red[0], atol=1e-5)  # centre of the red image
    # the grey portrait is letterboxed: its left and right edges are the fill colour (0)
    zero = -np.array(Preprocess().mean) / np.array(Preprocess().std)
    np.testing.assert_allclose(pixels[1, :, 12, 0], zero, atol=1e-5)
    with pytest.raises(ValueError):
        Preprocess()([])
