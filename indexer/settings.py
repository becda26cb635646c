"""The one Settings class of Sleuth (environment prefix ``SLEUTH_``, ``__`` for nesting)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseModel):
    """Input limits applied by the one decode path (ingest and query alike)."""

    max_bytes: int = Field(50 * 1024 * 1024, description="largest accepted encoded image, in bytes")
    max_pixels: int = Field(
        80_000_000, description="largest accepted width*height (decompression-bomb guard)"
    )
    max_side: int = Field(30_000, description="largest accepted width or height")
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "MPO")
    upload_max_bytes: int = Field(20 * 1024 * 1024, description="largest accepted API upload")
    working_side: int = Field(
        2048,
        ge=256,
        description="larger images are decoded (JPEG draft) or reduced to this longest side: what every tier "
        "needs; the original's dimensions are kept in DecodedImage.width/height",
    )
    ingest_batch_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="decoded pixel bytes an ingest batch holds at most"
    )
    read_timeout_s: float = Field(60.0, gt=0, description="deadline for reading one source file")


class Settings(BaseSettings):
    """Everything configurable. Every field can be set as ``SLEUTH_<FIELD>`` (``SLEUTH_LIMITS__MAX_BYTES``)."""

    model_config = SettingsConfigDict(env_prefix="SLEUTH_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="database file, indexes and caches")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    clip_model: str | None = Field(
        None,
        description="CLIP model id: open_clip:ARCH/TAG, local-dir:/path, onnx:/path/model.onnx or a file path",
    )
    face_detector: Path | None = Field(None, description="folder with MTCNN's pnet.pt, rnet.pt, onet.pt")
    face_model: str | None = Field(
        None, description="face identity model id, e.g. dlib:resnet-v1 (unset: CLIP on the face crop)"
    )
    lpips_weights: Path | None = Field(None, description="LPIPS backbone + linear layers (safetensors)")
    device: str = Field("cpu", description="torch device for models: cpu, cuda, cuda:1")
    batch_size: int = Field(32, ge=1, description="images per embedding batch at ingest")
    approx_index_threshold: int = Field(
        200_000,
        ge=1,
        description="past this many vectors, ingest builds an approximate index with re-ranking",
    )
    ondisk_index_threshold: int = Field(
        20_000_000,
        ge=1,
        description="past this many vectors, a float index is built on disk (IVF-PQ, memory-mapped lists)",
    )
    environment: str = Field("development", description="development or production")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("clip_model", "face_detector", "face_model", "lpips_weights", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        """``SLEUTH_FACE_DETECTOR=`` (empty) turns the model off; it is not the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _pulled_models(self) -> Settings:
        """Model settings the environment leaves unset default to what ``sleuth models pull`` fetched."""
        from indexer.model_pull import pulled_settings

        for name, value in pulled_settings(self.data_dir).items():
            if getattr(self, name) is None and name not in self.model_fields_set:  # set empty: off
                setattr(self, name, Path(value) if name in ("face_detector", "lpips_weights") else value)
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sleuth.db').resolve()}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment; tests build their own ``Settings(...)`` instead."""
    return Settings()
