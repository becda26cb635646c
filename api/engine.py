"""What the API loads once at start-up: the store, models and searcher; searches, refines and ingests.

The searcher is ``search.query.Searcher`` (every tier the configured models allow). After an ingest (in
this process or in another worker), the saved indexes change; ``maybe_reload`` notices
(the index info files' modification times) and swaps in a fresh searcher, so new images are found.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from pathlib import Path
from typing import Any

from api.settings import ApiSettings
from indexer.decode import DecodedImage
from indexer.settings import Settings
from indexer.store.db import Store, open_store
from search.hit_filters import HitFilter
from search.query import Searcher, result_to_json

log = logging.getLogger(__name__)


def load_embedder(settings: Settings) -> Any:
    """The configured CLIP embedder, or None when none is configured (copy detection still works)."""
    if not settings.clip_model:
        return None
    from indexer.embedders import load_embedder as load

    return load(settings.clip_model, device=settings.device, batch_size=settings.batch_size)


def load_face_detector(settings: Settings) -> Any:
    if not settings.face_detector:
        return None
    from indexer.faces import FaceDetector

    return FaceDetector.from_dir(settings.face_detector, device=settings.device)


def load_face_model(settings: Settings) -> Any:
    """The configured face identity model (``SLEUTH_FACE_MODEL``), or None (faces then go through CLIP)."""
    if not settings.face_model:
        return None
    from indexer.face_identity import load_face_model as load

    return load(settings.face_model)


class Engine:
    """Models, store and searcher of one server (or worker) process; thread-safe searches."""

    def __init__(self, settings: Settings, api_settings: ApiSettings, *, store: Store | None = None) -> None:
        self.settings, self.api_settings = settings, api_settings
        self.store = store or open_store(settings)
        self.embedder = load_embedder(settings)
        self.face_detector = load_face_detector(settings)
        self.face_model = load_face_model(settings)
        self._lock = threading.Lock()
        self._signature = self._index_signature()
        self._last_check = time.monotonic()
        self.searcher: Searcher = self._open_searcher()
        self.loaded_at = dt.datetime.now(dt.UTC)

    # --- searcher ---------------------------------------------------------------------------------
    @property
    def searcher_kind(self) -> str:
        return type(self.searcher).__module__ + "." + type(self.searcher).__name__

    def _open_searcher(self) -> Searcher:
        return Searcher.open(
            self.settings, clip_model=self.embedder, face_detector=self.face_detector, store=self.store,
            face_model=self.face_model,
        )  # fmt: skip

    def _index_signature(self) -> tuple[tuple[str, int], ...]:
        folder = self.settings.index_dir
        if not folder.exists():
            return ()
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json")))

    def reload(self) -> None:
        """Open a fresh searcher over the current indexes and swap it in (searches in flight finish on the old)."""
        signature = self._index_signature()
        searcher = self._open_searcher()
        with self._lock:
            self.searcher, self._signature = searcher, signature
            self.loaded_at = dt.datetime.now(dt.UTC)
        log.info("searcher reloaded over %d index files", len(signature))

    def maybe_reload(self) -> bool:
        """Reload when the saved indexes changed since the last load (checked at most every few seconds)."""
        now = time.monotonic()
        if now - self._last_check < self.api_settings.index_reload_check_s:
            return False
        self._last_check = now
        if self._index_signature() == self._signature:
            return False
        self.reload()
        return True

    def search(
        self, decoded: DecodedImage, *, k: int | None = None, filters: HitFilter | None = None
    ) -> dict[str, object]:
        """Every search tier for ``decoded`` (``search.query``), as its JSON document."""
        from search.detector import detector_tier, with_detector

        self.maybe_reload()
        searcher = self.searcher
        doc = dict(
            result_to_json(searcher.search(decoded, k=k or self.api_settings.search_k, filters=filters))
        )
        if self.embedder is None:
            return doc
        return with_detector(doc, detector_tier(self.store, self.embedder, self.face_detector, decoded))

    def search_text(
        self, text: str, *, k: int | None = None, filters: HitFilter | None = None
    ) -> dict[str, object]:
        """The indexed images nearest to ``text`` by CLIP's text tower, as a search JSON document."""
        self.maybe_reload()
        return dict(
            result_to_json(
                self.searcher.search_text(text, k=k or self.api_settings.search_k, filters=filters)
            )
        )

    def refine(self, decoded: DecodedImage, base: dict[str, object]) -> dict[str, object]:
        """Projection evidence for the faces of ``decoded`` (the refine tier), merged into ``base``."""
        from projection.registry import list_generators
        from search.refine import refine_json  # torch and the generators load with the first refine job

        out = dict(refine_json(self.settings, decoded, base, store=self.store))
        refine = out.get("refine")
        used = set(refine.get("generators") or []) if isinstance(refine, dict) else set()
        models = dict(out.get("models") or {})  # type: ignore[call-overload]
        for info in list_generators(self.settings, store=self.store):
            if info.name in used:  # what reproducing this projection needs: the exact weights
                models[f"generator {info.name}"] = {
                    "family": info.family, "weights_sha256": info.weights_sha256,
                    "source_sha256": info.source_sha256, "calibrated": info.calibration is not None,
                }  # fmt: skip
        if used and self.settings.lpips_weights:
            models["lpips"] = {"weights": str(self.settings.lpips_weights)}
        out["models"] = models
        return out

    def close(self) -> None:
        self.store.dispose()


def query_path(settings: Settings, sha256: str) -> Path:
    """Where a query's original bytes are kept for its refine job (content-addressed)."""
    return settings.data_dir / "queries" / sha256[:2] / sha256


def upload_path(settings: Settings, sha256: str) -> Path:
    """Where an image uploaded into a collection is kept (the ingest source reads it from there)."""
    return settings.data_dir / "uploads" / sha256
