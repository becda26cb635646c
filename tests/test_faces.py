"""Face detection (MTCNN networks, loading, decoding) and FFHQ-style alignment, without real weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from indexer.errors import ModelUnavailableError, UnsafeCheckpointError
from indexer.face_align import align_face, ffhq_quad
from indexer.faces import describe_faces, load_face_detector
from indexer.mtcnn import DetectedFace, FaceDetector, ONet, PNet, RNet, _nms_min, pyramid_scales
from indexer.settings import Settings

# --- synthetic faces ------------------------------------------------------------------------------------

# Upright synthetic face: eye distance 80, eye-to-mouth 80 (continuous pixel coordinates).
UPRIGHT = np.array([[160.5, 170.5], [240.5, 170.5], [200.5, 210.5], [170.5, 250.5], [230.5, 250.5]])
COLOURS = [(255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 255, 0), (0, 255, 255)]


def _draw_face(size: tuple[int, int], landmarks: np.ndarray, radius: float) -> Image.Image:
    """Grey textured background with one coloured disc per landmark."""
    rng = np.random.default_rng(0)
    noise = rng.integers(90, 140, size=(size[1], size[0], 1), dtype=np.uint8).repeat(3, axis=2)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    for (x, y), colour in zip(landmarks, COLOURS, strict=True):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return img


def _rotate(points: np.ndarray, degrees: float, centre: tuple[float, float]) -> np.ndarray:
    """Where ``points`` go when the image is rotated by PIL's ``rotate(degrees)`` (anticlockwise on screen)."""
    t = math.radians(degrees)
    c = np.array(centre)
    d = points - c
    # Screen y points down: an anticlockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos).
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return d @ rot.T + c


def _blob_centre(
    img: Image.Image,
    colour: tuple[int, int, int],
    near: tuple[float, float] | None = None,
    radius: float = 16,
) -> tuple[float, float]:
    """Centroid (continuous coordinates) of the pixels close to ``colour`` (within ``radius`` of ``near``)."""
    a = np.asarray(img, dtype=np.float32)
    mask = np.abs(a - np.array(colour, dtype=np.float32)).max(axis=2) < 60
    if near is not None:
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        mask &= np.hypot(xx + 0.5 - near[0], yy + 0.5 - near[1]) < radius
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, f"colour {colour} not found"
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def _canonical(size: int) -> dict[str, tuple[float, float]]:
    """FFHQ positions of the eyes of the UPRIGHT face in a size x size crop (from the recipe's numbers)."""
    eye_dist, eye_mouth = 80.0, 80.0
    half = max(2.0 * eye_dist, 1.8 * eye_mouth)  # half-side of the crop square
    scale = size / (2 * half)
    row = size / 2 - 0.1 * eye_mouth * scale  # the crop centre is 0.1 * eye_to_mouth below the eyes
    return {"left": (size / 2 - eye_dist / 2 * scale, row), "right": (size / 2 + eye_dist / 2 * scale, row)}


# --- alignment --------------------------------------------------------------------------------------------


def test_align_face_rotated_20_degrees_comes_out_upright_at_ffhq_eye_positions() -> None:
    img = _draw_face((400, 400), UPRIGHT, radius=6)
    rotated = img.rotate(20, resample=Image.Resampling.BICUBIC, center=(200, 200))
    landmarks = _rotate(UPRIGHT, 20, (200, 200))
    assert landmarks[1, 1] < landmarks[0, 1] - 20  # really tilted: the right eye is well above the left one

    out = align_face(rotated, landmarks.tolist(), size=256)

    assert out.size == (256, 256) and out.mode == "RGB"
    left, right = _blob_centre(out, COLOURS[0]), _blob_centre(out, COLOURS[1])
    canon = _canonical(256)
    assert abs(left[1] - right[1]) < 1.0  # eyes on the same row
    for got, want in ((left, canon["left"]), (right, canon["right"])):
        assert got[0] == pytest.approx(want[0], abs=2.0) and got[1] == pytest.approx(want[1], abs=2.0)
    mouth_left, mouth_right = _blob_centre(out, COLOURS[3]), _blob_centre(out, COLOURS[4])
    assert mouth_left[1] > left[1] + 30 and abs(mouth_left[1] - mouth_right[1]) < 1.0


def test_align_face_quad_leaving_the_image_is_reflect_padded_not_black() -> None:
    # The same face drawn near the top-left corner: its FFHQ square reaches far outside the image.
    shifted = UPRIGHT - np.array([120.0, 130.0])
    img = _draw_face((300, 260), shifted, radius=6)
    quad = ffhq_quad(shifted.tolist())
    assert quad.corners.min() < -100  # the quad leaves the image

    out = align_face(img, shifted.tolist(), size=128)

    assert out.size == (128, 128)
    canon = _canonical(128)
    left = _blob_centre(out, COLOURS[0], near=canon["left"], radius=10)  # the mirror copy lies further left
    assert left[0] == pytest.approx(canon["left"][0], abs=2.0) and left[1] == pytest.approx(
        canon["left"][1], abs=2.0
    )
    corner = np.asarray(out, dtype=np.float32)[:12, :12]  # outside the original image
    assert corner.mean() > 60  # mirrored grey texture, not zeros


def test_align_face_shrinks_large_faces_and_keeps_the_geometry() -> None:
    big = UPRIGHT * 6  # eye distance 480 px in a 2400 px image, aligned to 64 px
    img = _draw_face((2400, 2400), big, radius=36)
    out = align_face(img, big.tolist(), size=64)
    assert out.size == (64, 64)
    canon = _canonical(64)
    right = _blob_centre(out, COLOURS[1])
    assert right[0] == pytest.approx(canon["right"][0], abs=1.5)
    assert right[1] == pytest.approx(canon["right"][1], abs=1.5)


def test_ffhq_quad_side_follows_the_larger_of_eye_and_mouth_distances() -> None:
    wide = ffhq_quad([[0, 0], [100, 0], [50, 30], [40, 50], [60, 50]])  # eyes 100 apart, mouth 50 below
    assert wide.side == pytest.approx(4 * 100)
    long = ffhq_quad([[0, 0], [40, 0], [20, 60], [10, 100], [30, 100]])  # eyes 40 apart, mouth 100 below
    assert long.side == pytest.approx(2 * 1.8 * 100)
    with pytest.raises(ValueError):
        ffhq_quad([[0, 0], [0, 0], [0, 0], [0, 0], [0, 0]])
    with pytest.raises(ValueError):
        ffhq_quad([[0, 0], [1, 1]])


# --- MTCNN: layout and loading ----------------------------------------------------------------------------

# Key layout and shapes of the real MTCNN state dicts (pnet.pt, rnet.pt, onet.pt).
EXPECTED_SHAPES = {
    PNet: {
        "conv1.weight": (10, 3, 3, 3),
        "prelu1.weight": (10,),
        "conv2.weight": (16, 10, 3, 3),
        "conv3.weight": (32, 16, 3, 3),
        "conv4_1.weight": (2, 32, 1, 1),
        "conv4_2.weight": (4, 32, 1, 1),
    },
    RNet: {
        "conv1.weight": (28, 3, 3, 3),
        "conv2.weight": (48, 28, 3, 3),
        "conv3.weight": (64, 48, 2, 2),
        "dense4.weight": (128, 576),
        "prelu4.weight": (128,),
        "dense5_1.weight": (2, 128),
        "dense5_2.weight": (4, 128),
    },
    ONet: {
        "conv1.weight": (32, 3, 3, 3),
        "conv3.weight": (64, 64, 3, 3),
        "conv4.weight": (128, 64, 2, 2),
        "dense5.weight": (256, 1152),
        "prelu5.weight": (256,),
        "dense6_1.weight": (2, 256),
        "dense6_2.weight": (4, 256),
        "dense6_3.weight": (10, 256),
    },
}


@pytest.mark.parametrize("net_cls", [PNet, RNet, ONet])
def test_mtcnn_networks_have_the_real_weight_files_key_layout(net_cls: type[nn.Module]) -> None:
    state = net_cls().state_dict()
    for key, shape in EXPECTED_SHAPES[net_cls].items():
        assert tuple(state[key].shape) == shape
    n_params = {PNet: 13, RNet: 16, ONet: 21}[net_cls]
    assert len(state) == n_params


def _save_nets(folder: Path, seed: int = 0, *, confident: bool = False) -> None:
    """Randomly initialised MTCNN saved like the real files; ``confident`` makes R-Net/O-Net say "face"
    everywhere with zero box regression and fixed landmark fractions."""
    torch.manual_seed(seed)
    pnet, rnet, onet = PNet(), RNet(), ONet()
    if confident:
        with torch.no_grad():
            for head, reg in ((rnet.dense5_1, rnet.dense5_2), (onet.dense6_1, onet.dense6_2)):
                head.weight.zero_()
                head.bias.copy_(torch.tensor([-8.0, 8.0]))
                reg.weight.zero_()
                reg.bias.zero_()
            onet.dense6_3.weight.zero_()
            onet.dense6_3.bias.copy_(torch.tensor(LANDMARK_FRACTIONS))
    folder.mkdir(parents=True, exist_ok=True)
    for name, net in (("pnet.pt", pnet), ("rnet.pt", rnet), ("onet.pt", onet)):
        torch.save(net.state_dict(), folder / name)


# 5 x-fractions then 5 y-fractions of the O-Net window.
LANDMARK_FRACTIONS = [0.3, 0.7, 0.5, 0.35, 0.65, 0.35, 0.35, 0.55, 0.8, 0.8]


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_from_dir_loads_random_weights_and_detect_returns_a_well_formed_list(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    detector = FaceDetector.from_dir(tmp_path)
    image = _noise_image(120, 90, seed=1)
    faces = detector.detect(image)
    assert isinstance(faces, list)
    assert all(isinstance(f, DetectedFace) for f in faces)

    loose = FaceDetector(detector.pnet, detector.rnet, detector.onet, thresholds=(0.0, 0.0, 0.0))
    faces = loose.detect(image, min_face_size=30)
    assert faces, "with zero thresholds every stage keeps candidates"
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    for face in faces:
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90
        assert len(face.landmarks) == 5 and all(len(p) == 2 for p in face.landmarks)
        assert 0.0 <= face.score <= 1.0


def test_onet_landmarks_are_x_fractions_then_y_fractions_of_the_window(tmp_path: Path) -> None:
    _save_nets(tmp_path, confident=True)
    detector = FaceDetector.from_dir(tmp_path)
    detector.thresholds = (0.0, 0.7, 0.7)
    image = _noise_image(100, 80, seed=2)
    faces = detector.detect(image, min_face_size=30)
    inside = [f for f in faces if f.box[0] > 0 and f.box[1] > 0 and f.box[2] < 100 and f.box[3] < 80]
    assert inside, "expected unclipped windows"
    for face in inside:
        assert face.score == pytest.approx(1.0, abs=1e-4)
        x1, y1, x2, y2 = face.box
        points = np.array(face.landmarks)  # [5, 2]
        np.testing.assert_allclose((points[:, 0] - x1) / (x2 - x1), LANDMARK_FRACTIONS[:5], atol=1e-4)
        np.testing.assert_allclose((points[:, 1] - y1) / (y2 - y1), LANDMARK_FRACTIONS[5:], atol=1e-4)


def test_detect_batch_matches_detect_per_image_for_mixed_sizes(tmp_path: Path) -> None:
    _save_nets(tmp_path, seed=3)
    base = FaceDetector.from_dir(tmp_path)
    detector = FaceDetector(base.pnet, base.rnet, base.onet, thresholds=(0.3, 0.3, 0.3))
    images = [_noise_image(64, 64, 4), _noise_image(90, 56, 5), _noise_image(64, 64, 6)]
    batched = detector.detect_batch(images, min_face_size=24)
    single = [detector.detect(im, min_face_size=24) for im in images]
    assert [len(b) for b in batched] == [len(s) for s in single]
    for b_faces, s_faces in zip(batched, single, strict=True):
        for b, s in zip(b_faces, s_faces, strict=True):
            np.testing.assert_allclose(b.box, s.box, atol=1e-3)
            assert b.score == pytest.approx(s.score, abs=1e-5)


def test_detect_on_an_image_smaller_than_the_minimum_face_returns_empty(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    detector = FaceDetector.from_dir(tmp_path)
    assert detector.detect(_noise_image(15, 15, 0)) == []


def test_missing_weight_file_raises_model_unavailable_naming_it_and_the_setting(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    (tmp_path / "onet.pt").unlink()
    with pytest.raises(ModelUnavailableError) as info:
        FaceDetector.from_dir(tmp_path)
    assert "onet.pt" in str(info.value) and "SLEUTH_FACE_DETECTOR" in str(info.value)


def test_weight_file_with_the_wrong_layout_raises_model_unavailable(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    torch.save(PNet().state_dict(), tmp_path / "rnet.pt")
    with pytest.raises(ModelUnavailableError, match="rnet.pt"):
        FaceDetector.from_dir(tmp_path)


class _NotATensor:
    pass


def test_weight_file_holding_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / "pnet.pt")
    with pytest.raises(UnsafeCheckpointError):
        FaceDetector.from_dir(tmp_path)


def test_load_face_detector_without_a_configured_folder_names_the_setting() -> None:
    with pytest.raises(ModelUnavailableError, match="SLEUTH_FACE_DETECTOR"):
        load_face_detector(Settings.model_validate({"face_detector": None}))


def test_load_face_detector_reads_the_folder_from_settings(tmp_path: Path) -> None:
    _save_nets(tmp_path)
    detector = load_face_detector(Settings.model_validate({"face_detector": tmp_path, "device": "cpu"}))
    assert isinstance(detector, FaceDetector)


# --- MTCNN: pyramid and suppression -----------------------------------------------------------------------


def test_pyramid_starts_at_12_over_min_face_and_shrinks_by_0709_down_to_12_pixels() -> None:
    scales = pyramid_scales(200, 300, min_face_size=20)
    assert scales[0] == pytest.approx(0.6)
    for a, b in zip(scales, scales[1:], strict=False):
        assert b / a == pytest.approx(0.709)
    assert 200 * scales[-1] >= 12 > 200 * scales[-1] * 0.709
    assert pyramid_scales(10, 10, min_face_size=20) == []


def test_final_nms_uses_overlap_over_the_smaller_box_and_keeps_images_apart() -> None:
    boxes = torch.tensor(
        [[0, 0, 100, 100], [10, 10, 40, 40], [0, 0, 100, 100], [200, 200, 260, 260]], dtype=torch.float
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    groups = torch.tensor([0, 0, 1, 0])
    keep = _nms_min(boxes, scores, groups, 0.7).tolist()
    # Box 1 lies inside box 0 (IoU 0.09 but overlap/min-area 1.0): suppressed. Box 2 is another image's.
    assert keep == [0, 2, 3]


# --- describe_faces ----------------------------------------------------------------------------------------


def test_describe_faces_returns_aligned_crops_for_confident_faces_only(tmp_path: Path) -> None:
    _save_nets(tmp_path, confident=True)
    detector = FaceDetector.from_dir(tmp_path)
    detector.thresholds = (0.0, 0.7, 0.7)
    image = _noise_image(80, 60, seed=7)

    described = describe_faces(image, detector, size=64, max_faces=3, min_score=0.9, min_face_size=30)
    assert 1 <= len(described) <= 3
    for face, crop in described:
        assert face.score >= 0.9
        assert crop.size == (64, 64) and crop.mode == "RGB"
    assert describe_faces(image, detector, size=64, min_score=1.01, min_face_size=30) == []
