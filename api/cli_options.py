"""What every ``sleuth`` verb shares: the consoles, option types, settings, error handling and JSON output.

The CLI modules (``api/cli.py`` and the ``api/cli_*.py`` verbs it registers) import from here and never from
each other, so the command modules do not import each other in a circle.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from indexer.errors import SleuthError
from indexer.settings import Settings

err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document to stdout and nothing else")]
ClipOpt = Annotated[
    str | None,
    typer.Option(
        "--clip-model", help="CLIP model id (overrides SLEUTH_CLIP_MODEL), e.g. onnx:/path/model.onnx"
    ),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="data directory (overrides SLEUTH_DATA_DIR)")
]
FaceDetectorOpt = Annotated[
    Path | None,
    typer.Option(
        "--face-detector",
        file_okay=False,
        help="folder with MTCNN's pnet.pt, rnet.pt, onet.pt (overrides SLEUTH_FACE_DETECTOR)",
    ),
]
FaceModelOpt = Annotated[
    str | None,
    typer.Option(
        "--face-model", help="face identity model id (overrides SLEUTH_FACE_MODEL), e.g. dlib:resnet-v1"
    ),
]


class Engine(StrEnum):
    """Where ``sleuth ingest --engine`` runs the describe step."""

    processes = "processes"
    ray = "ray"


EngineOpt = Annotated[
    Engine | None,
    typer.Option(
        "--engine",
        help="describe on a worker pool: local processes, or Ray actors (pip install 'sleuth[ray]')",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="a running Ray cluster (ray://HOST:10001 or HOST:6379); default: local"
    ),
]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="describe workers (with --engine)")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="torch device (overrides SLEUTH_DEVICE): cpu, cuda, cuda:1")
]


def settings_for(
    data_dir: Path | None = None,
    clip_model: str | None = None,
    *,
    device: str | None = None,
    face_detector: Path | None = None,
    face_model: str | None = None,
) -> Settings:
    """``Settings`` from the environment with the command line's overrides."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if clip_model is not None:
        overrides["clip_model"] = clip_model
    if device is not None:
        overrides["device"] = device
    if face_detector is not None:
        overrides["face_detector"] = face_detector
    if face_model is not None:
        overrides["face_model"] = face_model
    return Settings(**overrides)


def query_files(inputs: list[Path]) -> Iterator[Path]:
    """Each input file, and each file under an input folder (recursive, stable order), in input order."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.exists():
            yield path
        else:
            raise SleuthError(f"no such file or folder: {path}")


def handles_errors(fn: F) -> F:
    """Turn library errors into one clear line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SleuthError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted[/]: what was committed stays; run the same command again to resume"
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(doc: Any) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


def load_clip(settings: Settings) -> Any:
    """The configured CLIP embedder, or None when no model is configured (copy detection still works)."""
    if not settings.clip_model:
        return None
    from indexer.embedders import load_embedder

    return load_embedder(settings.clip_model, device=settings.device, batch_size=settings.batch_size)


def load_face_detector(settings: Settings) -> Any:
    """The configured MTCNN face detector, or None when ``SLEUTH_FACE_DETECTOR`` is not set."""
    if not settings.face_detector:
        return None
    from indexer.faces import FaceDetector

    return FaceDetector.from_dir(settings.face_detector, device=settings.device)


def load_face_model(settings: Settings) -> Any:
    """The configured face identity model (``SLEUTH_FACE_MODEL``), or None (the face tier then uses CLIP)."""
    if not settings.face_model:
        return None
    from indexer.face_identity import load_face_model as load

    return load(settings.face_model)
