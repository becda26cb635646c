"""Load test of the API through the real server: concurrent searches while an ingest of a second collection runs.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/api_load.py \
        --eval ../shared/data/eval-v1 --first 300 --second 200 --clients 20 --searches 500

What it does, in one run:
1. splits eval-v1 (deterministic seed) into two disjoint collections, written as manifests under the work dir;
2. ingests the first one (or copies ``--seed-data-dir``, a data dir already holding it, e.g. with CLIP);
3. creates an API key, starts ``python -m api.server`` (uvicorn on 127.0.0.1) over that data dir;
4. queues the ingest of the second collection through ``POST /v1/ingest-jobs`` and, while it runs,
   ``--clients`` threads send ``--searches`` searches of modified copies (resize 0.75 + JPEG q70, every other
   one also cropped 10 %) of images of the first collection;
5. waits for the ingest, stops the server and checks that no image was lost or duplicated: the SQL rows hold
   exactly the distinct images of both collections, every sighting is there, and ``sleuth index verify``
   says SQL and FAISS agree.
Prints status counts (5xx must be 0), p50/p99 latency, recall@1 of the searches, and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.commands import keys_create  # noqa: E402
from api.testing import live_server  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from indexer.sources import EVAL_CLASS_LABELS  # noqa: E402

MANIFEST_COLUMNS = ("path", "label", "generator", "licence")


def eval_rows(eval_dir: Path) -> list[dict[str, str]]:
    """The distinct images (by SHA-256) of eval-v1 as manifest rows with absolute paths, in file order."""
    seen: set[str] = set()
    out = []
    for r in sorted(csv.DictReader((eval_dir / "manifest.csv").open()), key=lambda r: r["file"]):
        if r["sha256"] in seen:
            continue
        seen.add(r["sha256"])
        out.append({
            "path": str(eval_dir / r["file"]), "label": EVAL_CLASS_LABELS.get(r["class"], "unknown"),
            "generator": r.get("generator_if_known", ""), "licence": r.get("license", ""), "sha256": r["sha256"],
        })  # fmt: skip
    return out


def split_eval(
    eval_dir: Path, first: int, second: int, seed: int, *, taken: set[str] | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Two disjoint random subsets of eval-v1 (none of ``taken``): ``first`` and ``second`` images."""
    rows = [r for r in eval_rows(eval_dir) if r["sha256"] not in (taken or set())]
    random.Random(seed).shuffle(rows)
    if first + second > len(rows):
        raise SystemExit(f"eval set has {len(rows)} distinct images left, asked for {first} + {second}")
    return rows[:first], rows[first : first + second]


def write_manifest(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def modified_copy(path: Path, crop: bool) -> bytes:
    """Resize 0.75 and JPEG q70; with ``crop``, 10 % off every side first: a typical re-post."""
    im = Image.open(path).convert("RGB")
    if crop:
        w, h = im.size
        im = im.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    im = im.resize(
        (max(1, round(im.width * 0.75)), max(1, round(im.height * 0.75))), Image.Resampling.BILINEAR
    )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def ingest_first(settings: Settings, manifest: Path, clip_model: str | None) -> dict[str, Any]:
    from indexer.embedders import load_embedder
    from indexer.ingest import ingest

    embedder = load_embedder(clip_model) if clip_model else None
    summary = ingest(manifest, collection="first", settings=settings, embedder=embedder)
    return {"new": summary.new, "failures": summary.failures, "seconds": round(summary.seconds, 1)}


def run_load(
    url: str, token: str, queries: list[tuple[bytes, str]], clients: int
) -> tuple[list[float], Counter[int], list[bool], list[str]]:
    """``clients`` threads share the query list; returns latencies (s), status counts, top-1 correctness."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    correct: list[bool] = []
    problems: list[str] = []
    lock = threading.Lock()
    next_query = iter(range(len(queries)))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
            while True:
                with lock:
                    i = next(next_query, None)
                if i is None:
                    return
                data, expected = queries[i]
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/searches", files={"file": (f"q{i}.jpg", data, "image/jpeg")})
                except httpx.HTTPError as exc:
                    with lock:
                        statuses[0] += 1
                        problems.append(f"query {i}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - t0
                ok = False
                if r.status_code == 200:
                    ranked = sorted(
                        (h for g in r.json()["hits"].values() for h in g), key=lambda h: h["rank"]
                    )
                    ok = bool(ranked) and ranked[0]["sha256"] == expected
                with lock:
                    latencies.append(elapsed)
                    statuses[r.status_code] += 1
                    correct.append(ok)
                    if r.status_code >= 500:
                        problems.append(f"query {i}: {r.status_code} {r.text[:300]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, correct, problems


def check_store(
    settings: Settings, first: list[dict[str, str]], second: list[dict[str, str]]
) -> dict[str, Any]:
    """Lost or duplicated images after the run, from SQL; and ``sleuth index verify`` over SQL and FAISS."""
    from sqlalchemy import func, select

    from indexer.store.db import open_store
    from indexer.store.models import Collection, IngestFailure, Sighting
    from indexer.store.models import Image as ImageRow

    store = open_store(settings)
    try:
        with store.session() as s:
            shas = list(s.execute(select(ImageRow.sha256)).scalars())
            per_collection = dict(
                s.execute(
                    select(Collection.name, func.count(Sighting.id))
                    .join(Sighting, Sighting.collection_id == Collection.id)
                    .group_by(Collection.name)
                ).all()
            )
            failures = dict(s.execute(select(IngestFailure.source_key, IngestFailure.reason)).all())
    finally:
        store.dispose()
    expected = {r["sha256"] for r in first + second}
    rejected = {r["sha256"] for r in first + second if r["path"] in failures}  # decode refused them, recorded
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("sleuth")), "index", "verify", "--json", "--data-dir", str(settings.data_dir)],
        cwd=ROOT, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    verified = json.loads(verify.stdout.strip().splitlines()[-1]) if verify.stdout.strip() else {"ok": False}
    return {
        "images": len(shas), "expected_images": len(expected), "lost": len(expected - set(shas) - rejected),
        "unexpected": len(set(shas) - expected), "duplicated": len(shas) - len(set(shas)),
        "sightings": per_collection, "ingest_failures": failures, "rejected_images": len(rejected),
        "index_verify_ok": bool(verified.get("ok")) and verify.returncode == 0, "index_verify": verified,
    }  # fmt: skip


def overlap_s(job: dict[str, Any], start: dt.datetime, end: dt.datetime) -> float:
    """Seconds during which the ingest job ran while the searches ran."""
    if not job.get("started_at") or not job.get("finished_at"):
        return 0.0
    a = max(start, dt.datetime.fromisoformat(job["started_at"]).replace(tzinfo=dt.UTC))
    b = min(end, dt.datetime.fromisoformat(job["finished_at"]).replace(tzinfo=dt.UTC))
    return round(max(0.0, (b - a).total_seconds()), 1)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)) * 1000, 1) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, default=ROOT.parent / "shared" / "data" / "eval-v1")
    ap.add_argument("--first", type=int, default=300, help="images in the collection searched")
    ap.add_argument("--second", type=int, default=200, help="images ingested while the searches run")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--searches", type=int, default=500)
    ap.add_argument("--clip-model", default=None, help="e.g. onnx:PATH (the server and both ingests use it)")
    ap.add_argument("--face-detector", default=None, help="MTCNN folder (SLEUTH_FACE_DETECTOR)")
    ap.add_argument("--seed-data-dir", type=Path, default=None,
                    help="copy this data dir (already holding --first-manifest) instead of ingesting the first set")  # fmt: skip
    ap.add_argument("--first-manifest", type=Path, default=None, help="with --seed-data-dir: what it holds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sleuth-api-load"))
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "api_load.json")
    args = ap.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    data_dir = args.work / "data"
    if args.seed_data_dir:
        if not args.first_manifest:
            raise SystemExit("--seed-data-dir needs --first-manifest (the manifest it was ingested from)")
        first = list(csv.DictReader(args.first_manifest.open()))
        for r in first:
            if not r.get("sha256"):
                r["sha256"] = hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
        _, second = split_eval(args.eval, 0, args.second, args.seed, taken={r["sha256"] for r in first})
        print(f"copying {args.seed_data_dir} ...", flush=True)
        shutil.copytree(
            args.seed_data_dir, data_dir, ignore=shutil.ignore_patterns("write.lock", "*.migrate.lock")
        )
        first_ingest: dict[str, Any] = {"copied_from": str(args.seed_data_dir)}
    else:
        first, second = split_eval(args.eval, args.first, args.second, args.seed)
    settings = Settings(data_dir=data_dir, clip_model=args.clip_model, face_detector=args.face_detector)
    write_manifest(first, args.work / "first.csv")
    crawls = args.work / "crawls"
    crawls.mkdir()
    write_manifest(second, crawls / "second.csv")
    if not args.seed_data_dir:
        print(f"ingesting the first collection ({len(first)} images) ...", flush=True)
        first_ingest = ingest_first(settings, args.work / "first.csv", args.clip_model)
        print(f"  {first_ingest}", flush=True)

    rng = random.Random(args.seed)
    picks = [rng.choice(first) for _ in range(args.searches)]
    queries = [(modified_copy(Path(r["path"]), crop=i % 2 == 1), r["sha256"]) for i, r in enumerate(picks)]
    token = keys_create("load test", ["admin"], settings=settings)[1]
    env = {
        "SLEUTH_DATA_DIR": str(data_dir), "SLEUTH_INGEST_ROOTS": json.dumps([str(crawls), str(args.eval.resolve())]),
        "SLEUTH_RATE_LIMIT": "100000/second", "SLEUTH_ENVIRONMENT": "production",
    }  # fmt: skip
    if args.clip_model:
        env["SLEUTH_CLIP_MODEL"] = args.clip_model
    if args.face_detector:
        env["SLEUTH_FACE_DETECTOR"] = args.face_detector
    auth = {"Authorization": f"Bearer {token}"}
    with live_server(env, log_path=args.work / "server.log", startup_timeout_s=300) as live:
        job = httpx.post(live.url + "/v1/ingest-jobs", json={"source": str(crawls / "second.csv"), "collection": "second"},
                         headers=auth, timeout=60)  # fmt: skip
        assert job.status_code == 202, job.text
        job_url = live.url + job.json()["job_url"]
        print(f"ingest job queued; {args.clients} clients x {args.searches} searches ...", flush=True)
        t0, started_at = time.perf_counter(), dt.datetime.now(dt.UTC)
        latencies, statuses, correct, problems = run_load(live.url, token, queries, args.clients)
        load_s, ended_at = time.perf_counter() - t0, dt.datetime.now(dt.UTC)
        while (state := httpx.get(job_url, headers=auth, timeout=60).json())["status"] not in (
            "done",
            "failed",
        ):
            time.sleep(1)
        server_errors = live.log().count("Traceback")
    store_check = check_store(settings, first, second)
    n5xx = sum(c for s, c in statuses.items() if s >= 500 or s == 0)
    out = {
        "config": {
            "first": len(first), "second": len(second), "clients": args.clients, "searches": args.searches,
            "clip_model": args.clip_model, "face_detector": args.face_detector, "database": "sqlite",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "first_ingest": first_ingest, "second_ingest_job": state.get("result") or state,
        "ingest_overlap_s": overlap_s(state, started_at, ended_at), "load_window_s": round(load_s, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors_5xx": n5xx,
        "latency_ms": {"p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99),
                       "max": pct(latencies, 100)},
        "throughput_searches_per_s": round(len(latencies) / load_s, 2), "load_seconds": round(load_s, 1),
        "recall_at_1": round(sum(correct) / max(1, len(correct)), 4),
        "store": store_check, "server_tracebacks": server_errors, "problems": problems[:20],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    ok = (
        n5xx == 0
        and store_check["lost"] == 0
        and store_check["duplicated"] == 0
        and store_check["index_verify_ok"]
    )
    print(f"{'PASS' if ok else 'FAIL'}: {n5xx} 5xx, {store_check['lost']} lost, {store_check['duplicated']} duplicated, "
          f"index verify {'ok' if store_check['index_verify_ok'] else 'MISMATCH'}; p50 {out['latency_ms']['p50']} ms, "
          f"p99 {out['latency_ms']['p99']} ms, recall@1 {out['recall_at_1']}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
