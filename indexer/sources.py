"""Ingest sources: a folder of images, a CSV/JSONL manifest, or WebDataset / img2dataset tar shards.

``iter_source`` looks at what it is given and yields ``SourceItem``s in a deterministic order; each item
reads its own bytes lazily (folders, manifests) or from the tar stream it came from (shards). Nothing is
ever downloaded and no tar is ever extracted to disk. With ``roots`` (server-side ingest), every file is checked
against them when it is opened (``indexer.safe_open``): images, manifests and shards alike; only regular files
are ever read, each within ``Limits.read_timeout_s``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path, PurePosixPath

from indexer.decode import sniff_format
from indexer.errors import NotRegularFileError, OutsideRootsError, SourceError
from indexer.names import InvalidNameError, clean_name
from indexer.safe_open import DeadlineReader, inside, open_regular, read_regular, sniff_head
from indexer.settings import Limits, get_settings

logger = logging.getLogger(__name__)

LABELS = ("generated", "stock", "real", "unknown")
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
    }
)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
EVAL_CLASS_LABELS = {
    "gan_face": "generated",
    "real_face": "real",
    "generic_photo": "stock",
    "near_dup": "unknown",
}
MAX_SIDECAR_BYTES = 1024 * 1024  # largest .json member read from a shard
_SNIFF_BYTES = 32
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class SourceItem:
    """One image of a source, with whatever provenance the source states about it."""

    key: str  # stable identity inside the source: relative posix path, "shard.tar/KEY", or manifest path/url
    read: Callable[[], bytes]  # the raw bytes; SourceError if the file vanished or is not local
    url: str | None = None
    page_url: str | None = None
    collection: str | None = None
    label: str | None = None  # one of LABELS
    generator: str | None = None
    licence: str | None = None
    first_seen: str | None = None  # ISO 8601 date or datetime
    latent: tuple[float, ...] | None = None
    seed: int | None = None


# --- dispatch -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reading:
    """How files of one source are read: size cap, roots checked at open time (None: any), deadline."""

    max_bytes: int
    roots: tuple[Path, ...] | None
    timeout_s: float


def iter_source(
    source: str | Path, *, limits: Limits | None = None, roots: Sequence[Path] | None = None
) -> Iterator[SourceItem]:
    """Items of ``source``: a folder, a ``.csv``/``.jsonl`` manifest, a ``.tar`` shard, a folder of shards
    or a brace pattern of shards (``shards/{00000..00009}.tar``). The source itself is checked now (a missing
    path raises ``SourceError`` here); bad rows raise ``SourceError`` while iterating. ``roots``: every file
    opened must lie inside them (``OutsideRootsError`` otherwise), checked on the opened file."""
    limits = limits or get_settings().limits
    how = _Reading(limits.max_bytes, tuple(roots) if roots is not None else None, limits.read_timeout_s)
    kind, base, paths = _resolve(source)
    if kind == "manifest":
        return _iter_manifest(paths[0], how)
    if kind == "shards":
        return _iter_shards(base, paths, how)
    return (_folder_item(base, path, how) for path in paths)


def _folder_item(base: Path, path: Path, how: _Reading) -> SourceItem:
    key = path.relative_to(base).as_posix()
    return SourceItem(key=key, read=partial(_read_local, path, how, key))


def count_source(source: str | Path, *, roots: Sequence[Path] | None = None) -> int | None:
    """How many items ``source`` yields when that is cheap to know (folders, manifests); else None."""
    kind, base, paths = _resolve(source)
    if kind == "folder":
        return len(paths)
    if kind == "manifest":
        return sum(1 for _ in _manifest_rows(paths[0], tuple(roots) if roots is not None else None))
    return None


def files_outside(source: str | Path, roots: Sequence[Path]) -> Iterator[str]:
    """The keys (shard paths for shards) of ``source`` whose files, symlinks resolved, lie outside ``roots``
    (checked before a job is queued; the same check runs again on each file when it is opened)."""
    kind, base, paths = _resolve(source)
    if kind == "shards":
        candidates = [(str(p), p) for p in paths]
    elif kind == "manifest":
        rows = _iter_manifest(paths[0], _Reading(0, tuple(roots), 60.0))
        candidates = [(item.key, paths[0].parent / item.key) for item in rows if "://" not in item.key]
    else:
        candidates = [(p.relative_to(base).as_posix(), p) for p in paths]
    for key, path in candidates:
        if not inside(Path(os.path.realpath(path)), roots):
            yield key


def source_kind(source: str | Path) -> str:
    """``"folder"``, ``"manifest"`` or ``"shards"``: what ``iter_source`` will read ``source`` as."""
    return _resolve(source)[0]


def _resolve(source: str | Path) -> tuple[str, Path, list[Path]]:
    """(kind, base folder, files) for ``source``: the images (sorted by key) of a folder, the shards of a
    shard source, the manifest file of a manifest. SourceError when it is none of the known kinds."""
    text = str(source)
    if isinstance(source, str) and _BRACE.search(text) and not Path(text).exists():
        shards = [Path(p) for p in expand_braces(text)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise SourceError(f"{len(missing)} shard(s) of {text} do not exist, first: {missing[0]}")
        return "shards", Path(os.path.dirname(text[: text.index("{")]) or "."), shards
    path = Path(source)
    if path.is_dir():
        images = _scan_folder(path)
        shards = _scan_shards(path)
        if shards and not images:
            return "shards", path, shards
        if shards:
            logger.warning("%s holds images and tar shards: ingesting the images, ignoring the shards", path)
        return "folder", path, images
    if path.is_file():
        name = path.name.lower()
        if name.endswith(MANIFEST_SUFFIXES):
            return "manifest", path.parent, [path]
        if name.endswith(SHARD_SUFFIXES):
            return "shards", path.parent, [path]
        raise SourceError(f"{path}: not a folder, a manifest ({', '.join(MANIFEST_SUFFIXES)}) or a tar shard")
    if path.exists():  # a FIFO, socket or device: never opened
        raise NotRegularFileError(
            f"{source}: not a regular file or a folder (a FIFO, socket or device); not read"
        )
    raise SourceError(f"{source}: no such file or folder")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` numeric ranges (zero padding kept) and ``{x,y}`` lists, left to right, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.lstrip("-").startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise SourceError(f"{pattern}: braces must hold a range {{0..9}} or a list {{a,b}}")
    prefix, suffix = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(prefix + choice + suffix)]


# --- folders --------------------------------------------------------------------------------------
def _visible_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every non-hidden file under ``root``, hidden folders pruned."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(folder) / name
                yield path.relative_to(root).as_posix(), path


def _scan_folder(root: Path) -> list[Path]:
    """The images under ``root`` sorted by key: files with an image extension or image magic bytes."""
    found: list[tuple[str, Path]] = []
    for key, path in _visible_files(root):
        name = path.name.lower()
        if path.suffix.lower() in IMAGE_EXTENSIONS or (
            not name.endswith(SHARD_SUFFIXES) and _sniffs_as_image(path)
        ):
            found.append((key, path))
    return [path for _, path in sorted(found)]


def _scan_shards(root: Path) -> list[Path]:
    return [path for key, path in sorted(_visible_files(root)) if path.name.lower().endswith(SHARD_SUFFIXES)]


def _sniffs_as_image(path: Path) -> bool:
    """Image magic bytes at the start of ``path``; a FIFO, device or unreadable file is not sniffed (never
    blocks) and is left out."""
    head = sniff_head(path, _SNIFF_BYTES)
    if head is None:
        logger.warning("%s: not a readable regular file, left out", path)
        return False
    return sniff_format(head) is not None


def _read_local(path: Path, how: _Reading, key: str) -> bytes:
    """Bytes of a local file; ImageTooLargeError past the cap, SourceError (``OutsideRootsError``,
    ``NotRegularFileError``, ``ReadTimeoutError``...) when it cannot or may not be read."""
    try:
        return read_regular(path, max_bytes=how.max_bytes, roots=how.roots, timeout_s=how.timeout_s)
    except (OutsideRootsError, NotRegularFileError) as exc:
        raise type(exc)(f"{key}: {exc}") from exc
    except FileNotFoundError as exc:
        raise SourceError(f"{key}: the file vanished ({path})") from exc
    except OSError as exc:
        raise SourceError(f"{key}: cannot read {path}: {exc}") from exc


def _refuse_url(url: str) -> bytes:
    raise SourceError(f"{url}: url-only rows are not fetched; ingest never downloads")


def _same_bytes(data: bytes) -> bytes:
    return data


# --- manifests ------------------------------------------------------------------------------------
def _manifest_rows(
    path: Path, roots: tuple[Path, ...] | None = None
) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, row with lower-cased column names) of a CSV or JSONL manifest (a regular file, inside
    ``roots`` when given)."""
    try:
        with (
            open_regular(path, roots=roots) as raw,
            io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle,
        ):
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(handle)
                for row in reader:
                    yield (
                        reader.line_num,
                        {str(k).strip().lower(): v for k, v in row.items() if k is not None},
                    )
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{number}: not a JSON object: {exc}") from exc
                if not isinstance(record, dict):
                    raise SourceError(f"{path}:{number}: a JSONL row must be an object")
                yield number, {str(k).strip().lower(): v for k, v in record.items()}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot read the manifest: {exc}") from exc


def _iter_manifest(path: Path, how: _Reading) -> Iterator[SourceItem]:
    for number, row in _manifest_rows(path, how.roots):
        where = f"{path.name}:{number}"
        local = _field(row, "path", "file")
        url = _field(row, "url")
        if local:
            key = PurePosixPath(local.replace("\\", "/")).as_posix()
            read = partial(_read_local, path.parent / key, how, key)
        elif url:
            key, read = url, partial(_refuse_url, url)
        else:
            raise SourceError(f"{where}: a row needs a path (or file) or a url")
        yield _item(key, read, row, where)


def _item(key: str, read: Callable[[], bytes], row: Mapping[str, object], where: str) -> SourceItem:
    """A SourceItem from a manifest row or a shard's JSON sidecar, every field validated."""
    label = _label(row, where)
    return SourceItem(
        key=key,
        read=read,
        url=_field(row, "url"),
        page_url=_field(row, "page_url"),
        collection=_collection(row, where),
        label=label,
        generator=_field(row, "generator", "generator_if_known"),
        licence=_field(row, "licence", "license"),
        first_seen=_first_seen(_raw(row, "first_seen", "timestamp"), where),
        latent=_latent(row.get("latent"), where),
        seed=_seed(row.get("seed"), where),
    )


def _raw(row: Mapping[str, object], *names: str) -> object:
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            return value
    return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _field(row: Mapping[str, object], *names: str) -> str | None:
    return _text(_raw(row, *names))


def _collection(row: Mapping[str, object], where: str) -> str | None:
    value = _field(row, "collection")
    if value is None:
        return None
    try:
        return clean_name(value)
    except InvalidNameError as exc:
        raise SourceError(f"{where}: {exc}") from exc


def _label(row: Mapping[str, object], where: str) -> str | None:
    if "label" in row:
        label = _field(row, "label")
        if label is None:
            return None
        if label.lower() not in LABELS:
            raise SourceError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
        return label.lower()
    cls = _field(row, "class")
    return EVAL_CLASS_LABELS.get(cls) if cls else None


def _first_seen(value: object, where: str) -> str | None:
    """An ISO 8601 date/datetime string; epoch seconds (numbers) become UTC ISO datetimes."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=UTC).isoformat()
        except (OverflowError, OSError, ValueError) as exc:
            raise SourceError(f"{where}: first_seen {value!r} is not a valid timestamp") from exc
    text = str(value).strip()
    for parse in (date.fromisoformat, datetime.fromisoformat):
        try:
            parse(text)
            return text
        except ValueError:
            continue
    raise SourceError(f"{where}: first_seen {text!r} is not an ISO 8601 date or datetime")


def _latent(value: object, where: str) -> tuple[float, ...] | None:
    """A latent from a JSON list, a JSON list in a string, or space-separated floats."""
    if value is None or value == "":
        return None
    items: object = value
    if isinstance(value, str):
        text = value.strip()
        try:
            items = json.loads(text) if text.startswith("[") else text.split()
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: latent is not a JSON list: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise SourceError(f"{where}: latent must be a non-empty list of numbers")
    try:
        floats = tuple(float(x) for x in items if not isinstance(x, bool | list | dict))
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{where}: latent holds a value that is not a number: {exc}") from exc
    if len(floats) != len(items) or not all(math.isfinite(x) for x in floats):
        raise SourceError(f"{where}: latent must hold finite numbers only")
    return floats


def _seed(value: object, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise SourceError(f"{where}: seed {value!r} is not an integer")


# --- tar shards -----------------------------------------------------------------------------------
def _iter_shards(base: Path, shards: list[Path], how: _Reading) -> Iterator[SourceItem]:
    for shard in shards:
        try:
            label = shard.relative_to(base).as_posix()
        except ValueError:
            label = shard.name
        yield from _iter_shard(shard, label, how)


def _member_key(member: tarfile.TarInfo, shard: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a safe regular member; None (with a warning) otherwise."""
    name = member.name
    if member.isdir():
        return None
    if not member.isreg():
        logger.warning("%s: skipping %s, not a regular file (link or device)", shard, name)
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        logger.warning("%s: skipping %s, an absolute or parent-relative path", shard, name)
        return None
    parts = tuple(p for p in parts if p != ".")
    if not parts or parts[-1].startswith(".") or "." not in parts[-1]:
        return None
    stem, extension = parts[-1].split(".", 1)
    return "/".join((*parts[:-1], stem)), extension.lower()


class _Sample:
    """The members of one sample key gathered from the stream: its image and its JSON sidecar."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.images: dict[str, bytes] = {}
        self.sidecar: bytes | None = None


def _iter_shard(shard: Path, label: str, how: _Reading) -> Iterator[SourceItem]:
    """Samples of one shard in stream order; members of one sample must be adjacent (WebDataset rule). The
    shard is opened as a regular file inside the roots; each member is read within the deadline."""
    sample: _Sample | None = None
    end_of_members = 0
    max_bytes = how.max_bytes
    try:
        with (
            open_regular(shard, roots=how.roots) as raw,
            tarfile.open(fileobj=(reader := DeadlineReader(raw, how.timeout_s, label)), mode="r|*") as tar,
        ):  # type: ignore[arg-type]
            while (member := tar.next()) is not None:
                reader.renew()
                _forget_seen_headers(tar)
                end_of_members = tar.offset  # where the next header starts
                parsed = _member_key(member, label)
                if parsed is None:
                    continue
                key, extension = parsed
                wanted = extension in SHARD_IMAGE_EXTENSIONS or extension == "json"
                if not wanted:
                    continue
                cap = max_bytes if extension != "json" else MAX_SIDECAR_BYTES
                if member.size > cap:
                    logger.warning(
                        "%s: skipping %s, %d bytes over the cap %d", label, member.name, member.size, cap
                    )
                    continue
                if sample is None or sample.key != key:
                    if sample is not None:
                        yield from _sample_item(sample, label)
                    sample = _Sample(key)
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                if extension == "json":
                    sample.sidecar = data
                else:
                    sample.images.setdefault(extension, data)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{shard}: cannot read the tar shard: {exc}") from exc
    _warn_if_unterminated(shard, end_of_members)
    if sample is not None:
        yield from _sample_item(sample, label)


def _warn_if_unterminated(shard: Path, end_of_members: int) -> None:
    """Python's tarfile reads a header cut short as the end of the archive; an uncompressed shard without
    room for the end-of-archive blocks after its last member was most likely truncated there."""
    if shard.name.lower().endswith(".tar") and shard.stat().st_size < end_of_members + 2 * tarfile.BLOCKSIZE:
        logger.warning(
            "%s: no end-of-archive marker after byte %d, the shard looks truncated", shard, end_of_members
        )


def _forget_seen_headers(tar: tarfile.TarFile) -> None:
    """TarFile keeps every header it read; a stream never looks back, so drop them (bounded memory)."""
    seen = getattr(tar, "members", None)
    if isinstance(seen, list):
        seen.clear()


def _sample_item(sample: _Sample, shard: str) -> Iterator[SourceItem]:
    extension = next((e for e in SHARD_IMAGE_EXTENSIONS if e in sample.images), None)
    key = f"{shard}/{sample.key}"
    if extension is None:
        logger.debug("%s: sample has no image member, skipped", key)
        return
    if len(sample.images) > 1:
        logger.warning("%s: several images (%s), keeping .%s", key, ", ".join(sample.images), extension)
    metadata: dict[str, object] = {}
    if sample.sidecar is not None:
        try:
            loaded = json.loads(sample.sidecar)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            logger.warning("%s: unreadable .json sidecar ignored: %s", key, exc)
            loaded = {}
        if isinstance(loaded, dict):
            metadata = {str(k).strip().lower(): v for k, v in loaded.items()}
    yield _item(key, partial(_same_bytes, sample.images[extension]), metadata, key)
