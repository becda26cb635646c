"""``sleuth detectors train|list|show|remove`` and ``sleuth detect``: the detector tier (``search.detector``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from api.cli_options import (
    ClipOpt,
    DataDirOpt,
    FaceDetectorOpt,
    JsonOpt,
    err,
    handles_errors,
    load_clip,
    load_face_detector,
    out,
    print_json,
    query_files,
    settings_for,
)
from indexer.errors import DecodeError, ModelUnavailableError, SleuthError

detectors_app = typer.Typer(
    no_args_is_help=True, help="Train, list, show and remove detectors (is this image generated?)."
)

CollectionsOpt = Annotated[
    list[str],
    typer.Option(help="collection names (repeat the option, or separate them with commas)"),
]


def _names(values: list[str]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _need_clip(settings: Any) -> Any:
    embedder = load_clip(settings)
    if embedder is None:
        raise ModelUnavailableError(
            "detectors read CLIP features: set SLEUTH_CLIP_MODEL or give --clip-model"
        )
    return embedder


@detectors_app.command("train")
@handles_errors
def train(
    name: Annotated[str, typer.Argument(help="the detector's name")],
    generated: CollectionsOpt,
    real: CollectionsOpt,
    method: Annotated[
        Literal["auto", "probe", "knn", "spectrum", "ensemble"],
        typer.Option(help="the deciding method; auto: the one with the best AUC on held-out sources"),
    ] = "probe",
    calibration: Annotated[Literal["platt", "isotonic"], typer.Option(help="how scores become p")] = "platt",
    k: Annotated[int, typer.Option(min=1, max=100, help="neighbours of the kNN vote")] = 10,
    clahe: Annotated[bool, typer.Option("--clahe", help="CLAHE (L of LAB) on the face crop")] = False,
    augment_copies: Annotated[
        int,
        typer.Option(
            min=0,
            max=8,
            help="degraded copies of each training image (JPEG 40-95, longest side 96-256 px); 0: none",
        ),
    ] = 2,
    replace: Annotated[bool, typer.Option("--replace", help="replace a detector of that name")] = False,
    clip_model: ClipOpt = None,
    face_detector: FaceDetectorOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a detector from labelled collections of the store (features cached: retraining takes seconds)."""
    from indexer.store.db import open_store
    from search.detector import TrainOptions, train_detector
    from search.detector_features import Augmentation, ViewConfig

    settings = settings_for(data_dir, clip_model, face_detector=face_detector)
    embedder = _need_clip(settings)
    options = TrainOptions(method=method, calibration=calibration, k=k, views=ViewConfig(clahe=clahe),
                           augment=Augmentation(copies=augment_copies))  # fmt: skip
    store = open_store(settings)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            err.print(f"views {done}/{total}", end="\r")

    try:
        detector = train_detector(
            settings, store, embedder, name, generated=_names(generated), real=_names(real), options=options,
            replace=replace, face_detector=load_face_detector(settings), progress=progress,
        )  # fmt: skip
    finally:
        store.dispose()
    if as_json:
        print_json(detector.doc)
        return
    out.print(f"trained {name} in {time.perf_counter() - started:.1f} s: {detector.scope()}", highlight=False)
    _print_views(detector.doc)


def _print_views(doc: dict[str, Any]) -> None:
    for view, v in doc["views"].items():
        aucs = ", ".join(f"{m} {a}" for m, a in v["out_of_source_auc"].items())
        out.print(f"  {view} view: {v['n_generated']} generated / {v['n_real']} real; method {v['method']}; "
                  f"AUC on held-out sources: {aucs}", highlight=False)  # fmt: skip
        degraded = v.get("degraded_copies", {}).get("unseen_generator_auc", {})
        for gen, a in v["unseen_generator_auc"].items():
            extra = f" (its degraded copies: {degraded[gen][v['method']]})" if gen in degraded else ""
            out.print(f"    {gen} unseen: AUC {a[v['method']]}{extra}", highlight=False)
        cal = v["calibration"][v["method"]]
        out.print(f"    calibration {cal['kind']} on {cal['n_generated']} generated / {cal['n_real']} real "
                  f"(held-out-source scores); abstains below kNN cosine {v['ood_similarity']}", highlight=False)  # fmt: skip


@detectors_app.command("list")
@handles_errors
def list_(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every trained detector, oldest first (the newest is the default)."""
    from indexer.store.db import open_store
    from search.detector import list_detectors

    store = open_store(settings_for(data_dir))
    try:
        rows = list_detectors(store)
    finally:
        store.dispose()
    docs: list[dict[str, Any]] = [
        {"name": r.name, "method": r.method, "created_at": r.created_at, "weights_sha256": r.weights_sha256,
         "scope": (r.summary or {}).get("scope")}
        for r in rows
    ]  # fmt: skip
    if as_json:
        print_json({"detectors": docs})
        return
    if not docs:
        out.print("no detectors: `sleuth detectors train NAME --generated COLL --real COLL`")
    for d in docs:
        out.print(
            f"{d['name']}  ({d['method']}, sha256 {d['weights_sha256'][:12]}): {d['scope']}", highlight=False
        )


@detectors_app.command("show")
@handles_errors
def show(
    name: Annotated[str, typer.Argument(help="the detector's name")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A detector's training collections, counts, embedder, weight hash, calibration and measured figures."""
    from indexer.store.db import open_store
    from search.detector import load_detector

    store = open_store(settings_for(data_dir))
    try:
        detector = load_detector(store, name)
    finally:
        store.dispose()
    doc = detector.doc
    if as_json:
        print_json(doc)
        return
    emb, w = doc["embedder"], doc["weights"]
    out.print(f"{name}: {detector.scope()}", highlight=False)
    out.print(f"  trained {doc['created_at'][:19]} on CLIP {emb['model_id']} (weights {emb['weights_sha256'][:12]}); "
              f"file {w['file']} sha256 {w['sha256'][:12]}", highlight=False)  # fmt: skip
    out.print(
        f"  images per collection: {doc['training']['collections']}; views {doc['view_config']}",
        highlight=False,
    )
    _print_views(doc)


@detectors_app.command("remove")
@handles_errors
def remove(
    name: Annotated[str, typer.Argument(help="the detector's name")], data_dir: DataDirOpt = None
) -> None:
    """Remove a detector and its files."""
    from indexer.store.db import open_store
    from search.detector import remove_detector

    settings = settings_for(data_dir)
    store = open_store(settings)
    try:
        remove_detector(settings, store, name)
    finally:
        store.dispose()
    out.print(f"removed {name}")


def result_line(path: str, r: dict[str, Any]) -> str:
    """One line of ``sleuth detect``: p(generated) (or why none), what it was scored on, every method."""
    views = r.get("views") or {}
    parts = []
    for view, v in views.items():
        what = "face crop" if view == "face" else "whole image"
        methods = ", ".join(f"{m} {p:.2f}" for m, p in v["methods"].items())
        inside = "" if v["in_distribution"] else ", out of distribution"
        parts.append(f"{what} {v['score']:.2f} [{v['method']}; {methods}{inside}]")
    if r.get("abstained"):
        head = f"no p(generated): {r.get('reason')}"
    else:
        on = "face crop" if r["scored_on"] == "face" else "whole image"
        head = f"p(generated) {r['p_generated']:.2f} on the {on}"
    return f"{path}: {head}; " + "; ".join(parts)


@handles_errors
def detect(
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders of images")],
    detector_name: Annotated[
        str | None, typer.Option("--detector", help="detector name (default: the newest trained)")
    ] = None,
    clip_model: ClipOpt = None,
    face_detector: FaceDetectorOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON document per image, one per line")
    ] = False,
) -> None:
    """Is each image generated? One line per image: p(generated) (or why the detector abstains), whether the
    face crop or the whole image was scored, every method's score, and the detector's scope."""
    from indexer.decode import decode_image, read_capped
    from indexer.store.db import open_store
    from search.detector import check_embedder, detect_image, load_detector

    settings = settings_for(data_dir, clip_model, face_detector=face_detector)
    store = open_store(settings)
    failed = 0
    try:
        detector = load_detector(store, detector_name)
        embedder = _need_clip(settings)
        check_embedder(detector, embedder)
        faces = load_face_detector(settings)
        if not as_json:
            out.print(f"detector {detector.name}: {detector.scope()}", highlight=False)
        for path in query_files(images):
            try:
                decoded = decode_image(read_capped(path, settings.limits.max_bytes), limits=settings.limits)
            except DecodeError as exc:
                failed += 1
                if as_json:
                    print_json({"path": str(path), "error": {"reason": exc.reason, "message": str(exc)}})
                else:
                    err.print(f"[red]{path}[/]: {exc}")
                continue
            except OSError as exc:
                raise SleuthError(f"cannot read {path}: {exc.strerror or exc}") from exc
            result = detect_image(
                detector, decoded.image, embedder, faces, store=store, sha256=decoded.sha256
            )
            if as_json:
                print_json({"path": str(path), "sha256": decoded.sha256, **result})
            else:
                out.print(result_line(str(path), result), highlight=False, soft_wrap=True)
    finally:
        store.dispose()
    if failed:
        raise typer.Exit(code=2)
