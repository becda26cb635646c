"""Query latency of the search pipeline, split into decode, embed, search, verify and metadata.

    # 10k images: the ingested eval set (real CLIP vectors, thumbnails) padded with synthetic images to 10k
    .venv/bin/python benchmarks/search_latency.py images --source /tmp/sleuth-bench/eval --total 10000
    # 1M synthetic CLIP-like vectors: approximate index (indexer.vector_index) vs exact, plus metadata lookups
    .venv/bin/python benchmarks/search_latency.py vectors --total 1000000

``images``: the data dir of an ingest of eval-v1 with the real CLIP model is copied, then padded with
synthetic images (random PDQ/pHash codes, random unit CLIP vectors, one sighting each) to ``--total`` rows,
and the FAISS indexes are re-synchronised. Queries are eval originals under random benchmark transforms,
searched with the real :class:`search.query.Searcher` (real CLIP ONNX, verification against thumbnails).
The local features of the indexed images are extracted once beforehand (the feature cache), as a running
service has them; every stage of every query is timed by the Searcher itself (decode by this script).

``vectors``: ``--total`` clustered 512-d unit vectors (a mixture of 20k Gaussian clusters: real embeddings
are clustered, uniform random vectors are not) in the approximate index that ingest builds past
``SLEUTH_APPROX_INDEX_THRESHOLD`` (IVF + SQ8 + exact re-ranking), against exact search for recall@10; and
SQLite holding as many image rows with a sighting each, for the metadata stage (the Searcher's own
``fetch_images`` and ``attach_metadata``). Queries are perturbed copies of indexed vectors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import transforms as T  # noqa: E402
from indexer.settings import Settings  # noqa: E402

OUT = ROOT / "bench-out"
# Per-dimension noise (512-d): a cluster member has cosine ~0.8 with its centre, as images of one kind have
# with each other in CLIP space; a query has cosine ~0.95 with the vector it was made from (an edited copy).
SPREAD = 0.022
QUERY_NOISE = 0.0145


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
        "mean": round(float(arr.mean()), 2),
    }


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)  # [n, dim]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _bulk_images(store: Any, n: int, start: int, rng: np.random.Generator, collection_id: int) -> list[int]:
    """Insert ``n`` synthetic image rows (random hashes) with one sighting each; returns their ids."""
    from sqlalchemy import insert, select

    from indexer.store.models import Image, Sighting

    ids: list[int] = []
    chunk = 20_000
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        codes = rng.integers(0, 256, (m, 80), dtype=np.uint8)  # pdq 32 + mirror 32 + phash 8 + mirror 8
        rows = [
            {
                "sha256": hashlib.sha256(f"synthetic-{start + lo + i}".encode()).hexdigest(),
                "width": 640,
                "height": 480,
                "format": "JPEG",
                "num_bytes": 50_000,
                "label": "unknown",
                "pdq": codes[i, :32].tobytes(),
                "pdq_quality": 100,
                "pdq_mirror": codes[i, 32:64].tobytes(),
                "phash": codes[i, 64:72].tobytes(),
                "phash_mirror": codes[i, 72:].tobytes(),
            }  # fmt: skip
            for i in range(m)
        ]
        with store.session() as s:
            s.execute(insert(Image), rows)
            shas = [r["sha256"] for r in rows]
            got = dict(s.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(shas))).all())
            new_ids = [int(got[h]) for h in shas]
            s.execute(
                insert(Sighting),
                [
                    {"image_id": i, "collection_id": collection_id, "source_key": f"synthetic/{i}.jpg",
                     "url": f"https://example.org/{i}.jpg", "label": "unknown", "first_seen": "2024-01-01"}
                    for i in new_ids
                ],
            )  # fmt: skip
        ids += new_ids
    return ids


# --- 10k images -------------------------------------------------------------------------------------------
def run_images(source: Path, work: Path, total: int, queries: int, seed: int) -> dict[str, Any]:
    from sqlalchemy import func, insert, select

    from indexer.decode import decode_file, decode_image
    from indexer.embedders import load_embedder
    from indexer.index_sync import clip_spec, sync_all
    from indexer.store.db import open_store
    from indexer.store.models import Collection, Embedding, Image, Sighting
    from search.query import Searcher, Thresholds

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("write.lock", "*.lock"))
    settings = Settings(data_dir=work)
    assert settings.clip_model, "set SLEUTH_CLIP_MODEL to the model the source data dir was ingested with"
    embedder = load_embedder(settings.clip_model)
    store = open_store(settings)
    rng = np.random.default_rng(seed)
    with store.session() as s:
        real = int(s.execute(select(func.count(Image.id))).scalar() or 0)
        coll = Collection(name="synthetic")
        s.add(coll)
        s.flush()
        collection_id = int(coll.id)
        real_rows = [
            (int(i), sha, key)
            for i, sha, key in s.execute(
                select(Image.id, Image.sha256, Sighting.source_key).join(
                    Sighting, Sighting.image_id == Image.id
                )
            ).all()
        ]
    t0 = time.perf_counter()
    ids = _bulk_images(store, max(0, total - real), 0, rng, collection_id)
    vecs = _unit(rng, len(ids), embedder.dim)
    with store.session() as s:
        for lo in range(0, len(ids), 20_000):
            s.execute(
                insert(Embedding),
                [
                    {"image_id": i, "model_key": embedder.model_key, "vector": vecs[j].tobytes()}
                    for j, i in enumerate(ids[lo : lo + 20_000], start=lo)
                ],
            )
    spec = clip_spec(embedder.model_key, embedder.dim, embedder.model_id, embedder.weights_sha256)
    sync_all(store, settings.index_dir, threshold=settings.approx_index_threshold, extra_specs=[spec])
    pad_s = time.perf_counter() - t0
    store.dispose()

    searcher = Searcher.open(settings, clip_model=embedder)
    t0 = time.perf_counter()
    rows = {row.sha256: row for row in searcher.fetch_images({i for i, _sha, _key in real_rows}).values()}
    seen = {sha for sha, row in rows.items() if searcher.candidate_features(row) is not None}  # a warm cache
    warm_s = time.perf_counter() - t0

    originals = [key for _i, _sha, key in real_rows if "/near_dup/" not in key]
    pick = rng.choice(len(originals), size=queries + 3, replace=False)
    names = [n for n in T.BENCHMARK_TRANSFORMS]
    stages: dict[str, list[float]] = {
        k: []
        for k in ("decode", "embed", "search", "verify", "metadata", "total", "search_cpu", "verify10_wall",
                  "verify10_cpu")
    }  # fmt: skip
    found = 0
    for n, idx in enumerate(pick):
        key = originals[int(idx)]
        edit = names[n % len(names)]
        data = T.encode(T.apply(edit, decode_file(key).image, seed + n), "JPEG")
        t = time.perf_counter()
        decoded = decode_image(data)
        decode_ms = (time.perf_counter() - t) * 1000
        c0 = time.process_time()
        result = searcher.search(decoded, k=10)
        total_ms = (time.perf_counter() - t) * 1000
        cpu_ms = (time.process_time() - c0) * 1000
        # Verification of 10 candidates alone, wall and CPU time: this machine is shared, and CPU time of this
        # one-thread process is what the stage costs on an idle core.
        shas = [h.sha256 for h in result.hits if h.sha256 in rows][:10]
        shas += [sha for sha in seen if sha not in shas][: 10 - len(shas)]
        feats = [f for f in (searcher.candidate_features(rows[sha]) for sha in shas) if f is not None]
        v0, c1 = time.perf_counter(), time.process_time()
        searcher.verifier.verify_many(decoded.image, feats, min_inliers=Thresholds().min_inliers)
        verify10 = ((time.perf_counter() - v0) * 1000, (time.process_time() - c1) * 1000)
        if n < 3:
            continue  # warm-up: thread pools, ONNX session, allocator
        stages["search_cpu"].append(cpu_ms)
        stages["verify10_wall"].append(verify10[0])
        stages["verify10_cpu"].append(verify10[1])
        ms = result.timings_ms
        stages["decode"].append(decode_ms)
        for k in ("embed", "search", "verify", "metadata"):
            stages[k].append(ms.get(k, 0.0))
        stages["total"].append(total_ms)
        top = result.hits[0] if result.hits else None
        found += bool(top and top.match_class in ("exact", "near_duplicate") and top.sightings
                      and top.sightings[0]["source_key"] == key)  # fmt: skip
    searcher.close()
    n_index = searcher.clip.ntotal if searcher.clip else 0
    return {
        "images": total,
        "real_images": real,
        "clip_index": {"count": n_index, "factory": searcher.clip.info.factory if searcher.clip else None},
        "queries": len(stages["total"]),
        "latency_ms": {k: _pct(v) for k, v in stages.items()},
        "top1_is_source_rate": round(found / max(1, len(stages["total"])), 3),
        "padding_s": round(pad_s, 1),
        "feature_cache_warm_s": round(warm_s, 1),
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


# --- 1M vectors -------------------------------------------------------------------------------------------
def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    which = rng.integers(0, len(centres), n)
    v = centres[which] + spread * rng.standard_normal((n, centres.shape[1])).astype(np.float32)  # [n, d]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def run_vectors(work: Path, total: int, queries: int, seed: int, nlist: int | None) -> dict[str, Any]:
    import faiss

    from indexer.store.db import open_store
    from indexer.store.models import Collection
    from indexer.vector_index import FloatIndex, IndexInfo, approximate_factory
    from search.query import Hit, Searcher, _knn

    dim = 512
    rng = np.random.default_rng(seed)
    centres = _unit(rng, 20_000, dim)
    if work.exists():
        shutil.rmtree(work)
    settings = Settings(data_dir=work)
    store = open_store(settings)
    with store.session() as s:
        coll = Collection(name="synthetic")
        s.add(coll)
        s.flush()
        collection_id = int(coll.id)
    t0 = time.perf_counter()
    ids = np.asarray(_bulk_images(store, total, 0, rng, collection_id), dtype=np.int64)
    sql_s = time.perf_counter() - t0

    factory = approximate_factory(total) if nlist is None else f"IDMap2,IVF{nlist},SQ8,RFlat"
    index = FloatIndex(IndexInfo(name="clip-synthetic", kind="float", dim=dim, factory=factory))
    faiss.extract_index_ivf(index.index).cp.niter = 10  # k-means iterations: build time only
    exact = faiss.IndexFlatIP(dim)
    t0 = time.perf_counter()
    index.train(_clustered(rng, centres, min(total, 64 * int(factory.split("IVF")[1].split(",")[0])), SPREAD))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunk = 100_000
    for lo in range(0, total, chunk):
        v = _clustered(rng, centres, min(chunk, total - lo), SPREAD)
        index.add(ids[lo : lo + len(v)], v)
        exact.add(v)
    add_s = time.perf_counter() - t0
    # Queries: perturbed copies of indexed vectors (an edited copy of an indexed image)
    picks = rng.choice(total, size=queries, replace=False)
    base = np.vstack([exact.reconstruct(int(i)) for i in picks])  # [q, d]
    q = base + QUERY_NOISE * rng.standard_normal(base.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, truth = exact.search(q, 10)  # [q, 10] positions
    truth_ids = ids[truth]

    faiss.omp_set_num_threads(1)  # a query runs on one core, as beside other queries on this 2-core machine
    searcher = Searcher.open(settings)
    search_ms, meta_ms, recall = [], [], []
    for n in range(queries + 3):
        qi = n % queries
        t = time.perf_counter()
        hits_sim = _knn(index, q[qi : qi + 1], 20)
        t1 = time.perf_counter()
        images = searcher.fetch_images(set(hits_sim))
        top = sorted(hits_sim, key=lambda i: -hits_sim[i])[:10]
        hits = [Hit(image_id=i, scores={"clip_similarity": hits_sim[i]}) for i in top]
        searcher.attach_metadata(hits, images)
        t2 = time.perf_counter()
        assert all(h.sightings for h in hits)
        if n < 3:
            continue
        search_ms.append((t1 - t) * 1000)
        meta_ms.append((t2 - t1) * 1000)
        recall.append(len(set(top) & set(truth_ids[qi].tolist())) / 10)
    searcher.close()
    both = [a + b for a, b in zip(search_ms, meta_ms, strict=True)]
    return {
        "vectors": total,
        "factory": factory,
        "nprobe": index.nprobe,
        "k_factor": index.k_factor,
        "queries": queries,
        "recall_at_10_vs_exact": round(float(np.mean(recall)), 4),
        "latency_ms": {"search": _pct(search_ms), "metadata": _pct(meta_ms), "search+metadata": _pct(both)},
        "build_s": {"sql_rows": round(sql_s, 1), "train": round(train_s, 1), "add": round(add_s, 1)},
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["images", "vectors"])
    parser.add_argument("--source", type=Path, default=Path("/tmp/sleuth-bench/eval"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--total", type=int, default=None)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ingest's own choice)")
    args = parser.parse_args()
    if args.what == "images":
        work = args.work or Path("/tmp/sleuth-bench/lat10k")
        doc = run_images(args.source, work, args.total or 10_000, args.queries, args.seed)
    else:
        work = args.work or Path("/tmp/sleuth-bench/lat1m")
        doc = run_vectors(work, args.total or 1_000_000, args.queries, args.seed, args.nlist)
    print(json.dumps(doc, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / f"search_latency_{args.what}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
