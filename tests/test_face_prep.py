"""The one face-preparation path (framing by the generator's template, effective size, masks) and the evidence
comparison at the query's effective resolution. The detector is a stand-in that reports given landmarks, so the
geometry is tested exactly; MTCNN itself is tested in test_faces.py."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.decode import decode_image, estimate_jpeg_quality, ijg_luminance_table
from projection.dcgan import DCGANGenerator
from projection.face_prep import (
    FaceTemplate,
    measure_face_template,
    prepare_face,
    similarity_transform,
    whole_image_framing,
)
from projection.images import jpeg_round_trip, to_image, to_tensor
from projection.scoring import degrade_like_query, evidence_scores
from tests.tiny_generators import lpips_file_fixture, one_torch_thread_fixture  # noqa: F401

TEMPLATE = FaceTemplate(
    landmarks=[[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]], spread=0.02, samples=50,
    detected=50, framing_mean=[0.0, 0.0, 0.0, 0.0], framing_std=[0.02, 1.0, 0.01, 0.01],
)  # fmt: skip


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 0.99


class StandInDetector:
    """Reports the template's landmarks mapped by ``transform`` (2x3, template pixels of a ``side`` image -> the
    image's pixels): a face exactly where it is drawn."""

    def __init__(self, side: int, transform: np.ndarray | None = None) -> None:
        self.side, self.transform = side, transform if transform is not None else np.eye(2, 3)
        self.calls = 0

    def detect(self, image: Image.Image) -> list[Face]:
        self.calls += 1
        scale = image.width / self.side
        pts = TEMPLATE.points(self.side) @ self.transform[:, :2].T + self.transform[:, 2]  # [5, 2]
        pts = pts * scale
        x0, y0 = pts.min(axis=0) - 10
        x1, y1 = pts.max(axis=0) + 10
        return [
            Face((float(x0), float(y0), float(x1), float(y1)), tuple((float(x), float(y)) for x, y in pts))
        ]


def _picture(side: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)


def test_similarity_transform_recovers_scale_rotation_and_shift_exactly() -> None:
    angle = math.radians(12.0)
    truth = np.array([[1.7 * math.cos(angle), -1.7 * math.sin(angle), 4.0],
                      [1.7 * math.sin(angle), 1.7 * math.cos(angle), -9.0]])  # fmt: skip
    src = TEMPLATE.points(100)
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-9)


def test_a_face_in_the_generators_framing_is_taken_as_an_aligned_crop_at_any_size() -> None:
    for side in (32, 64, 256):
        image = _picture(side)
        face = prepare_face(image, 64, template=TEMPLATE, detector=StandInDetector(side), jpeg_quality=70)
        assert face.how == "aligned-crop" and face.image.size == (64, 64)
        assert face.size() == min(side, 64) and face.jpeg_quality == 70 and face.padded_fraction == 0.0
        if side <= 64:  # not resampled twice: the comparison image is the query's own pixels
            assert face.comparison_image().tobytes() == image.tobytes()


def test_a_face_in_another_framing_is_warped_onto_the_template_and_its_missing_border_padded() -> None:
    side = 200
    angle = math.radians(15.0)
    # the face is drawn rotated, at 1.5x the template's size, off-centre: a photo, not the generator's framing
    forward = np.array([[1.5 * math.cos(angle), -1.5 * math.sin(angle), -20.0],
                        [1.5 * math.sin(angle), 1.5 * math.cos(angle), -60.0]])  # fmt: skip
    detector = StandInDetector(side, forward)
    image = _picture(side, seed=1)
    face = prepare_face(image, 64, template=TEMPLATE, detector=detector)
    assert face.how == "template-aligned" and face.image.size == (64, 64)
    assert face.transform["rotation"] == pytest.approx(-15.0, abs=1e-6)
    assert face.transform["source_side"] == pytest.approx(300.0, abs=0.2)  # 1.5 x 200 source pixels per side
    assert face.size() == 64  # at most the generator's resolution
    assert 0.05 < face.padded_fraction < 0.9  # the face square leaves the image: reflect-padded, not black
    corner = np.asarray(face.image, dtype=np.float64)[:4, :4].mean()
    assert corner > 5.0  # the padding holds (blurred) image content
    # the warp puts the face's landmarks on the template: re-detecting on the aligned face finds the template
    landmarks = np.asarray(detector.detect(image)[0].landmarks)
    again = similarity_transform(landmarks, TEMPLATE.points(64))
    np.testing.assert_allclose(again[:, :2], np.array([[math.cos(-angle), -math.sin(-angle)],
                                                       [math.sin(-angle), math.cos(-angle)]]) / 1.5 * (64 / 200),
                               atol=1e-6)  # fmt: skip
    small = prepare_face(image.resize((40, 40)), 64, template=TEMPLATE, detector=StandInDetector(40, forward))
    assert small.how == "template-aligned" and small.size() == 60  # 1.5 x 40: below 64, kept at its own size


def test_without_a_detector_or_a_face_squares_are_taken_whole_and_others_by_their_centre() -> None:
    class NoFace:
        def detect(self, image: Image.Image) -> list[Face]:
            return []

    square = prepare_face(_picture(48), 64, template=TEMPLATE, detector=NoFace())
    assert square.how == "whole-image" and square.size() == 48 and square.box is None
    wide = prepare_face(Image.new("RGB", (90, 30)), 64)
    assert wide.how == "centre-crop" and wide.size() == 30


def test_the_framing_of_the_plain_resize_is_zero() -> None:
    image = _picture(128)
    forward = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])  # 128 px -> 64 px, nothing else
    np.testing.assert_allclose(whole_image_framing(forward, image, 64), [0.0, 0.0, 0.0, 0.0], atol=1e-12)


def test_the_face_template_is_the_mean_of_the_generators_own_samples() -> None:
    generator = DCGANGenerator.from_preset("tiny", seed=1)
    detector = StandInDetector(16)
    template = measure_face_template(generator, detector, samples=8)
    assert template is not None and template.detected == 8 and detector.calls == 8
    np.testing.assert_allclose(template.landmarks, TEMPLATE.landmarks, atol=1e-4)
    assert template.framing_mean == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-4)

    class NoFace:
        def detect(self, image: Image.Image) -> list[Face]:
            return []

    assert (
        measure_face_template(generator, NoFace(), samples=6) is None
    )  # no framing MTCNN knows: no template


def test_jpeg_quality_is_read_off_the_quantisation_tables() -> None:
    image = _picture(64)
    for quality in (20, 50, 75, 95):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        assert decode_image(buf.getvalue()).jpeg_quality == quality
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert decode_image(png.getvalue()).jpeg_quality is None
    assert estimate_jpeg_quality({0: [int(v) for v in ijg_luminance_table(60)]}) == 60
    assert estimate_jpeg_quality(None) is None


def test_the_evidence_compares_at_the_querys_effective_size_and_quality(lpips_file: object) -> None:
    from projection.lpips_loader import load_lpips

    lpips = load_lpips(lpips_file)  # type: ignore[arg-type]
    original = _picture(64, seed=3)
    buf = io.BytesIO()
    original.resize((24, 24), Image.Resampling.BOX).save(
        buf, format="JPEG", quality=40
    )  # shared small, blocky
    query = decode_image(buf.getvalue())
    face = prepare_face(query.image, 64, jpeg_quality=query.jpeg_quality)
    assert face.size() == 24 and face.jpeg_quality == 40
    truth = to_tensor([original])[0]
    degraded = degrade_like_query(truth, face)
    assert degraded.shape == (3, 24, 24)
    other = to_tensor([_picture(64, seed=4)])[0]
    (lp_truth, mse_truth), (lp_other, mse_other) = evidence_scores(lpips, [truth, other], [face, face])
    assert mse_truth < 0.1 * mse_other and lp_truth < 0.5 * lp_other
    # compared the naive way (the query enlarged to 64 px against the sharp reconstruction) the true face is
    # further from its own query than the effective-size comparison finds it
    enlarged = to_tensor([face.image])[None][0]
    with torch.no_grad():
        naive = float(lpips(truth[None], enlarged))
    assert lp_truth < naive


def test_an_enlarged_jpeg_face_is_re_encoded_where_its_blocks_are_at_the_querys_side() -> None:
    original = _picture(64, seed=5)
    buf = io.BytesIO()
    original.resize((256, 256), Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=50)
    query = decode_image(buf.getvalue())
    face = prepare_face(query.image, 64, jpeg_quality=query.jpeg_quality)
    assert face.size() == 64 and face.query_side() == 256 and face.to_json()["source_side"] == 256
    target = to_tensor([face.comparison_image()])[0]
    degraded = degrade_like_query(to_tensor([original])[0], face)
    assert degraded.shape == (3, 64, 64)
    # the old way, re-encoding at the effective size, puts q50 blocks on 64 px the query never had
    small = to_tensor([jpeg_round_trip(to_image(to_tensor([original])[0]), 50)])[0]
    assert (degraded - target).square().mean() < 0.5 * (small - target).square().mean()
