"""``sleuth search`` and ``sleuth demo``: query images against the indexes and print each verdict and its hits."""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from api.cli_options import (
    ClipOpt,
    DataDirOpt,
    FaceDetectorOpt,
    FaceModelOpt,
    JsonOpt,
    err,
    handles_errors,
    load_clip,
    load_face_detector,
    load_face_model,
    out,
    print_json,
    query_files,
    settings_for,
)
from api.search_output import Sink, hit_row, with_verdict
from indexer.errors import DecodeError, SleuthError
from indexer.settings import Settings

WIDE_TABLE = 120  # columns from which the hits are a table (narrower: one block per hit)


def _ingested(hit: dict[str, Any]) -> str:
    """When the hit was ingested, for hits whose sightings claim no first-seen date."""
    dates = sorted(str(x["ingested_at"])[:10] for x in hit.get("sightings") or [] if x.get("ingested_at"))
    return f"ingested {dates[0]}" if dates else ""


def print_result(doc: dict[str, Any], *, title: str, console: Console | None = None) -> None:
    """The verdict of one query, then a table of its hits: match, score, why (with units), where and when."""
    console = console or out
    query = doc["query"]
    if "sha256" in query:
        facts = f"sha256 {query['sha256'][:16]}…  {query['width']}x{query['height']} {query['format']}"
        console.print(f"[bold]{title}[/]  {facts}", highlight=False)
    else:
        console.print(f"[bold]{title}[/]", highlight=False)
    skipped = "; ".join(f"{k}: {v}" for k, v in doc.get("skipped_tiers", {}).items())
    console.print(f"tiers: {', '.join(doc['tiers'])}" + (f"  (skipped {skipped})" if skipped else ""))
    verdict = doc.get("verdict")
    if verdict:
        console.print(f"[bold]verdict ({verdict['kind']}):[/] {verdict['summary']}", highlight=False)
        for reason in verdict["reasons"][1:]:
            console.print(f"  - {reason}", highlight=False)
    if not doc["hits"]:
        return
    rows = [hit_row(doc, hit, rank) for rank, hit in enumerate(doc["hits"], 1)]
    if (
        console.width < WIDE_TABLE
    ):  # a narrow terminal: one block per hit, the source URL whole on its own line
        for row, hit in zip(rows, doc["hits"], strict=True):
            more = f" (+{row['sightings'] - 1} more sightings)" if row["sightings"] > 1 else ""
            console.print(f"[bold]{row['rank']}. {hit['match_class'].replace('_', ' ')}[/]  score {hit['score']:.3f}  "
                          f"image {hit['image_id']}", highlight=False)  # fmt: skip
            console.print(f"   why: {row['why'] or '-'}", highlight=False)
            seen = row["first_seen"] or _ingested(hit) or "-"
            console.print(
                f"   collection {row['collection'] or '-'} · first seen {seen}{more}", highlight=False
            )
            console.print(f"   source: {row['source_url']}", highlight=False, soft_wrap=True)
        return
    table = Table(show_lines=False)
    for col in ("#", "match", "score", "why", "collection", "first seen", "source", "image id"):
        table.add_column(
            col, overflow="fold", no_wrap=col in ("#", "match", "score", "first seen", "image id")
        )
    for row, hit in zip(rows, doc["hits"], strict=True):
        more = f" (+{row['sightings'] - 1} more)" if row["sightings"] > 1 else ""
        table.add_row(
            str(row["rank"]), hit["match_class"].replace("_", " "), f"{hit['score']:.3f}", row["why"] or "-",
            row["collection"] or "", row["first_seen"] or _ingested(hit), row["source_url"] + more,
            str(hit["image_id"]),
        )  # fmt: skip
    console.print(table)


FormatOpt = Annotated[
    Literal["table", "jsonl", "csv"],
    typer.Option("--format", help="table, jsonl (one JSON document per query) or csv (one row per hit)"),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", dir_okay=False, help="write the results to this file instead of stdout"),
]


@handles_errors
def search(
    images: Annotated[list[Path] | None, typer.Argument(help="image files and/or folders of images")] = None,
    text: Annotated[
        str | None, typer.Option("--text", help="search by a description in words (CLIP text tower)")
    ] = None,
    region: Annotated[
        str | None,
        typer.Option("--region", help="x,y,width,height: search only this rectangle of each image"),
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", help="only hits seen in this collection")
    ] = None,
    label: Annotated[
        Literal["generated", "stock", "real", "unknown"] | None,
        typer.Option("--label", help="only hits with this label"),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="only hits first seen on or after (YYYY-MM-DD)")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="only hits first seen on or before (YYYY-MM-DD)")
    ] = None,
    sort: Annotated[
        Literal["relevance", "first_seen"],
        typer.Option("--sort", help="relevance, or first_seen: oldest first"),
    ] = "relevance",
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="hits per query")] = 10,
    pdq_max_distance: Annotated[
        int | None, typer.Option(help="PDQ near-duplicate threshold (bits of 256)")
    ] = None,
    clip_min_similarity: Annotated[
        float | None, typer.Option(help="CLIP cosine for the similar class")
    ] = None,
    min_inliers: Annotated[int | None, typer.Option(help="RANSAC inliers that verify a copy")] = None,
    face_min_similarity: Annotated[
        float | None, typer.Option(help="face-crop CLIP cosine for a similar face (without a face model)")
    ] = None,
    same_person_max_distance: Annotated[
        float | None, typer.Option(help="face identity distance (unit descriptors) for the same person")
    ] = None,
    same_person_margin: Annotated[
        float | None,
        typer.Option(
            help="how far below the query's 10th-nearest different face a same-person hit lies (0: off)"
        ),
    ] = None,
    verify_top: Annotated[int | None, typer.Option(min=0, help="candidates verified with RANSAC")] = None,
    detector: Annotated[
        str | None,
        typer.Option(
            "--detector", help="detector for the detector tier (default: the newest trained; none: off)"
        ),
    ] = None,
    fmt: FormatOpt = "table",
    out_file: OutOpt = None,
    clip_model: ClipOpt = None,
    face_detector: FaceDetectorOpt = None,
    face_model: FaceModelOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format jsonl")] = False,
) -> None:
    """Search images, folders of images or a text: each query's verdict and its hits, in input order."""
    from indexer.decode import decode_image, read_capped
    from search.detector import detector_tier, with_detector
    from search.hit_filters import HitFilter
    from search.query import Searcher, Thresholds, result_to_json
    from search.region import Region, crop_to_region
    from search.report import query_facts

    if not images and text is None:
        raise SleuthError("give image files or folders to search, or --text DESCRIPTION")
    hit_filter = HitFilter(
        collection=collection, label=label, first_seen_from=since, first_seen_to=until, sort=sort
    )
    box = Region.parse(region) if region is not None else None
    fmt = "jsonl" if as_json else fmt
    settings = settings_for(data_dir, clip_model, face_detector=face_detector, face_model=face_model)
    thresholds = Thresholds().with_overrides(
        pdq_max_distance=pdq_max_distance,
        clip_min_similarity=clip_min_similarity,
        min_inliers=min_inliers,
        face_min_similarity=face_min_similarity,
        same_person_max_distance=same_person_max_distance,
        same_person_margin=same_person_margin,
        verify_top=verify_top,
    )
    queries = list(query_files(images or []))
    if images and not queries and text is None:
        raise SleuthError(f"no image files in {', '.join(str(p) for p in images)}: nothing to search")
    searcher = Searcher.open(
        settings, clip_model=load_clip(settings), face_detector=load_face_detector(settings),
        face_model=load_face_model(settings),
    )  # fmt: skip
    failed = 0
    try:
        with _output(out_file) as stream:
            sink = Sink(stream, fmt) if fmt != "table" else None
            console = out if out_file is None else Console(file=stream, width=240, no_color=True)
            for path in queries:
                try:
                    data = read_capped(path, settings.limits.max_bytes)
                    decoded = decode_image(data, limits=settings.limits)
                except DecodeError as exc:
                    failed += 1
                    error = {
                        "query": {"path": str(path)},
                        "error": {"reason": exc.reason, "message": str(exc)},
                    }
                    if sink is not None:
                        sink.write(error)
                    else:
                        err.print(f"[red]{path}[/]: {exc}")
                    continue
                except OSError as exc:
                    raise SleuthError(f"cannot read {path}: {exc.strerror or exc}") from exc
                facts = query_facts(decoded, data)
                if box is not None:
                    whole = decoded
                    decoded = crop_to_region(whole, box, limits=settings.limits)[0]
                    facts = query_facts(decoded)
                doc = result_to_json(searcher.search(decoded, k=k, thresholds=thresholds, filters=hit_filter))
                if detector != "none" and searcher.embedder is not None:
                    tier = detector_tier(searcher.store, searcher.embedder, searcher.face_detector, decoded,
                                         name=detector)  # fmt: skip
                    doc = with_detector(doc, tier)
                doc["query"]["path"] = str(path)
                if box is not None:
                    doc["query"]["region"] = box.to_json(whole)
                doc = with_verdict(doc, facts)
                if sink is not None:
                    sink.write(doc)
                else:
                    print_result(doc, title=str(path), console=console)
            if text is not None:
                doc = with_verdict(
                    result_to_json(searcher.search_text(text, k=k, thresholds=thresholds, filters=hit_filter))
                )
                if sink is not None:
                    sink.write(doc)
                else:
                    print_result(doc, title=f"text {text!r}", console=console)
    finally:
        searcher.close()
    if out_file is not None:
        err.print(f"wrote {len(queries)} quer{'y' if len(queries) == 1 else 'ies'} as {fmt} to {out_file}")
    if failed:
        raise typer.Exit(code=2)


@contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    """``--out FILE`` (written whole or not at all: a temporary file renamed at the end), else stdout."""
    if path is None:
        yield sys.stdout
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as stream:
            yield stream
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
