"""SQLAlchemy 2.0 models. Images are content-addressed by SHA-256 and have many sightings."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

LABELS = ("generated", "stock", "real", "unknown")


class Base(DeclarativeBase):
    pass


class Collection(Base):
    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Image(Base):
    """One distinct image (by SHA-256 of its original bytes) and its descriptors."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str] = mapped_column(String(16), default="unknown")
    generator: Mapped[str | None] = mapped_column(String(200), nullable=True)
    pdq: Mapped[bytes] = mapped_column(LargeBinary(32))
    pdq_quality: Mapped[int] = mapped_column(Integer)
    pdq_mirror: Mapped[bytes] = mapped_column(LargeBinary(32))
    phash: Mapped[bytes] = mapped_column(LargeBinary(8))
    phash_mirror: Mapped[bytes] = mapped_column(LargeBinary(8))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    sightings: Mapped[list[Sighting]] = relationship(back_populates="image", cascade="all, delete-orphan")


class Sighting(Base):
    """Where and when an image was seen: one row per (image, collection, source key)."""

    __tablename__ = "sightings"
    __table_args__ = (UniqueConstraint("collection_id", "source_key", name="uq_sighting_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    source_key: Mapped[str] = mapped_column(String(1000))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    page_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    licence: Mapped[str | None] = mapped_column(Text, nullable=True)
    label: Mapped[str] = mapped_column(String(16), default="unknown")
    generator: Mapped[str | None] = mapped_column(String(200), nullable=True)
    first_seen: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    image: Mapped[Image] = relationship(back_populates="sightings")
    collection: Mapped[Collection] = relationship()


class Embedding(Base):
    """An L2-normalised float32 vector of an image under one model; the source of truth for FAISS."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_key", name="uq_embedding_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_key: Mapped[str] = mapped_column(String(64), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Face(Base):
    """A face found in an image: box, 5 landmarks, detector score and its embedding."""

    __tablename__ = "faces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    box: Mapped[list[float]] = mapped_column(JSON)
    landmarks: Mapped[list[list[float]]] = mapped_column(JSON)
    score: Mapped[float] = mapped_column(Float)
    model_key: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Latent(Base):
    """A known latent of a generated image (from a manifest, or recovered by projection)."""

    __tablename__ = "latents"
    __table_args__ = (UniqueConstraint("image_id", "generator", "space", name="uq_latent"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), index=True, nullable=True
    )
    generator: Mapped[str] = mapped_column(String(200), index=True)
    space: Mapped[str] = mapped_column(String(8))  # z, w or w+
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    origin: Mapped[str] = mapped_column(String(16), default="manifest")  # manifest or projection
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class GeneratorRecord(Base):
    """A registered generator checkpoint, converted once to safetensors, with its calibration."""

    __tablename__ = "generators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    family: Mapped[str] = mapped_column(String(32))  # stylegan2 or dcgan
    config: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    weights_path: Mapped[str] = mapped_column(Text)  # the converted safetensors file
    weights_sha256: Mapped[str] = mapped_column(String(64))
    source_path: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(64))
    calibration: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    encoder: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)  # projection.encoder
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IngestRun(Base):
    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id"))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    stats: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)


class IngestFailure(Base):
    """A source item that could not be ingested, with the reason; one row per (collection, source key)."""

    __tablename__ = "ingest_failures"
    __table_args__ = (UniqueConstraint("collection_id", "source_key", name="uq_failure_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    source_key: Mapped[str] = mapped_column(String(1000))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IndexBuild(Base):
    """One saved build of a vector index: what produced its vectors and how it is organised."""

    __tablename__ = "index_builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    factory: Mapped[str] = mapped_column(String(200))
    count: Mapped[int] = mapped_column(Integer)
    built_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DetectorRecord(Base):
    """A trained detector (``search.detector``): its JSON and safetensors files with their SHA-256s."""

    __tablename__ = "detectors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    method: Mapped[str] = mapped_column(String(32))
    embedder_key: Mapped[str] = mapped_column(String(64))
    config_path: Mapped[str] = mapped_column(Text)
    config_sha256: Mapped[str] = mapped_column(String(64))
    weights_path: Mapped[str] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DetectorFeature(Base):
    """A cached feature of a detector view of an image (keyed by view, feature, model and view config);
    an empty vector records that the image has no such view (no face)."""

    __tablename__ = "detector_features"
    __table_args__ = (UniqueConstraint("image_id", "feature_key", name="uq_detector_feature"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    feature_key: Mapped[str] = mapped_column(String(64), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
