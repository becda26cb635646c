"""The generator registry: checkpoints registered once by name, converted to safetensors, loaded by name.

``register_generator`` reads a checkpoint in any format ``projection.checkpoints`` knows (NVlabs ``.pkl``
through the restricted unpickler, rosinality ``.pt``, a DCGAN ``.pt`` state dict, safetensors) without executing
code from it, writes it once as ``data_dir/generators/NAME.safetensors`` and records both SHA-256s (source and
converted file) in the ``generators`` table. An ONNX generator (family ``onnx``, registered from its model card,
``projection.onnx_generator``) is copied into ``data_dir/generators/NAME/`` with a card that names the copies and
their SHA-256s; the registry records the card's SHA-256 and every file's. ``load_generator`` reads only the
registry's own files, after checking that their SHA-256s are still the recorded ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
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

    @property
    def description(self) -> str:
        """What the generator is, in the words of its registration (the model card's, or the family's)."""
        return str(self.config.get("description") or f"{self.family} generator, {self.resolution} px")

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
            "description": self.description,
            "files_sha256": self.config.get("files"),
            "calibrated": bool(self.calibration),
            "calibration_sizes": {k: cal[k] for k in ("n_generated", "n_real", "n_other") if cal.get(k)},
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


REGISTRY_FAMILIES = (*FAMILIES, "onnx")


def register_generator(
    settings: Settings,
    name: str,
    path: str | Path,
    *,
    family: str,
    z_distribution: str | None = None,
    description: str | None = None,
    store: Store | None = None,
) -> GeneratorInfo:
    """Register the checkpoint (or, family ``onnx``, the model card) at ``path`` as ``name``.

    ``z_distribution`` ("normal" | "uniform", DCGAN only): how z was drawn in training. ``description``: what the
    generator is, as reports should name it (default: the model card's words, or the family and resolution).
    Idempotent: registering the same file (same SHA-256) under the same name again returns the existing entry;
    a different file under a taken name raises ``GeneratorExistsError``.
    """
    _check_name(name)
    if family not in REGISTRY_FAMILIES:
        raise SleuthError(f"family must be one of {', '.join(REGISTRY_FAMILIES)}, got {family!r}")
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailableError(f"{'model card' if family == 'onnx' else 'checkpoint'} not found: {path}")
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
        if family == "onnx":
            dst, weights_sha, source_sha, config = _install_onnx(settings, name, path)
        else:
            generator, info = load_checkpoint(path, family=family, z_distribution=z_distribution)
            dst = generators_dir(settings) / f"{name}.safetensors"
            weights_sha = save_safetensors(generator, dst, source_sha256=info["sha256"])
            source_sha = info["sha256"]
            config = _config_of(generator, info)
        if description:
            config["description"] = description
        with st.session() as s:
            row = GeneratorRecord(
                name=name,
                family=family,
                config=config,
                weights_path=str(dst.resolve()),
                weights_sha256=weights_sha,
                source_path=str(path.resolve()),
                source_sha256=source_sha,
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


def _copy_verified(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to ``dst`` atomically and check the copy's SHA-256."""
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != sha256:
            raise ModelUnavailableError(f"{src} changed while it was being copied")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _install_onnx(settings: Settings, name: str, card_path: Path) -> tuple[Path, str, str, dict[str, Any]]:
    """Copy an ONNX generator's files under ``generators/NAME/`` with a card naming the copies; check that it
    converts and runs, look for its exact half-resolution read-out. Returns (card, its sha256, the source card's
    sha256, registry config)."""
    from projection.onnx_generator import (
        find_half_resolution_readout,
        load_onnx_generator,
        read_card,
        verify_card_files,
    )

    card = read_card(card_path)
    shas = verify_card_files(card)
    folder = generators_dir(settings) / name
    folder.mkdir(parents=True, exist_ok=True)
    files_doc = {}
    for role, f in card.files.items():
        _copy_verified(f.path, folder / f"{role}.onnx", shas[role])
        files_doc[role] = {"path": f"{role}.onnx", "sha256": shas[role], "bytes": f.path.stat().st_size}
    installed = folder / "card.json"
    text = json.dumps({**card.raw, "files": files_doc}, indent=1, sort_keys=True)
    tmp = installed.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, installed)
    generator = load_onnx_generator(installed, expected_sha256=shas)
    with torch.no_grad():
        sample = generator.synthesize(generator.mean_latent("w")[None], "w")  # [1, 3, R, R]: the graph runs
    if not torch.isfinite(sample).all():
        raise ModelUnavailableError(f"{card_path}: the generator's mean-latent image is not finite")
    readout = find_half_resolution_readout(generator)
    logger.info(
        "%s: %s", name, f"exact half-resolution read-out at {readout.node}" if readout else "no read-out"
    )
    config: dict[str, Any] = {
        "resolution": generator.resolution,
        "z_dim": generator.z_dim,
        "w_dim": generator.w_dim,
        "num_ws": generator.num_ws,
        "latent_spaces": list(generator.latent_spaces),
        "projection_space": "w",
        "source_format": "onnx-model-card",
        "files": shas,
        "readout": readout.to_json() if readout else None,
        "description": card.description,
        "licence": card.licence,
    }
    return installed, sha256_file(installed), sha256_file(card_path), config


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
    dcgan_config = getattr(generator, "config", None)
    if generator.family == "dcgan" and dcgan_config is not None:
        config["layout"] = dcgan_config.layout
        config["z_distribution"] = dcgan_config.z_distribution
        config["description"] = (
            f"DCGAN ({dcgan_config.layout} layout, z ~ {dcgan_config.z_distribution}), {generator.resolution} px"
        )
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
    """Set columns of the entry of ``name`` (``face_template`` goes into its config). A new encoder or face
    template clears the calibration (made with the old start or framing; logged)."""
    st, owned = _open(settings, store)
    try:
        with st.session() as s:
            row = s.execute(select(GeneratorRecord).where(GeneratorRecord.name == name)).scalar_one_or_none()
            if row is None:
                raise GeneratorNotFoundError(f"no generator named {name!r} is registered")
            if "face_template" in fields:
                template = fields.pop("face_template")
                if row.calibration and (row.config or {}).get("face_template") != template:
                    logger.warning(
                        "generator %s: calibration cleared (faces are now framed by its template)", name
                    )
                    row.calibration = None
                row.config = {**(row.config or {}), "face_template": template}
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


def set_face_template(
    settings: Settings, name: str, template: dict[str, Any], *, store: Store | None = None
) -> GeneratorInfo:
    """Record the generator's face template (``projection.face_prep``; ``{}``: measured, no faces found) in its
    config. A new framing changes how faces are prepared, so a calibration made before it is cleared (logged)."""
    return _update(settings, name, store, face_template=template)


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
    if info.family == "onnx":
        from projection.onnx_generator import load_onnx_generator

        def load(p: Path) -> Generator:
            return load_onnx_generator(
                p, expected_sha256=info.config.get("files"), readout=info.config.get("readout")
            ).to(device)
    else:

        def load(p: Path) -> Generator:
            return load_safetensors(p).to(device)

    generator = _load_verified(
        Path(info.weights_path), info.weights_sha256, device, load,
        what=f"generator {name!r}: {'model card' if info.family == 'onnx' else 'converted weights'}",
        missing=f"register it again (source {info.source_path})", changed="registration",
    )  # fmt: skip
    return generator, info
