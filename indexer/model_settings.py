"""What each model setting points to, and a check that loads each configured model once."""

from __future__ import annotations

import logging
from typing import Any

from indexer.errors import SleuthError
from indexer.settings import Settings

log = logging.getLogger(__name__)


def configured_models(settings: Settings) -> list[dict[str, Any]]:
    return [
        {"role": "clip", "setting": "SLEUTH_CLIP_MODEL", "value": settings.clip_model},
        {"role": "face_detector", "setting": "SLEUTH_FACE_DETECTOR", "value": _str(settings.face_detector)},
        {"role": "lpips", "setting": "SLEUTH_LPIPS_WEIGHTS", "value": _str(settings.lpips_weights)},
        {"role": "face_identity", "setting": "SLEUTH_FACE_MODEL", "value": settings.face_model},
    ]


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _check_clip(settings: Settings) -> tuple[bool, str]:
    from indexer.embedders import load_embedder

    assert settings.clip_model
    embedder = load_embedder(settings.clip_model, device=settings.device)
    return True, f"{embedder.model_id}: dim {embedder.dim}, weights sha256 {embedder.weights_sha256[:12]}"


def _check_faces(settings: Settings) -> tuple[bool, str]:
    from indexer.faces import FaceDetector

    assert settings.face_detector
    FaceDetector.from_dir(settings.face_detector, device=settings.device)
    return True, f"MTCNN weights in {settings.face_detector}"


def _check_lpips(settings: Settings) -> tuple[bool, str]:
    from safetensors import safe_open

    from indexer.errors import ModelUnavailableError

    assert settings.lpips_weights
    if not settings.lpips_weights.exists():
        raise ModelUnavailableError(
            f"SLEUTH_LPIPS_WEIGHTS points to {settings.lpips_weights}, which does not exist"
        )
    with safe_open(str(settings.lpips_weights), framework="pt") as fh:
        keys = list(fh.keys())
    lin = [k for k in keys if k.startswith("lin")]
    return bool(lin), f"{len(keys)} tensors ({len(lin)} LPIPS linear layers)"


def _check_face_identity(settings: Settings) -> tuple[bool, str]:
    from indexer.face_identity import load_face_model

    assert settings.face_model
    model = load_face_model(settings.face_model)
    return True, f"{model.model_id}: dim {model.dim}, weights sha256 {model.weights_sha256[:12]}"


def check_models(settings: Settings) -> list[dict[str, Any]]:
    checks = {
        "clip": _check_clip, "face_detector": _check_faces, "lpips": _check_lpips,
        "face_identity": _check_face_identity,
    }  # fmt: skip
    results = []
    for model in configured_models(settings):
        entry = dict(model, ok=False, message="not configured")
        if model["value"]:
            try:
                entry["ok"], entry["message"] = checks[model["role"]](settings)
            except (SleuthError, OSError, ValueError) as exc:
                entry["message"] = str(exc)
        results.append(entry)
    return results
