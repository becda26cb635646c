"""The generator registry: checkpoints registered once by name, converted to safetensors, loaded by name.

``register_generator`` reads a checkpoint in any format ``projection.checkpoints`` knows (NVlabs ``.pkl``
through the restricted unpickler, rosinality ``.pt``, a DCGAN ``.pt`` state dict, safetensors) without executing
code from it, writes it once as ``data_dir/generators/NAME.safetensors`` and records both SHA-256s (source and
converted file) in the ``generators`` table. ``load_generator`` reads only the converted file, after checking that
its SHA-256 is still the recorded one.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from indexer.errors import ModelUnavailableError, NotFoundError, SleuthError
from indexer.settings import Settings
from indexer.store.db import Store, open_store
from indexer.store.models import GeneratorRecord
from projection.checkpoints import FAMILIES, load_checkpoint, load_safetensors, save_safetensors, sha256_file
from projection.generator_base import Generator

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class GeneratorExistsError(SleuthError):
    """A generator of that name is already registered with a different checkpoint."""


class GeneratorNotFoundError(NotFoundError):
    """No generator of that name is registered."""


@dataclass
class GeneratorInfo:
    """One registered generator (a row of the ``generators`` table)."""

    name: str
    family: str
    config: dict[str, Any]
    weights_path: str
    weights_sha256: str
    source_path: str
    source_sha256: str
    calibration: dict[str, Any] | None = None
    encoder: dict[str, Any] | None = None  # path, sha256, space, training report (projection.encoder)
    resolution: int = 0
    latent_space: str = "z"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, row: GeneratorRecord) -> GeneratorInfo:
        config = dict(row.config or {})
        return cls(
            name=row.name,
            family=row.family,
            config=config,
            weights_path=row.weights_path,
            weights_sha256=row.weights_sha256,
            source_path=row.source_path,
            source_sha256=row.source_sha256,
            calibration=dict(row.calibration) if row.calibration else None,
            encoder=dict(row.encoder) if row.encoder else None,
            resolution=int(config.get("resolution", 0)),  # type: ignore[call-overload]
            latent_space=str(config.get("projection_space", "z")),
        )

    def to_json(self) -> dict[str, Any]:
        """The registry entry as JSON (calibration summarised by its sample sizes)."""
        cal = self.calibration or {}
        return {
            "name": self.name,
            "family": self.family,
            "resolution": self.resolution,
            "latent_space": self.latent_space,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "source_path": self.source_path,
            "source_sha256": self.source_sha256,
            "calibrated": bool(self.calibration),
            "calibration_sizes": {k: cal[k] for k in ("n_generated", "n_real") if k in cal},
            "encoder": self.encoder,
        }


def generators_dir(settings: Settings) -> Path:
    return settings.data_dir / "generators"


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise SleuthError(
            f"invalid generator name {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)"
        )


def _open(settings: Settings, store: Store | None) -> tuple[Store, bool]:
    return (store, False) if store is not None else (open_store(settings), True)


def register_generator(
    settings: Settings, name: str, path: str | Path, *, family: str, store: Store | None = None
) -> GeneratorInfo:
    """Register the checkpoint at ``path`` as ``name`` (family ``stylegan2`` or ``dcgan``).

    Idempotent: registering the same file (same SHA-256) under the same name again returns the existing entry;
    a different file under a taken name raises ``GeneratorExistsError``.
    """
    _check_name(name)
    if family not in FAMILIES:
        raise SleuthError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    path = Path(path)
    st, owned = _open(settings, store)
    try:
        existing = _find(st, name)
        if existing is not None:
            source_sha = sha256_file(path) if path.is_file() else None
            if source_sha == existing.source_sha256 and existing.family == family:
                return existing
            raise GeneratorExistsError(
                f"a generator named {name!r} is already registered ({existing.family}, source sha256 "
                f"{existing.source_sha256[:12]}); choose another name"
            )
        generator, info = load_checkpoint(path, family=family)
        dst = generators_dir(settings) / f"{name}.safetensors"
        weights_sha = save_safetensors(generator, dst, source_sha256=info["sha256"])
        config = _config_of(generator, info)
        with st.session() as s:
            row = GeneratorRecord(
                name=name,
                family=family,
                config=config,
                weights_path=str(dst.resolve()),
                weights_sha256=weights_sha,
                source_path=str(path.resolve()),
                source_sha256=info["sha256"],
                calibration=None,
            )
            s.add(row)
            s.flush()
            result = GeneratorInfo.from_record(row)
        logger.info("registered generator %s (%s) -> %s, sha256 %s", name, family, dst, weights_sha[:12])
        return result
    finally:
        if owned:
            st.dispose()


def _config_of(generator: Generator, info: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "resolution": generator.resolution,
        "z_dim": generator.z_dim,
        "latent_spaces": list(generator.latent_spaces),
        "projection_space": "w" if "w" in generator.latent_spaces else "z",
        "source_format": info.get("format"),
    }
    if "config" in info:
        config["architecture"] = info["config"]
    if "w_avg_tracked" in info:
        config["w_avg_tracked"] = info["w_avg_tracked"]
    return config


def _find(store: Store, name: str) -> GeneratorInfo | None:
    with store.session() as s:
        row = s.execute(select(GeneratorRecord).where(GeneratorRecord.name == name)).scalar_one_or_none()
        return None if row is None else GeneratorInfo.from_record(row)


def get_generator(settings: Settings, name: str, *, store: Store | None = None) -> GeneratorInfo:
    """The registry entry of ``name``; ``GeneratorNotFoundError`` when there is none."""
    st, owned = _open(settings, store)
    try:
        found = _find(st, name)
    finally:
        if owned:
            st.dispose()
    if found is None:
        known = [g.name for g in list_generators(settings, store=store)]
        raise GeneratorNotFoundError(
            f"no generator named {name!r} is registered (known: {', '.join(known) or 'none'}); "
            "add one with `sleuth generators add NAME PATH --family stylegan2|dcgan`"
        )
    return found


def list_generators(settings: Settings, *, store: Store | None = None) -> list[GeneratorInfo]:
    """Every registered generator, by name."""
    st, owned = _open(settings, store)
    try:
        with st.session() as s:
            rows = s.execute(select(GeneratorRecord).order_by(GeneratorRecord.name)).scalars().all()
            return [GeneratorInfo.from_record(r) for r in rows]
    finally:
        if owned:
            st.dispose()


def _update(settings: Settings, name: str, store: Store | None, **fields: Any) -> GeneratorInfo:
    """Set columns of the entry of ``name``; a new encoder clears the calibration (made with the old start)."""
    st, owned = _open(settings, store)
    try:
        with st.session() as s:
            row = s.execute(select(GeneratorRecord).where(GeneratorRecord.name == name)).scalar_one_or_none()
            if row is None:
                raise GeneratorNotFoundError(f"no generator named {name!r} is registered")
            if "encoder" in fields and row.calibration:
                logger.warning("generator %s: calibration cleared (the projector's start changed)", name)
                row.calibration = None
            for column, value in fields.items():
                setattr(row, column, value)
            s.flush()
            return GeneratorInfo.from_record(row)
    finally:
        if owned:
            st.dispose()


def set_calibration(
    settings: Settings, name: str, calibration: dict[str, Any], *, store: Store | None = None
) -> GeneratorInfo:
    """Store ``calibration`` (JSON) on the entry of ``name``."""
    return _update(settings, name, store, calibration=calibration)


def set_encoder(
    settings: Settings, name: str, encoder: dict[str, Any] | None, *, store: Store | None = None
) -> GeneratorInfo:
    """Record ``encoder`` (path, sha256, report; ``None`` removes it) on the entry of ``name``. A calibration
    made with another projection start no longer describes the projector, so it is cleared (logged)."""
    return _update(settings, name, store, encoder=encoder)


def encoder_path(settings: Settings, name: str) -> Path:
    return generators_dir(settings) / f"{name}.encoder.safetensors"


_CACHE: dict[tuple[str, str, str], Any] = {}  # generators and encoders by (file, sha256, device)
_CACHE_LOCK = threading.Lock()


def _load_verified(
    path: Path, sha256: str, device: str | torch.device, load: Any, *, what: str, missing: str, changed: str
) -> Any:
    """``load(path)`` once per (file, sha256, device), after checking the file's SHA-256 is the recorded one."""
    if not path.is_file():
        raise ModelUnavailableError(f"{what} {path} does not exist; {missing}")
    key = (str(path), sha256, str(torch.device(device)))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        actual = sha256_file(path)
        if actual != sha256:
            raise ModelUnavailableError(
                f"{what} {path} has sha256 {actual[:12]}, the registry recorded {sha256[:12]}; the file changed "
                f"after {changed}"
            )
        _CACHE[key] = load(path)
        return _CACHE[key]


def load_encoder_of(info: GeneratorInfo, *, device: str | torch.device = "cpu") -> Any | None:
    """The latent encoder recorded for ``info`` (a ``projection.encoder.LatentEncoder``), ``None`` without one.
    Its SHA-256 must still be the recorded one; loaded once per (file, sha256, device)."""
    from projection.encoder import load_encoder

    if not info.encoder:
        return None
    return _load_verified(
        Path(str(info.encoder["path"])), str(info.encoder["sha256"]), device,
        lambda p: load_encoder(p, device=device),
        what=f"generator {info.name!r}: latent encoder",
        missing=f"train it again with `sleuth generators train-encoder {info.name}`", changed="training",
    )  # fmt: skip


def load_generator(
    settings: Settings, name: str, *, device: str | torch.device = "cpu", store: Store | None = None
) -> tuple[Generator, GeneratorInfo]:
    """The registered generator ``name`` on ``device`` (frozen, eval mode) and its entry.

    The converted file's SHA-256 must equal the recorded one (else ``ModelUnavailableError``). Loaded
    generators are kept per (file, sha256, device) for the life of the process.
    """
    info = get_generator(settings, name, store=store)
    generator = _load_verified(
        Path(info.weights_path), info.weights_sha256, device, lambda p: load_safetensors(p).to(device),
        what=f"generator {name!r}: converted weights",
        missing=f"register it again (source {info.source_path})", changed="registration",
    )  # fmt: skip
    return generator, info
