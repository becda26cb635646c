"""The describe step of ingest: one image's bytes -> decode, hashes, thumbnail, CLIP vector, faces.

One function for every runner: the plain ingest (``indexer.ingest``, threads in one process), the local-process
pool and the Ray actors (``indexer.ingest_parallel``). The plain runner describes the pixels in threads and
leaves the model outputs to the writer (so it embeds only images the store does not know yet); the parallel
runners call :class:`Describer` in their workers, which load the models once and describe everything, so the
single writer only writes. What travels back from a worker is plain data (no PIL image, no model object).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage

from indexer.decode import DecodedImage, decode_image
from indexer.errors import DecodeError, SleuthError, SourceError
from indexer.hashes import PerceptualHashes, compute_hashes
from indexer.settings import Limits

if TYPE_CHECKING:
    from indexer.embedders import ImageEmbedder
    from indexer.face_identity import FaceEmbedder
    from indexer.faces import FaceDetector

log = logging.getLogger(__name__)

THUMB_SIDE = 512


@dataclass(frozen=True)
class FoundFace:
    """One detected face with its face-tier vector (``[dim]`` unit float32)."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float
    vector: np.ndarray


@dataclass
class Described:
    """What the describe step knows of one item: either the image's description or why it failed."""

    key: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    num_bytes: int = 0
    hashes: PerceptualHashes | None = None
    thumbnail: bytes | None = None  # JPEG, THUMB_SIDE max; None when the caller already has it
    image: PILImage.Image | None = None  # the decoded pixels, kept only inside the process that decoded them
    vector: np.ndarray | None = None  # CLIP, [dim] float32 (None: not computed here)
    faces: list[FoundFace] | None = None  # None: not computed here; [] none found
    error_reason: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error_reason is None

    @property
    def nbytes(self) -> int:
        """The decoded pixels this description holds until its batch is written (0 once sent without them)."""
        if self.image is None:
            return 0
        width, height = self.image.size
        return width * height * 3

    def without_pixels(self) -> Described:
        """The same description without the decoded image (what a worker sends back)."""
        self.image = None
        return self


def failed(key: str, error: SleuthError) -> Described:
    return Described(
        key, error_reason=getattr(error, "reason", "source_error"), error_detail=str(error)[:2000]
    )


def thumbnail_jpeg(image: PILImage.Image) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def describe_bytes(
    key: str, data: bytes, *, limits: Limits, has_thumbnail: Callable[[str], bool] | None = None
) -> Described:
    """Decode, hash and thumbnail one image (no model). A bad image is a ``Described`` with its reason."""
    try:
        decoded: DecodedImage = decode_image(data, limits=limits)
        hashes = compute_hashes(decoded.image)
    except (DecodeError, SourceError) as exc:
        return failed(key, exc)
    thumb = (
        None if has_thumbnail is not None and has_thumbnail(decoded.sha256) else thumbnail_jpeg(decoded.image)
    )
    return Described(
        key, decoded.sha256, decoded.width, decoded.height, decoded.format, decoded.num_bytes, hashes,
        thumb, decoded.image,
    )  # fmt: skip


def describe_read(
    key: str, read: Callable[[], bytes], *, limits: Limits, has_thumbnail: Callable[[str], bool] | None = None
) -> Described:
    """``describe_bytes`` of what ``read`` returns; an unreadable item is a ``Described`` with its reason."""
    try:
        data = read()
    except SourceError as exc:
        return failed(key, exc)
    except OSError as exc:
        return failed(key, SourceError(f"cannot read {key}: {exc}"))
    return describe_bytes(key, data, limits=limits, has_thumbnail=has_thumbnail)


def embed_into(described: Sequence[Described], embedder: ImageEmbedder) -> None:
    """Set ``vector`` of each (decoded) description: one batched CLIP call."""
    todo = [d for d in described if d.image is not None]
    if not todo:
        return
    out = embedder.embed([d.image for d in todo if d.image is not None])  # [n, dim]
    assert out.shape[0] == len(todo), (out.shape, len(todo))
    for d, vec in zip(todo, out, strict=True):
        d.vector = np.asarray(vec, dtype=np.float32)


def faces_into(described: Sequence[Described], detector: FaceDetector, face_embedder: FaceEmbedder) -> None:
    """Set ``faces`` of each (decoded) description: detect, align, embed (``indexer.faces``)."""
    from indexer.faces import describe_faces

    for d in described:
        if d.image is None:
            continue
        found = describe_faces(d.image, detector)
        vecs = face_embedder.embed_faces(d.image, found) if found else np.empty((0, face_embedder.dim))
        d.faces = [
            FoundFace(face.box, face.landmarks, float(face.score), np.asarray(vec, dtype=np.float32))
            for (face, _), vec in zip(found, vecs, strict=True)
        ]


@dataclass(frozen=True)
class ModelIdentity:
    """What the writer and the index specs need of a model that runs elsewhere (in a worker)."""

    model_id: str
    model_key: str
    dim: int
    weights_sha256: str
    identity: bool = False


def identity_of(model: Any) -> ModelIdentity:
    return ModelIdentity(
        model.model_id,
        model.model_key,
        int(model.dim),
        model.weights_sha256,
        bool(getattr(model, "identity", False)),
    )


@dataclass(frozen=True)
class DescribeConfig:
    """Everything a worker needs to load the models and describe like the writer's settings say (plain data)."""

    limits: Limits
    clip_model: str | None = None
    face_detector: str | None = None
    face_model: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    threads: int | None = None  # intra-op threads of each worker's models


@dataclass
class Describer:
    """A worker's state: the models, loaded once; ``describe`` is the whole per-batch work of a worker."""

    config: DescribeConfig
    embedder: Any = None
    detector: Any = None
    face_embedder: Any = None
    identities: dict[str, ModelIdentity] = field(default_factory=dict)

    @classmethod
    def load(cls, config: DescribeConfig) -> Describer:
        from indexer.face_identity import face_embedder_for, load_face_model

        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        embedder = detector = face_model = None
        if config.clip_model:
            from indexer.embedders import load_embedder

            embedder = load_embedder(
                config.clip_model, device=config.device, batch_size=config.batch_size, threads=config.threads
            )
        if config.face_detector:
            from indexer.faces import FaceDetector

            detector = FaceDetector.from_dir(config.face_detector, device=config.device)
            face_model = load_face_model(config.face_model) if config.face_model else None
        face_embedder = face_embedder_for(face_model, embedder) if detector is not None else None
        identities = {}
        if embedder is not None:
            identities["clip"] = identity_of(embedder)
        if face_embedder is not None:
            identities["faces"] = identity_of(face_embedder)
        return cls(config, embedder, detector, face_embedder, identities)

    def describe(self, items: Sequence[tuple[str, bytes | None, str | None]]) -> list[Described]:
        """Describe a batch of ``(key, bytes, read error)``: decode, hashes, thumbnail, CLIP, faces."""
        out = []
        for key, data, read_error in items:
            if data is None:
                out.append(failed(key, SourceError(read_error or f"cannot read {key}")))
            else:
                out.append(describe_bytes(key, data, limits=self.config.limits))
        good = [d for d in out if d.ok]
        if self.embedder is not None:
            embed_into(good, self.embedder)
        if self.detector is not None and self.face_embedder is not None:
            faces_into(good, self.detector, self.face_embedder)
        return [d.without_pixels() for d in out]
