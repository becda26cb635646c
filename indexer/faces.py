"""Faces of an image: detection (MTCNN, :mod:`indexer.mtcnn`) and FFHQ-style alignment
(:mod:`indexer.face_align`), put together for ingest, query and projection."""

from __future__ import annotations

import logging

from PIL import Image

from indexer.errors import ModelUnavailableError
from indexer.face_align import AlignQuad, align_face, ffhq_quad
from indexer.mtcnn import DetectedFace, FaceDetector
from indexer.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def load_face_detector(settings: Settings | None = None, *, device: str | None = None) -> FaceDetector:
    """The MTCNN detector from ``settings.face_detector`` (``SLEUTH_FACE_DETECTOR``) on ``settings.device``."""
    settings = settings or get_settings()
    if settings.face_detector is None:
        raise ModelUnavailableError(
            "no face detector configured: set SLEUTH_FACE_DETECTOR to a folder with pnet.pt, rnet.pt, onet.pt"
        )
    return FaceDetector.from_dir(settings.face_detector, device=device or settings.device)


def describe_faces(
    image: Image.Image,
    detector: FaceDetector,
    *,
    size: int = 224,
    max_faces: int = 8,
    min_score: float = 0.9,
    min_face_size: int = 20,
) -> list[tuple[DetectedFace, Image.Image]]:
    """Each confident face of ``image`` (best score first, at most ``max_faces``) with its aligned RGB
    ``size`` x ``size`` crop, ready to embed."""
    if max_faces < 1:
        return []
    faces = [f for f in detector.detect(image, min_face_size=min_face_size) if f.score >= min_score]
    described: list[tuple[DetectedFace, Image.Image]] = []
    for face in faces[:max_faces]:
        try:
            crop = align_face(image, face.landmarks, size=size)
        except ValueError as exc:  # degenerate landmarks: the face cannot be aligned, skip it
            logger.warning("skipping face at %s: %s", face.box, exc)
            continue
        described.append((face, crop))
    return described


__all__ = [
    "AlignQuad",
    "DetectedFace",
    "FaceDetector",
    "align_face",
    "describe_faces",
    "ffhq_quad",
    "load_face_detector",
]
