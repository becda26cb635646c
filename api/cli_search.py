"""``sleuth search`` and ``sleuth demo``: query images against the indexes and print ranked hits."""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from api.cli_options import (
    ClipOpt,
    DataDirOpt,
    JsonOpt,
    err,
    handles_errors,
    load_clip,
    load_face_detector,
    out,
    print_json,
    settings_for,
)
from indexer.errors import DecodeError, SleuthError
from indexer.settings import Settings


def _query_files(inputs: list[Path]) -> Iterator[Path]:
    """Each input file, and each file under an input folder (recursive, stable order), in input order."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.exists():
            yield path
        else:
            raise SleuthError(f"no such file or folder: {path}")


def _short(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_result(doc: dict[str, Any], *, title: str) -> None:
    """A readable ranked table of one query's hits, with the tiers that ran."""
    query = doc["query"]
    out.print(
        f"[bold]{title}[/]  sha256 {query['sha256'][:16]}…  {query['width']}x{query['height']} {query['format']}"
    )
    skipped = "; ".join(f"{k}: {v}" for k, v in doc.get("skipped_tiers", {}).items())
    out.print(f"tiers: {', '.join(doc['tiers'])}" + (f"  (skipped {skipped})" if skipped else ""))
    if not doc["hits"]:
        out.print("[yellow]no match[/]: nothing in the index is a copy of or similar to this image")
        return
    table = Table(show_lines=False)
    for col in ("#", "match", "score", "evidence", "label", "first seen", "source"):
        table.add_column(col, overflow="fold")
    for rank, hit in enumerate(doc["hits"], 1):
        s = hit["scores"]
        evidence = ", ".join(
            f"{name} {s[key]}"
            for key, name in (
                ("pdq_distance", "pdq"), ("phash_distance", "phash"), ("clip_similarity", "clip"),
                ("face_similarity", "face"), ("inliers", "inliers"),
            )
            if key in s
        )  # fmt: skip
        sightings = hit["sightings"]
        claimed = [x["first_seen"] for x in sightings if x["first_seen"]]
        ingested = [x["ingested_at"][:10] + " (ingested)" for x in sightings if x.get("ingested_at")]
        first_seen = min(claimed, default=min(ingested, default=""))
        source = sightings[0]["url"] or sightings[0]["source_key"] if sightings else ""
        more = f" (+{len(sightings) - 1} more)" if len(sightings) > 1 else ""
        table.add_row(
            str(rank), hit["match_class"], f"{hit['score']:.3f}", evidence, hit["label"] or "",
            first_seen, _short(source, 60) + more,
        )  # fmt: skip
    out.print(table)


@handles_errors
def search(
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders of images")],
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="hits per query")] = 10,
    pdq_max_distance: Annotated[
        int | None, typer.Option(help="PDQ near-duplicate threshold (bits of 256)")
    ] = None,
    clip_min_similarity: Annotated[
        float | None, typer.Option(help="CLIP cosine for the similar class")
    ] = None,
    min_inliers: Annotated[int | None, typer.Option(help="RANSAC inliers that verify a copy")] = None,
    face_min_similarity: Annotated[float | None, typer.Option(help="face cosine for a face match")] = None,
    verify_top: Annotated[int | None, typer.Option(min=0, help="candidates verified with RANSAC")] = None,
    clip_model: ClipOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search one image, several, or folders; with --json one JSON document per line per query, in input order."""
    from indexer.decode import decode_file
    from search.query import Searcher, Thresholds, result_to_json

    settings = settings_for(data_dir, clip_model)
    thresholds = Thresholds().with_overrides(
        pdq_max_distance=pdq_max_distance,
        clip_min_similarity=clip_min_similarity,
        min_inliers=min_inliers,
        face_min_similarity=face_min_similarity,
        verify_top=verify_top,
    )
    searcher = Searcher.open(
        settings, clip_model=load_clip(settings), face_detector=load_face_detector(settings)
    )
    failed = 0
    try:
        for path in _query_files(images):
            try:
                decoded = decode_file(path, limits=settings.limits)
            except DecodeError as exc:
                failed += 1
                if as_json:
                    print_json(
                        {"query": {"path": str(path)}, "error": {"reason": exc.reason, "message": str(exc)}}
                    )
                else:
                    err.print(f"[red]{path}[/]: {exc}")
                continue
            doc = result_to_json(searcher.search(decoded, k=k, thresholds=thresholds))
            doc["query"]["path"] = str(path)
            if as_json:
                print_json(doc)
            else:
                print_result(doc, title=str(path))
    finally:
        searcher.close()
    if failed:
        raise typer.Exit(code=2)


def make_modified_copy(original: Path, target: Path) -> None:
    """What a re-poster does to an image: crop 10 %, shrink to 80 %, burn in a caption, recompress at JPEG q45."""
    from PIL import Image, ImageDraw

    with Image.open(original) as im:
        image = im.convert("RGB")
    w, h = image.size
    dx, dy = w // 20, h // 20
    image = image.crop((dx, dy, w - dx, h - dy))
    image = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, image.height - 26, image.width, image.height), fill=(0, 0, 0))
    draw.text((8, image.height - 20), "SHARED 1M TIMES - real or fake?", fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=45)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buf.getvalue())


def demo_corpus(settings: Settings) -> Path:
    """scikit-image's bundled sample photographs, copied under the data dir (available offline)."""
    import skimage.data

    corpus = settings.data_dir / "demo" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(skimage.data.data_dir).iterdir()):
        if src.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff"}:
            dst = corpus / src.name
            if not dst.exists():
                shutil.copyfile(src, dst)
    return corpus


@handles_errors
def demo(
    clip_model: ClipOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a small offline corpus, modify one of its images, search for it and print the result."""
    from indexer.decode import decode_file
    from indexer.ingest import ingest as run_ingest
    from search.query import Searcher, result_to_json

    settings = settings_for(data_dir, clip_model)
    corpus = demo_corpus(settings)
    embedder = load_clip(settings)
    say = err.print if as_json else out.print
    say(f"[bold]1. ingest[/] {corpus} as collection 'demo'")
    summary = run_ingest(
        corpus, collection="demo", settings=settings, label="stock", embedder=embedder,
        progress=not as_json and sys.stderr.isatty(),
    )  # fmt: skip
    say("   " + summary.line())
    query_path = settings.data_dir / "demo" / "query-chelsea-modified.jpg"
    make_modified_copy(corpus / "chelsea.png", query_path)
    say(f"[bold]2. query[/] {query_path}: chelsea.png cropped 10 %, resized to 80 %, captioned, JPEG q45")
    searcher = Searcher.open(settings, clip_model=embedder)
    try:
        doc = result_to_json(searcher.search(decode_file(query_path, limits=settings.limits), k=5))
    finally:
        searcher.close()
    doc["query"]["path"] = str(query_path)
    if as_json:
        print_json({"ingest": asdict(summary), "search": doc})
        return
    out.print("[bold]3. result[/]")
    print_result(doc, title=query_path.name)
    top = doc["hits"][0] if doc["hits"] else None
    if top and top["match_class"] in ("exact", "near_duplicate") and top["sightings"]:
        out.print(f"[green]found[/]: a {top['match_class']} of {top['sightings'][0]['source_key']}")
    else:
        raise SleuthError("the demo query was not found as a copy: the index or the verifier is broken")
