"""The ``sleuth`` command line: a thin typer layer over the library functions.

Every command that prints results takes ``--json`` and then writes one JSON document to stdout and nothing else
(progress and logs go to stderr). Library errors (``SleuthError``) end the command with a clear message and exit 2.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from api.cli_options import (
    ClipOpt,
    DataDirOpt,
    EngineOpt,
    FaceDetectorOpt,
    FaceModelOpt,
    JsonOpt,
    RayAddressOpt,
    WorkersOpt,
    handles_errors,
    load_clip,
    load_face_detector,
    load_face_model,
    out,
    print_json,
    settings_for,
)

# Plain (click-layout) help: typer 0.29's rich help panels print a value type for every option, flags included
# (`--json <bool>`, `--help <bool>`), though a flag takes no value; the plain layout shows flags as flags.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    help="Sleuth: where does this image come from?",
)
index_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and repair the vector indexes.")
models_app = typer.Typer(no_args_is_help=True, help="List, check and pull (download) models.")
app.add_typer(index_app, name="index")
app.add_typer(models_app, name="models")


def _print_version(value: bool) -> None:
    if value:
        from search.report import code_version

        try:
            package = f"sleuth {importlib.metadata.version('sleuth')}"
        except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
            package = "sleuth (not installed)"
        out.print(f"{package} ({code_version()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log debug detail to stderr")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
@handles_errors
def ingest(
    source: Annotated[
        str, typer.Argument(help="a folder, a CSV/JSONL manifest, or WebDataset .tar shard(s)")
    ],
    collection: Annotated[str, typer.Option("--collection", "-c", help="collection name")],
    label: Annotated[str | None, typer.Option(help="generated, stock, real or unknown")] = None,
    generator: Annotated[str | None, typer.Option(help="generator name for generated images")] = None,
    clip_model: ClipOpt = None,
    face_detector: FaceDetectorOpt = None,
    face_model: FaceModelOpt = None,
    data_dir: DataDirOpt = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a crawled image set: resumable, idempotent, bad files skipped and recorded.

    With --engine processes|ray the describe step (decode, hashes, CLIP, faces) runs on --workers workers that
    load the models once each (local processes, or Ray actors on --ray-address); one writer keeps every
    guarantee of the plain ingest."""
    settings = settings_for(data_dir, clip_model, face_detector=face_detector, face_model=face_model)
    progress = not as_json and sys.stderr.isatty()
    if engine is None and ray_address is not None:
        raise typer.BadParameter("--ray-address needs --engine ray", param_hint="--ray-address")
    if engine is not None:
        from indexer.ingest_distributed import ingest_distributed

        summary = ingest_distributed(
            source, engine=engine.value, collection=collection, settings=settings, workers=workers,
            ray_address=ray_address, label=label, generator=generator, progress=progress,
        )  # fmt: skip
    else:
        from indexer.ingest import ingest as run_ingest

        embedder = load_clip(settings)
        detector = load_face_detector(settings)
        summary = run_ingest(
            source, collection=collection, settings=settings, label=label, generator=generator,
            embedder=embedder, face_detector=detector, face_model=load_face_model(settings), progress=progress,
        )  # fmt: skip
    if as_json:
        doc = asdict(summary)
        doc["images_per_s"] = summary.images_per_s
        print_json(doc)
    else:
        out.print(summary.line())
        if summary.failures:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.failure_reasons.items()))
            out.print(f"failures recorded ({reasons}); see `sleuth index stats`")


@index_app.command("stats")
@handles_errors
def index_stats(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Counts of images, sightings, collections, failures and each index."""
    from indexer.stats import collect_stats

    stats = collect_stats(settings_for(data_dir))
    if as_json:
        print_json(stats)
        return
    table = Table(title=f"Sleuth store {stats['database']}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in stats["counts"].items():
        table.add_row(key, str(value))
    for name, info in stats["indexes"].items():
        table.add_row(f"index {name} ({info['factory']})", str(info["count"]))
    out.print(table)
    for failure in stats["recent_failures"]:
        out.print(
            f"failure: {failure['collection']}/{failure['source_key']}: {failure['reason']} ({failure['detail']})"
        )


@index_app.command("verify")
@handles_errors
def index_verify(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Prove that SQL and FAISS agree (exit 1 if they do not)."""
    from indexer.index_sync import verify_all
    from indexer.store.db import open_store

    settings = settings_for(data_dir)
    store = open_store(settings)
    reports = verify_all(store, settings.index_dir)
    ok = all(r.ok for r in reports)
    if as_json:
        print_json({"ok": ok, "indexes": [asdict(r) | {"ok": r.ok} for r in reports]})
    else:
        for r in reports:
            state = "[green]ok[/]" if r.ok else "[red]MISMATCH[/] " + "; ".join(r.problems)
            out.print(f"{r.name}: sql {r.sql_count}, index {r.index_count}: {state}")
        out.print("SQL and FAISS agree" if ok else "run `sleuth index rebuild` to repair")
    if not ok:
        raise typer.Exit(1)


@index_app.command("build")
@handles_errors
def index_build(
    approx: Annotated[
        bool,
        typer.Option(
            "--approx",
            help="every float index as an on-disk IVF-PQ build with re-ranking (billion-scale layout)",
        ),
    ] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build every index from the SQL rows (holds the write lock); with --approx, float indexes on disk."""
    _rebuild(data_dir, as_json, ondisk=approx)


@index_app.command("rebuild")
@handles_errors
def index_rebuild(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Rebuild every index from the SQL rows (holds the write lock)."""
    _rebuild(data_dir, as_json, ondisk=False)


def _rebuild(data_dir: Path | None, as_json: bool, *, ondisk: bool) -> None:
    from indexer.index_sync import rebuild_all
    from indexer.store.db import open_store
    from indexer.write_lock import write_lock

    settings = settings_for(data_dir)
    store = open_store(settings)
    with write_lock(settings.data_dir, purpose="index rebuild"):
        results = rebuild_all(
            store, settings.index_dir, threshold=settings.approx_index_threshold, ondisk=ondisk,
            ondisk_threshold=settings.ondisk_index_threshold,
        )  # fmt: skip
    if as_json:
        print_json({"rebuilt": [asdict(r) for r in results]})
    else:
        for r in results:
            out.print(f"{r.name}: {r.count} vectors (build {r.build_id})")


@models_app.command("quantize")
@handles_errors
def models_quantize(
    model: Annotated[str, typer.Argument(help="an ONNX CLIP model: onnx:PATH")],
    check: Annotated[
        Path, typer.Option("--check", exists=True, help="images (a folder) to compare INT8 with FP32 on")
    ],
    limit: Annotated[int, typer.Option(min=1, help="at most this many check images")] = 64,
    min_cosine: Annotated[float, typer.Option(help="refuse the INT8 model below this cosine")] = 0.98,
    as_json: JsonOpt = False,
) -> None:
    """Write an INT8 variant of an ONNX CLIP model (dynamic quantization), kept only if it agrees with FP32."""
    from indexer.decode import decode_image
    from indexer.errors import DecodeError
    from indexer.quantize import quantize_onnx
    from indexer.sources import iter_source

    images = []
    for item in iter_source(check):
        try:
            images.append(decode_image(item.read()).image)
        except DecodeError:
            continue
        if len(images) >= limit:
            break
    result = quantize_onnx(model, check_images=images, min_cosine=min_cosine)
    if as_json:
        print_json(asdict(result))
    else:
        verdict = "kept" if result.kept else f"refused (below {min_cosine}) and removed"
        out.print(
            f"{result.model_id}: {result.int8_bytes / 1e6:.0f} MB (FP32 {result.fp32_bytes / 1e6:.0f} MB); "
            f"cosine to FP32 on {result.images} images: min {result.min_cosine:.4f}, mean "
            f"{result.mean_cosine:.4f}: {verdict}"
        )
    if not result.kept:
        raise typer.Exit(1)


@models_app.command("list")
@handles_errors
def models_list(as_json: JsonOpt = False) -> None:
    """The model settings and what each points to."""
    from indexer.model_settings import configured_models

    models = configured_models(settings_for())
    if as_json:
        print_json({"models": models})
        return
    for m in models:
        out.print(f"{m['role']:<14} {m['setting']:<22} {m['value'] or '(not set)'}")


@models_app.command("check")
@handles_errors
def models_check(
    clip_model: ClipOpt = None, face_detector: FaceDetectorOpt = None, as_json: JsonOpt = False
) -> None:
    """Load every configured model once and say whether it works (exit 1 if a configured one does not)."""
    from indexer.model_settings import check_models

    results = check_models(settings_for(clip_model=clip_model, face_detector=face_detector))
    ok = all(r["ok"] or not r["value"] for r in results)
    if as_json:
        print_json({"ok": ok, "models": results})
    else:
        for r in results:
            state = "[green]ok[/]" if r["ok"] else ("not configured" if not r["value"] else "[red]FAILED[/]")
            out.print(f"{r['role']:<14} {state} {r['message']}")
    if not ok:
        raise typer.Exit(1)


from api.cli_search import demo, search  # noqa: E402  (the verbs, registered on the app)

app.command("search")(search)
app.command("demo")(demo)

from api.cli_server import keys_app, serve, worker  # noqa: E402

app.command("serve")(serve)
app.command("worker")(worker)
app.add_typer(keys_app, name="keys")

from api.cli_projection import generators_app, project  # noqa: E402

app.add_typer(generators_app, name="generators")
app.command("project")(project)

from api.cli_models import pull as models_pull  # noqa: E402

models_app.command("pull")(models_pull)

from api.cli_detect import detect, detectors_app  # noqa: E402

app.add_typer(detectors_app, name="detectors")
app.command("detect")(detect)
