"""Ingest throughput and memory against a naive baseline, in the same run, on real images and weights.

    .venv/bin/python benchmarks/ingest.py --source ../shared/data/eval-v1 \
        --clip-model onnx:$HOME/.cache/sleuth-eval-models/clip-vit-b16-openai-image.onnx

Each variant runs in its own child process (fresh data dir) so that peak memory (ru_maxrss) is its own:
- ``sleuth``: ``indexer.ingest.ingest`` (threaded decode + hash, batched embedding, one transaction per batch);
- ``naive``: decode one image, embed it alone, insert it in its own transaction, repeat; FAISS built at the end.
Prints images/s and peak RSS for both, their ratios, and bytes stored per image (database + indexes + thumbnails).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dir_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_sleuth(source: str, data_dir: Path, clip_model: str | None, limit: int | None) -> dict[str, float]:
    from indexer.embedders import load_embedder
    from indexer.ingest import ingest
    from indexer.settings import Settings

    settings = Settings(data_dir=data_dir, clip_model=clip_model)
    embedder = load_embedder(clip_model) if clip_model else None
    src = _limited_source(source, limit, data_dir.parent)
    t0 = time.perf_counter()
    summary = ingest(src, collection="eval", settings=settings, embedder=embedder, progress=True)
    seconds = time.perf_counter() - t0
    return {"items": summary.items, "new": summary.new, "failures": summary.failures, "seconds": seconds}


def run_naive(source: str, data_dir: Path, clip_model: str | None, limit: int | None) -> dict[str, float]:
    import numpy as np
    from sqlalchemy import select

    from indexer.decode import decode_image
    from indexer.embedders import load_embedder
    from indexer.errors import DecodeError, SourceError
    from indexer.hashes import compute_hashes
    from indexer.index_sync import clip_spec, sync_all
    from indexer.ingest import write_thumbnail
    from indexer.settings import Settings
    from indexer.sources import iter_source
    from indexer.store.db import open_store
    from indexer.store.models import Collection, Embedding, Image, IngestFailure, Sighting

    settings = Settings(data_dir=data_dir, clip_model=clip_model)
    embedder = load_embedder(clip_model) if clip_model else None
    store = open_store(settings)
    with store.session() as s:
        coll = Collection(name="eval")
        s.add(coll)
        s.flush()
        coll_id = coll.id
    src = _limited_source(source, limit, data_dir.parent)
    t0 = time.perf_counter()
    items = new = failures = 0
    for item in iter_source(src):
        items += 1
        try:
            decoded = decode_image(item.read(), limits=settings.limits)
        except (DecodeError, SourceError) as exc:
            failures += 1
            with store.session() as s:
                s.add(IngestFailure(collection_id=coll_id, source_key=item.key, reason="x", detail=str(exc)))
            continue
        hashes = compute_hashes(decoded.image)
        write_thumbnail(settings, decoded)
        vec = embedder.embed([decoded.image])[0] if embedder else None
        with store.session() as s:
            image_id = s.execute(select(Image.id).where(Image.sha256 == decoded.sha256)).scalar()
            if image_id is None:
                row = Image(
                    sha256=decoded.sha256, width=decoded.width, height=decoded.height, format=decoded.format,
                    num_bytes=decoded.num_bytes, label="unknown", pdq=hashes.pdq, pdq_quality=hashes.pdq_quality,
                    pdq_mirror=hashes.pdq_mirror, phash=hashes.phash, phash_mirror=hashes.phash_mirror,
                )  # fmt: skip
                s.add(row)
                s.flush()
                image_id = row.id
                new += 1
                if vec is not None and embedder is not None:
                    s.add(
                        Embedding(
                            image_id=image_id, model_key=embedder.model_key, vector=np.float32(vec).tobytes()
                        )
                    )
            s.add(Sighting(image_id=image_id, collection_id=coll_id, source_key=item.key))
    extra = (
        [clip_spec(embedder.model_key, embedder.dim, embedder.model_id, embedder.weights_sha256)]
        if embedder
        else []
    )
    sync_all(store, settings.index_dir, threshold=settings.approx_index_threshold, extra_specs=extra)
    seconds = time.perf_counter() - t0
    return {"items": items, "new": new, "failures": failures, "seconds": seconds}


def _limited_source(source: str, limit: int | None, scratch: Path) -> str:
    """The source itself, or a manifest of its first ``limit`` items (same order) for a quicker run."""
    if not limit:
        return source
    from indexer.sources import iter_source

    folder = Path(source)
    rows = []
    for i, item in enumerate(iter_source(source)):
        if i >= limit:
            break
        rows.append({"path": str((folder / item.key).resolve())})
    manifest = scratch / f"first-{limit}.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return str(manifest)


def _child(variant: str, source: str, data_dir: str, clip_model: str | None, limit: int | None) -> None:
    fn = {"sleuth": run_sleuth, "naive": run_naive}[variant]
    result = fn(source, Path(data_dir), clip_model, limit)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["stored_bytes"] = _dir_bytes(Path(data_dir))
    result["db_bytes"] = _dir_bytes(Path(data_dir) / "sleuth.db") + sum(
        _dir_bytes(p) for p in Path(data_dir).glob("sleuth.db-*")
    )
    result["index_bytes"] = _dir_bytes(Path(data_dir) / "indexes")
    result["thumb_bytes"] = _dir_bytes(Path(data_dir) / "thumbs")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "eval-v1"))
    parser.add_argument("--clip-model", default=os.environ.get("SLEUTH_CLIP_MODEL"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N items (both variants)")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SOURCE", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, source, data_dir = args.child
        _child(variant, source, data_dir, args.clip_model, args.limit)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="sleuth-bench-") as tmp:
        for variant in ("naive", "sleuth"):
            data_dir = Path(tmp) / variant
            cmd = [sys.executable, __file__, "--child", variant, args.source, str(data_dir)]
            if args.clip_model:
                cmd += ["--clip-model", args.clip_model]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][7:])
    for r in results.values():
        r["images_per_s"] = (r["items"] - r["failures"]) / r["seconds"]
        r["bytes_per_image"] = r["stored_bytes"] / max(r["new"], 1)
    s, n = results["sleuth"], results["naive"]
    summary = {
        "source": args.source,
        "clip_model": args.clip_model,
        "variants": results,
        "throughput_ratio_sleuth_over_naive": s["images_per_s"] / n["images_per_s"],
        "peak_memory_ratio_sleuth_over_naive": s["peak_rss_mb"] / n["peak_rss_mb"],
    }
    print(f"{'variant':<8} {'items':>6} {'new':>6} {'fail':>5} {'img/s':>8} {'peak MB':>8} {'bytes/img':>10}")
    for name, r in results.items():
        print(
            f"{name:<8} {r['items']:>6} {r['new']:>6} {r['failures']:>5} {r['images_per_s']:>8.2f} "
            f"{r['peak_rss_mb']:>8.0f} {r['bytes_per_image']:>10.0f}"
        )
    print(
        f"throughput sleuth/naive = {summary['throughput_ratio_sleuth_over_naive']:.2f}x; "
        f"peak memory sleuth/naive = {summary['peak_memory_ratio_sleuth_over_naive']:.2f}x"
    )
    print(
        f"sleuth bytes/image: db {s['db_bytes'] / max(s['new'], 1):.0f}, indexes {s['index_bytes'] / max(s['new'], 1):.0f}, "
        f"thumbnails {s['thumb_bytes'] / max(s['new'], 1):.0f}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
