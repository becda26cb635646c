"""``sleuth models pull``: model files from a catalog pinned by SHA-256, into the data directory.

The catalog (``indexer/model_catalog.json``, or any file of the same shape) names each model's files with their
URL and SHA-256 and the setting the model provides (``clip_model``, ``face_detector``, ``lpips_weights``,
``face_model``). A pull downloads each file to ``DATA_DIR/models/NAME/FILE.part``, resuming a partial download
with an HTTP Range request, decompresses it when the entry says so, checks its SHA-256 and only then renames it
into place; a file already there with the right SHA-256 is not fetched again. What was pulled is recorded in
``DATA_DIR/models/pulled.json``, and ``Settings`` take their model settings from it when the environment sets
none. A catalog file whose ``sha256`` is null could not be pinned where the catalog was written: its first
download's SHA-256 is recorded and every later copy must match it.

Nothing retries: an unreachable URL fails at once, naming the catalog entry and the URL.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.errors import ModelUnavailableError, SleuthError

log = logging.getLogger(__name__)

DEFAULT_CATALOG = Path(__file__).with_name("model_catalog.json")
PULLED_FILE = "pulled.json"
CHUNK = 1 << 20
TIMEOUT_S = 15.0
SETTINGS = ("clip_model", "face_detector", "lpips_weights", "face_model")


@dataclass(frozen=True)
class CatalogFile:
    name: str
    url: str
    sha256: str | None
    decompress: str | None = None  # "bz2"
    bytes: int | None = None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    files: list[CatalogFile]
    setting: str | None = None  # the Settings field this model provides
    value: str = "{dir}"  # the setting's value; {dir} is the entry's folder
    build: str | None = None  # a step after the download ("lpips:vgg")
    licence: str = ""
    optional: bool = False


@dataclass
class PullResult:
    name: str
    folder: Path
    setting: str | None
    value: str
    files: list[dict[str, Any]] = field(default_factory=list)  # name, sha256, pinned, fetched

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder), "setting": self.setting, "value": self.value,
                "files": self.files}  # fmt: skip


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    """The catalog's entries by name; SleuthError when the file is not a catalog."""
    path = path or DEFAULT_CATALOG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = {}
        for name, raw in doc["models"].items():
            files = [CatalogFile(**f) for f in raw["files"]]
            fields = {
                k: raw[k]
                for k in ("description", "setting", "value", "build", "licence", "optional")
                if k in raw
            }
            entries[name] = CatalogEntry(name=name, files=files, **fields)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SleuthError(f"{path}: not a model catalog ({exc})") from exc
    for entry in entries.values():
        if entry.setting is not None and entry.setting not in SETTINGS:
            raise SleuthError(f"{path}: {entry.name} sets unknown setting {entry.setting!r}")
    return entries


def models_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def read_pulled(data_dir: Path) -> dict[str, Any]:
    """The record of pulled models (``{"models": {name: ...}, "settings": {setting: value}}``), or empty."""
    path = models_dir(data_dir) / PULLED_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"models": {}, "settings": {}}
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): ignoring the pulled models", path, exc)
        return {"models": {}, "settings": {}}
    return {"models": dict(doc.get("models") or {}), "settings": dict(doc.get("settings") or {})}


def pulled_settings(data_dir: Path) -> dict[str, str]:
    """The settings the pulled models provide (what ``Settings`` default to)."""
    return {
        k: v for k, v in read_pulled(data_dir)["settings"].items() if k in SETTINGS and isinstance(v, str)
    }


def _write_pulled(data_dir: Path, doc: dict[str, Any]) -> None:
    path = models_dir(data_dir) / PULLED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(
    entry: CatalogEntry, f: CatalogFile, part: Path, progress: Callable[[str, int, int | None], None] | None
) -> None:
    """``f.url`` into ``part``, continuing from its current length with a Range request (resumable)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(f.url, headers={"User-Agent": "sleuth-models-pull"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - catalog URLs only
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is complete already
            return
        raise ModelUnavailableError(
            f"models pull {entry.name}: {f.url} answered HTTP {exc.code} for {f.name}"
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelUnavailableError(
            f"models pull {entry.name}: cannot reach {f.url} ({reason}); the catalog entry {entry.name!r} needs "
            f"{f.name} from that URL (offline? copy the file to {part.parent / f.name} and pull again)"
        ) from exc
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        with part.open("ab" if resumed else "wb") as out:
            done = have
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(f.name, done, total)


def _fetch_file(
    entry: CatalogEntry, f: CatalogFile, folder: Path, recorded: str | None,
    progress: Callable[[str, int, int | None], None] | None,
) -> dict[str, Any]:  # fmt: skip
    """One catalog file in place and verified; returns what was done."""
    target = folder / f.name
    expected = f.sha256 or recorded
    if target.exists():
        have = sha256_of(target)
        if expected is None or have == expected:
            return {"name": f.name, "sha256": have, "pinned": f.sha256 is not None, "fetched": False}
        log.warning("%s: SHA-256 %s is not the pinned %s; fetching it again", target, have, expected)
        target.unlink()
    part = folder / (f.name + (".bz2" if f.decompress == "bz2" else "") + ".part")
    _download(entry, f, part, progress)
    ready = part
    if f.decompress == "bz2":
        ready = folder / (f.name + ".tmp")
        try:
            with bz2.open(part, "rb") as src, ready.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        except (OSError, EOFError, ValueError) as exc:
            ready.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
            raise ModelUnavailableError(
                f"models pull {entry.name}: {f.url} is not a bz2 file ({exc})"
            ) from exc
    elif f.decompress is not None:
        raise SleuthError(f"models pull {entry.name}: unknown decompression {f.decompress!r}")
    got = sha256_of(ready)
    if expected is not None and got != expected:
        ready.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        raise ModelUnavailableError(
            f"models pull {entry.name}: {f.name} from {f.url} has SHA-256 {got}, not the pinned {expected}; "
            "the file was discarded"
        )
    os.replace(ready, target)
    part.unlink(missing_ok=True)
    return {"name": f.name, "sha256": got, "pinned": f.sha256 is not None, "fetched": True}


def _build(entry: CatalogEntry, folder: Path, value_path: Path) -> None:
    """The step after the download: ``lpips:NET`` joins torchvision's backbone with the lpips wheel's
    linear layers into the safetensors file Sleuth reads (``SLEUTH_LPIPS_WEIGHTS``)."""
    kind, _, arg = (entry.build or "").partition(":")
    if kind != "lpips":
        raise SleuthError(f"models pull {entry.name}: unknown build step {entry.build!r}")
    import lpips
    import torch
    from safetensors.torch import save_file

    backbone = folder / entry.files[0].name
    tensors = {
        k: v.contiguous()
        for k, v in torch.load(backbone, map_location="cpu", weights_only=True).items()
        if k.startswith("features.")
    }
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{arg}.pth"
    for key, value in torch.load(lin_file, map_location="cpu", weights_only=True).items():
        if key.endswith(".model.1.weight"):
            tensors[key.split(".")[0] + ".weight"] = value.contiguous()  # lin0.model.1.weight -> lin0.weight
    tmp = value_path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, value_path)


def pull(
    names: list[str], *, data_dir: Path, catalog: Path | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> list[PullResult]:  # fmt: skip
    """Pull the named catalog entries (every non-optional one when ``names`` is empty) into the data dir."""
    entries = load_catalog(catalog)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise SleuthError(
            f"no catalog entry {', '.join(unknown)}; the catalog has {', '.join(sorted(entries))}"
        )
    chosen = [entries[n] for n in names] if names else [e for e in entries.values() if not e.optional]
    doc = read_pulled(data_dir)
    results = []
    for entry in chosen:
        folder = models_dir(data_dir) / entry.name
        folder.mkdir(parents=True, exist_ok=True)
        recorded = {f["name"]: f["sha256"] for f in doc["models"].get(entry.name, {}).get("files", [])}
        files = [_fetch_file(entry, f, folder, recorded.get(f.name), progress) for f in entry.files]
        value = entry.value.replace("{dir}", str(folder.resolve()))
        if entry.build:
            target = Path(value)
            if any(f["fetched"] for f in files) or not target.exists():
                _build(entry, folder, target)
        result = PullResult(entry.name, folder, entry.setting, value, files)
        doc["models"][entry.name] = result.to_json()
        if entry.setting:
            doc["settings"][entry.setting] = value
        _write_pulled(data_dir, doc)
        results.append(result)
    return results
