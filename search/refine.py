"""The refine tier: projection evidence for the faces of a query, merged into a search result document.

``refine_json`` finds the query's faces (MTCNN when ``SLEUTH_FACE_DETECTOR`` is set; otherwise a square image is
taken as one face), prepares each for every registered generator with the one face-preparation path
(``projection.face_prep.prepare_face``: the generator's own framing, the face's effective size, the query's JPEG
quality; the best face is prepared exactly as ``sleuth project`` prepares it, so one file gives one set of
numbers), projects them (warm-started from the stored latents of the generated-image hits of the search, when
there are any) and adds the evidence as ``faces[i]["projection"]``: a list with one entry per generator
(generator, lpips, probability_generated, latent_matches, reconstruction / difference / target as PNG data URIs,
steps, seconds, how the face was prepared).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from indexer.decode import DecodedImage
from indexer.errors import ModelUnavailableError
from indexer.settings import Settings
from indexer.store.db import Store
from indexer.store.models import Latent
from projection.evidence import face_template_of, project_faces
from projection.face_prep import PreparedFace, detect_faces, prepare_face
from projection.images import png_data_uri
from projection.registry import GeneratorInfo, list_generators, load_generator

logger = logging.getLogger(__name__)

MAX_FACES = 8
MAX_WARM_STARTS = 3  # stored latents of generated hits tried per face, besides the mean latent

_DETECTORS: dict[str, Any] = {}
_DETECTOR_LOCK = threading.Lock()


def _detector(settings: Settings) -> Any | None:
    if settings.face_detector is None:
        return None
    key = f"{settings.face_detector}|{settings.device}"
    with _DETECTOR_LOCK:
        if key not in _DETECTORS:
            from indexer.faces import load_face_detector

            _DETECTORS[key] = load_face_detector(settings)
        return _DETECTORS[key]


def _iou(a: list[float], b: list[float]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _faces_of(
    image: Image.Image, settings: Settings, base_faces: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[Any], str]:
    """(face entries, the detected face per entry or None for the whole image, how they were found)."""
    detector = _detector(settings)
    if detector is not None:
        detected = detect_faces(image, detector)[:MAX_FACES]
        entries: list[dict[str, Any]] = []
        for face in detected:
            box = [round(v, 1) for v in face.box]
            same = [f for f in base_faces if isinstance(f.get("box"), list) and _iou(f["box"], box) > 0.5]
            entries.append(same[0] if same else {"box": box, "score": round(float(face.score), 4)})
        return entries, list(detected), "mtcnn"
    if image.width == image.height:
        entry = (
            base_faces[0]
            if len(base_faces) == 1
            else {"box": [0.0, 0.0, float(image.width), float(image.height)]}
        )
        return [entry], [None], "whole-image"
    return [], [], "none"


def _prepared_for(
    settings: Settings, store: Store, info: GeneratorInfo, decoded: DecodedImage, detected: list[Any]
) -> list[PreparedFace]:
    """Each detected face (None: the whole image) prepared for generator ``info`` as ``sleuth project`` does."""
    generator, _ = load_generator(settings, info.name, device=settings.device, store=store)
    detector = _detector(settings)
    template = face_template_of(settings, info, generator, detector, store=store)
    return [
        prepare_face(decoded.image, generator.resolution, template=template, detector=detector,
                     jpeg_quality=decoded.jpeg_quality, face=face)
        for face in detected
    ]  # fmt: skip


def _warm_starts(store: Store, generator: str, space: str, base: Mapping[str, Any]) -> np.ndarray | None:
    """Stored latents of the generated-image hits (best first) for ``generator`` in ``space``."""
    hit_ids = [
        int(h["image_id"])
        for h in base.get("hits") or []
        if isinstance(h, Mapping) and h.get("label") == "generated" and h.get("image_id") is not None
    ]
    if not hit_ids:
        return None
    with store.session() as s:
        rows = dict(
            s.execute(
                select(Latent.image_id, Latent.vector).where(
                    Latent.image_id.in_(hit_ids), Latent.generator == generator, Latent.space == space
                )
            ).all()
        )
    vecs = [np.frombuffer(rows[i], dtype=np.float32) for i in hit_ids if i in rows][:MAX_WARM_STARTS]
    return np.stack(vecs) if vecs else None


def _project_into(
    settings: Settings,
    store: Store,
    info: GeneratorInfo,
    faces: list[PreparedFace],
    starts: np.ndarray | None,
) -> list[dict[str, Any]]:
    per_face = [starts for _ in faces] if starts is not None else None
    try:
        evidence = project_faces(settings, faces, info.name, starts=per_face, store=store)
    except (ValueError, RuntimeError) as exc:  # stored latents of another shape: the mean latent only
        logger.warning("warm starts for %s not usable (%s); default starts only", info.name, exc)
        evidence = project_faces(settings, faces, info.name, store=store)
    docs = []
    for face, ev in zip(faces, evidence, strict=True):
        doc = ev.to_json(images="data-uri")
        doc.pop("loss_trace", None)
        doc["target"] = png_data_uri(face.image)
        docs.append(doc)
    return docs


def refine_json(
    settings: Settings, decoded: DecodedImage, base: Mapping[str, Any], *, store: Store
) -> dict[str, Any]:
    """``base`` (a ``result_to_json`` document) with projection evidence for each face and a ``refine`` state."""
    out = dict(base)
    started = time.perf_counter()
    generators = list_generators(settings, store=store)
    if not generators:
        out["refine"] = {
            "status": "unavailable",
            "reason": "no generator is registered (sleuth generators add NAME PATH --family ...)",
        }
        return out
    base_faces = [dict(f) for f in base.get("faces") or [] if isinstance(f, Mapping)]
    try:
        entries, landmarks, how = _faces_of(decoded.image, settings, base_faces)
    except ModelUnavailableError as exc:
        out["refine"] = {"status": "unavailable", "reason": str(exc)}
        return out
    if not entries:
        reason = (
            "no face found" if how != "none" else "no face detector configured and the image is not square"
        )
        out["refine"] = {"status": "no_face", "reason": reason, "generators": [g.name for g in generators]}
        return out
    for entry in entries:
        entry["projection"] = []
    try:
        for info in generators:
            faces = _prepared_for(settings, store, info, decoded, landmarks)
            starts = _warm_starts(store, info.name, info.latent_space, base)
            for entry, doc in zip(entries, _project_into(settings, store, info, faces, starts), strict=True):
                entry["projection"].append(doc)
    except ModelUnavailableError as exc:
        out["refine"] = {"status": "unavailable", "reason": str(exc)}
        return out
    others = [f for f in base_faces if all(f is not e for e in entries)]
    out["faces"] = entries + others
    out["refine"] = {
        "status": "done",
        "generators": [g.name for g in generators],
        "faces": len(entries),
        "face_source": how,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out
