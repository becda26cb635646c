"""Copy detection on eval-v1 with the real CLIP model, measured like DISC21, with two baselines side by side.

    .venv/bin/python benchmarks/copy_detection.py split                    # reference / held-out manifests
    SLEUTH_DATA_DIR=/tmp/sleuth-bench/eval SLEUTH_CLIP_MODEL=onnx:... sleuth ingest /tmp/sleuth-bench/reference.csv -c eval
    .venv/bin/python benchmarks/copy_detection.py run --per-transform 25   # queries -> bench-out/copy_detection.json
    .venv/bin/python benchmarks/copy_detection.py report                   # metrics at the default thresholds
    .venv/bin/python benchmarks/copy_detection.py calibrate                # threshold sweep over the recorded run

**Split**: every folder of eval-v1 loses 20 % of its files (seeded) to the held-out distractors; the
near-duplicate edit families and the scikit-image samples are all indexed. The reference index is the rest.

**Queries**: for every transform, ``--per-transform`` reference originals (never from the near-duplicate
families, whose members are copies of one another) under that transform, plus as many held-out images under the
same transform (distractors: their true answer is "not in the index").

**Run**: each query goes through the real :class:`search.query.Searcher` (same decode as ingest, the real CLIP
ONNX model, verification against the stored thumbnails) with candidate generation at the default settings and
every candidate kept with its raw per-tier scores, so that ``report`` and ``calibrate`` can apply any decision
thresholds with :func:`search.query.classify` (the very function the Searcher ranks with) without re-running.

**Metrics** (copy = match class ``exact`` or ``near_duplicate``):

- recall@1 per transform: the top copy hit of an edited original is that original;
- precision per transform: correct top copy hits / all top copy hits, over its originals and distractors;
- distractor false-match rate: distractor queries with any copy hit;
- micro average precision (DISC21 muAP): every (query, hit, score) pair of every query ranked by score; AP over
  that list with the number of queries that have a true answer as the denominator.

Baselines in the same run: PDQ alone (query hash against the reference hashes, match within Hamming distance
31, no mirror) and imagededup's PHash (``imagededup.methods.PHash``, its default ``max_distance_threshold`` 10).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import transforms as T  # noqa: E402
from indexer.decode import DecodedImage, decode_file, decode_image  # noqa: E402
from indexer.hashes import compute_hashes  # noqa: E402
from indexer.settings import Settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "eval-v1"
WORK = Path("/tmp/sleuth-bench")
OUT = ROOT / "bench-out" / "copy_detection.json"
LABEL_OF_CLASS = {
    "gan_face": "generated",
    "real_face": "real",
    "generic_photo": "stock",
    "near_dup": "unknown",
}
COPY_CLASSES = ("exact", "near_duplicate")
PDQ_STANDARD = 31
IMAGEDEDUP_PHASH_DEFAULT = 10


# --- split ----------------------------------------------------------------------------------------------
def make_split(data: Path, out: Path, *, held_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write ``reference.csv`` (to ingest) and ``heldout.csv`` (distractors, never indexed) under ``out``."""
    rows = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))
    by_folder: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in rows:
        by_folder["/".join(row["file"].split("/")[:2])].append(row)
    rng = random.Random(seed)
    ref: list[dict[str, str]] = []
    held: list[dict[str, str]] = []
    for folder in sorted(by_folder):
        group = sorted(by_folder[folder], key=lambda r: r["file"])
        if folder.startswith("near_dup") or folder.endswith("skimage"):
            ref += group
            continue
        rng.shuffle(group)
        k = round(held_fraction * len(group))
        held += group[:k]
        ref += group[k:]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("reference.csv", ref), ("heldout.csv", held)):
        path = out / name
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "generator", "licence", "sha256"])
            for row in sorted(part, key=lambda r: r["file"]):
                writer.writerow(
                    [
                        str(data / row["file"]),
                        LABEL_OF_CLASS[row["class"]],
                        row["generator_if_known"][:200],
                        row["license"][:200],
                        row["sha256"],
                    ]
                )
        paths.append(path)
    return paths[0], paths[1]


def _read_manifest(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


# --- queries --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Query:
    qid: int
    transform: str
    kind: str  # "copy" (an edited reference original) or "distractor" (an edited held-out image)
    path: str
    truth: str | None  # sha256 of the reference original, None for distractors
    seed: int


def plan_queries(
    reference: list[dict[str, str]],
    heldout: list[dict[str, str]],
    transforms: Sequence[str],
    per_transform: int,
    seed: int,
) -> list[Query]:
    """``per_transform`` originals and as many distractors per transform, seeded per transform."""
    pool = [r for r in reference if "/near_dup/" not in r["path"]]
    queries: list[Query] = []
    for ti, name in enumerate(transforms):
        rng = random.Random(seed * 1000 + ti)
        for kind, rows in (("copy", pool), ("distractor", heldout)):
            for row in rng.sample(rows, min(per_transform, len(rows))):
                truth = row["sha256"] if kind == "copy" else None
                queries.append(Query(len(queries), name, kind, row["path"], truth, rng.randrange(1 << 30)))
    return queries


def make_query_image(query: Query) -> DecodedImage:
    """The edited image through the same decode as ingest (PNG keeps the transform's own pixels)."""
    original = decode_file(query.path).image
    edited = T.apply(query.transform, original, query.seed)
    return decode_image(T.encode(edited, "PNG"))


# --- the system under test ---------------------------------------------------------------------------------
class CachingEmbedder:
    """Wraps an embedder and remembers vectors by pixel digest, so re-runs skip the CLIP forward pass of
    query images embedded before (the vectors are the model's own, computed once)."""

    def __init__(self, inner: Any, path: Path) -> None:
        self.inner, self.path = inner, path
        self.model_id, self.model_key = inner.model_id, inner.model_key
        self.dim, self.weights_sha256 = inner.dim, inner.weights_sha256
        self.cache: dict[str, np.ndarray] = {}
        if path.exists():
            with np.load(path) as z:
                self.cache = {k: z[k] for k in z.files}
        self.dirty = False

    @staticmethod
    def _key(image: Image.Image) -> str:
        return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        keys = [self._key(im) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            vecs = self.inner.embed([images[i] for i in todo])  # [m, dim]
            for j, i in enumerate(todo):
                self.cache[keys[i]] = np.asarray(vecs[j], dtype=np.float32)
            self.dirty = True
        return np.stack([self.cache[k] for k in keys]).astype(np.float32)  # [n, dim]

    def save(self) -> None:
        if self.dirty:
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, **self.cache)  # type: ignore[arg-type]
            os.replace(tmp, self.path)
            self.dirty = False


def run_system(
    queries: list[Query],
    settings: Settings,
    clip_model: str | None,
    cache: Path,
    baselines: Baselines,
    *,
    verbose: bool,
    verify_top: int | None = None,
) -> list[dict[str, Any]]:
    """Every query through the Searcher (every candidate kept with its raw per-tier scores) and the baselines."""
    from indexer.embedders import load_embedder
    from indexer.faces import load_face_detector
    from search.query import Searcher, Thresholds, candidate_thresholds

    base = Thresholds(verify_top=verify_top) if verify_top else None
    embedder = CachingEmbedder(load_embedder(clip_model), cache) if clip_model else None
    detector = load_face_detector(settings) if settings.face_detector else None  # SLEUTH_FACE_DETECTOR
    searcher = Searcher.open(settings, clip_model=embedder, face_detector=detector)  # type: ignore[arg-type]
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for n, query in enumerate(queries):
            decoded = make_query_image(query)
            t0 = time.perf_counter()
            result = searcher.search(decoded, k=1000, thresholds=candidate_thresholds(base))
            records.append(
                {
                    "qid": query.qid,
                    "seconds": time.perf_counter() - t0,
                    "timings_ms": result.timings_ms,
                    "candidates": [
                        {"sha256": h.sha256, "scores": h.scores, "exact": h.match_class == "exact"}
                        for h in result.hits
                    ],
                    "baselines": baselines.query(decoded.image),
                }
            )
            if verbose and (n + 1) % 50 == 0:
                rate = (n + 1) / (time.perf_counter() - started)
                print(f"  {n + 1}/{len(queries)} queries ({rate:.2f}/s)", file=sys.stderr, flush=True)
                if embedder:
                    embedder.save()
    finally:
        if embedder:
            embedder.save()
        searcher.close()
    return records


# --- baselines -------------------------------------------------------------------------------------------
def _bits(hex_or_bytes: str | bytes) -> np.ndarray:
    data = bytes.fromhex(hex_or_bytes) if isinstance(hex_or_bytes, str) else hex_or_bytes
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def _nearest_hamming(ref: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(reference row, distance) of the ``k`` nearest rows of ``ref`` [n, bits] to ``query`` [bits]."""
    dist = np.count_nonzero(ref != query[None, :], axis=1)  # [n]
    order = np.argsort(dist, kind="stable")[:k]
    return [(int(i), int(dist[i])) for i in order]


class Baselines:
    """PDQ alone and imagededup's PHash, over the same reference originals (hashed once, cached)."""

    def __init__(self, reference: list[dict[str, str]], cache: Path) -> None:
        from imagededup.methods import PHash

        self.phasher = PHash(verbose=False)
        self.shas = [r["sha256"] for r in reference]
        table: dict[str, dict[str, str]] = json.loads(cache.read_text()) if cache.exists() else {}
        missing = [r for r in reference if r["sha256"] not in table]
        for row in missing:
            try:
                image = decode_file(row["path"]).image
            except Exception as exc:  # noqa: BLE001 - the one corrupt file of the set is simply not indexed
                print(f"  baseline: skipping {row['path']}: {exc}", file=sys.stderr)
                continue
            table[row["sha256"]] = self._hash(image)
        if missing:
            cache.write_text(json.dumps(table))
        self.shas = [s for s in self.shas if s in table]
        self.pdq = np.stack([_bits(table[s]["pdq"]) for s in self.shas])  # [n, 256]
        self.phash = np.stack([_bits(table[s]["imagededup_phash"]) for s in self.shas])  # [n, 64]

    def _hash(self, image: Image.Image) -> dict[str, str]:
        return {
            "pdq": compute_hashes(image).pdq.hex(),
            "imagededup_phash": self.phasher.encode_image(image_array=np.asarray(image.convert("RGB"))),
        }

    def query(self, image: Image.Image, k: int = 10) -> dict[str, list[dict[str, Any]]]:
        """Nearest ``k`` reference images of each baseline with their distances."""
        h = self._hash(image)
        out: dict[str, list[dict[str, Any]]] = {}
        for name, ref, code in (
            ("pdq", self.pdq, h["pdq"]),
            ("imagededup_phash", self.phash, h["imagededup_phash"]),
        ):
            out[name] = [
                {"sha256": self.shas[i], "distance": d} for i, d in _nearest_hamming(ref, _bits(code), k)
            ]
        return out


# --- metrics ---------------------------------------------------------------------------------------------
Prediction = list[tuple[str, float]]  # (reference sha256, score), best first, only what passes the threshold


def micro_ap(queries: list[Query], predictions: dict[int, Prediction]) -> float:
    """DISC21 micro average precision over all (query, hit, score) pairs."""
    pairs = [
        (score, query.truth is not None and sha == query.truth)
        for query in queries
        for sha, score in predictions.get(query.qid, [])
    ]
    positives = sum(1 for q in queries if q.truth is not None)
    if positives == 0:
        return 0.0
    pairs.sort(key=lambda p: -p[0])
    hits = 0
    ap = 0.0
    for rank, (_score, correct) in enumerate(pairs, start=1):
        if correct:
            hits += 1
            ap += hits / rank
    return ap / positives


def summarise(queries: list[Query], predictions: dict[int, Prediction]) -> dict[str, Any]:
    """Per transform and overall: recall@1, precision of top-1, distractor false-match rate, muAP."""
    by_t: dict[str, list[Query]] = collections.defaultdict(list)
    for q in queries:
        by_t[q.transform].append(q)

    def stats(group: list[Query]) -> dict[str, Any]:
        copies = [q for q in group if q.truth is not None]
        distractors = [q for q in group if q.truth is None]
        top = {q.qid: predictions.get(q.qid, [])[:1] for q in group}
        correct = sum(1 for q in copies if top[q.qid] and top[q.qid][0][0] == q.truth)
        predicted = sum(1 for q in group if top[q.qid])
        false_distractors = sum(1 for q in distractors if top[q.qid])
        return {
            "copies": len(copies),
            "distractors": len(distractors),
            "recall_at_1": round(correct / max(len(copies), 1), 4),
            "precision": round(correct / predicted, 4) if predicted else None,
            "distractor_false_match_rate": round(false_distractors / max(len(distractors), 1), 4),
            "muAP": round(micro_ap(group, predictions), 4),
        }

    out: dict[str, Any] = {name: stats(group) for name, group in by_t.items()}
    out["ALL"] = stats(queries)
    return out


def system_predictions(
    queries: list[Query], records: dict[int, dict[str, Any]], thresholds: Any
) -> dict[int, Prediction]:
    """Copy hits of every query at ``thresholds``, scored by the Searcher's fused score, best first."""
    from search.query import classify_scores

    preds: dict[int, Prediction] = {}
    for q in queries:
        hits = []
        for cand in records[q.qid]["candidates"]:
            cls, score = classify_scores(cand["scores"], thresholds, exact=cand["exact"])
            if cls in COPY_CLASSES:
                hits.append((cand["sha256"], score))
        preds[q.qid] = sorted(hits, key=lambda h: -h[1])
    return preds


def baseline_predictions(
    queries: list[Query], records: dict[int, dict[str, Any]], name: str, bits: int, max_distance: int
) -> dict[int, Prediction]:
    preds: dict[int, Prediction] = {}
    for q in queries:
        near = records[q.qid]["baselines"][name]
        preds[q.qid] = [
            (n["sha256"], 1.0 - n["distance"] / bits) for n in near if n["distance"] <= max_distance
        ]
    return preds


def print_table(title: str, columns: dict[str, dict[str, Any]], transforms: Iterable[str]) -> None:
    names = list(columns)
    print(f"\n{title}")
    head = f"{'transform':<12}" + "".join(f" | {n:^27}" for n in names)
    print(head)
    print(f"{'':<12}" + " | recall@1  precision  false" * len(names))
    print("-" * len(head))
    for t in [*transforms, "ALL"]:
        line = f"{t:<12}"
        for n in names:
            s = columns[n][t]
            prec = "-" if s["precision"] is None else f"{s['precision']:.3f}"
            line += f" | {s['recall_at_1']:8.3f}  {prec:>9}  {s['distractor_false_match_rate']:5.3f}"
        print(line)
    print(f"{'muAP':<12}" + "".join(f" | {columns[n]['ALL']['muAP']:^27.4f}" for n in names))


# --- commands --------------------------------------------------------------------------------------------
def load_run(path: Path) -> tuple[list[Query], dict[int, dict[str, Any]], dict[str, Any]]:
    doc = json.loads(path.read_text())
    queries = [Query(**q) for q in doc["queries"]]
    records = {int(r["qid"]): r for r in doc["records"]}
    return queries, records, doc["meta"]


def report(path: Path, thresholds: Any = None) -> dict[str, Any]:
    from search.query import Thresholds

    queries, records, meta = load_run(path)
    t = thresholds or Thresholds()
    transforms = list(dict.fromkeys(q.transform for q in queries))
    columns = {
        "sleuth (defaults)": summarise(queries, system_predictions(queries, records, t)),
        "PDQ alone (31)": summarise(
            queries, baseline_predictions(queries, records, "pdq", 256, PDQ_STANDARD)
        ),
        "imagededup PHash (10)": summarise(
            queries,
            baseline_predictions(queries, records, "imagededup_phash", 64, IMAGEDEDUP_PHASH_DEFAULT),
        ),
    }
    sizes = collections.Counter(q.kind for q in queries)
    print(
        f"copy detection on {meta['reference_images']} indexed images; {sizes['copy']} edited originals + "
        f"{sizes['distractor']} distractors over {len(transforms)} transforms; thresholds {dataclasses.asdict(t)}"
    )
    print_table("recall@1 | precision of the top hit | distractor false-match rate", columns, transforms)
    seconds = [r["seconds"] for r in records.values()]
    print(
        f"\nquery time (Searcher.search, this shared CPU): median {1000 * float(np.median(seconds)):.0f} ms"
    )
    return {"thresholds": dataclasses.asdict(t), "columns": columns}


CROPS_UP_TO_30 = ("jpeg30", "resize50", "crop05", "crop10", "crop20", "crop30", "pad20", "rotate4", "flip",
                  "grayscale", "blur", "overlay", "screenshot", "combo")  # fmt: skip


def calibrate(path: Path) -> dict[str, Any]:
    """Sweep the copy thresholds on the even-numbered queries of every transform, pick the setting with the
    best recall whose distractor false-match rate is at most 1 %, and check it on the odd-numbered half."""
    from search.query import Thresholds

    queries, records, _meta = load_run(path)
    seen: dict[tuple[str, str], int] = collections.Counter()
    half: dict[int, int] = {}
    for q in queries:
        half[q.qid] = seen[(q.transform, q.kind)] % 2
        seen[(q.transform, q.kind)] += 1
    fit = [q for q in queries if half[q.qid] == 0]
    check = [q for q in queries if half[q.qid] == 1]
    rows = []
    for pdq in (-1, 8, 16, 20, 24, 28, 31):
        for inliers in (6, 8, 10, 12, 15, 18, 20, 25, 30, 40):
            t = Thresholds(pdq_max_distance=pdq, min_inliers=inliers)
            s = summarise(fit, system_predictions(fit, records, t))
            recalls = [s[n]["recall_at_1"] for n in CROPS_UP_TO_30 if n in s]
            rows.append(
                {
                    "pdq_max_distance": pdq, "min_inliers": inliers,
                    "false_match": s["ALL"]["distractor_false_match_rate"],
                    "min_recall_up_to_crop30": min(recalls) if recalls else None,
                    "recall_crop50": s.get("crop50", {}).get("recall_at_1"),
                    "recall_all": s["ALL"]["recall_at_1"], "muAP": s["ALL"]["muAP"],
                }
            )  # fmt: skip
    ok = [r for r in rows if r["false_match"] <= 0.01]
    best = max(ok, key=lambda r: (r["recall_all"], r["muAP"], r["min_inliers"], r["pdq_max_distance"]))
    print(f"{'pdq':>4} {'inl':>4} {'false':>6} {'minR<=30':>8} {'R50':>6} {'R_all':>6} {'muAP':>6}")
    for r in rows:
        mark = " <-" if r is best else ""
        print(
            f"{r['pdq_max_distance']:>4} {r['min_inliers']:>4} {r['false_match']:>6.3f} "
            f"{r['min_recall_up_to_crop30'] or 0:>8.3f} {r['recall_crop50'] or 0:>6.3f} {r['recall_all']:>6.3f} "
            f"{r['muAP']:>6.3f}{mark}"
        )
    chosen = Thresholds(pdq_max_distance=best["pdq_max_distance"], min_inliers=best["min_inliers"])
    held = summarise(check, system_predictions(check, records, chosen))
    print(
        f"\nchosen on the even half: pdq_max_distance={chosen.pdq_max_distance} min_inliers={chosen.min_inliers}"
    )
    print(f"odd half at the chosen thresholds: {json.dumps(held['ALL'])}")
    # CLIP "similar" threshold: the best CLIP similarity each distractor query gets (any indexed image)
    best_sim = sorted(
        max((c["scores"].get("clip_similarity", -1.0) for c in records[q.qid]["candidates"]), default=-1.0)
        for q in queries
        if q.truth is None
    )
    true_sim = sorted(
        next(
            (
                c["scores"].get("clip_similarity", -1.0)
                for c in records[q.qid]["candidates"]
                if c["sha256"] == q.truth
            ),
            -1.0,
        )
        for q in queries
        if q.truth is not None
    )
    q99 = float(np.quantile(best_sim, 0.99)) if best_sim else None
    print(
        f"CLIP: 99th percentile of the best similarity of a distractor query {q99:.4f}; "
        f"true source similarity of edited originals: median {float(np.median(true_sim)):.4f}, "
        f"5th percentile {float(np.quantile(true_sim, 0.05)):.4f}"
    )
    return {"sweep": rows, "chosen": dataclasses.asdict(chosen), "odd_half": held, "clip_distractor_q99": q99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["split", "run", "report", "calibrate"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--per-transform", type=int, default=25)
    parser.add_argument("--transforms", default=",".join(T.BENCHMARK_TRANSFORMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="run only the first N planned queries")
    parser.add_argument(
        "--verify-top", type=int, default=None, help="candidates verified (default: the default)"
    )
    args = parser.parse_args()

    if args.what == "split":
        print(*make_split(args.data, args.work))
        return
    if args.what == "calibrate":
        doc = calibrate(args.out)
        args.out.with_name(args.out.stem + "_calibration.json").write_text(json.dumps(doc, indent=1))
        return
    if args.what == "report":
        doc = report(args.out)
        args.out.with_name(args.out.stem + "_report.json").write_text(json.dumps(doc, indent=1))
        return

    settings = Settings()
    clip_model = settings.clip_model
    reference = _read_manifest(args.work / "reference.csv")
    heldout = _read_manifest(args.work / "heldout.csv")
    names = [n.strip() for n in args.transforms.split(",") if n.strip()]
    queries = plan_queries(reference, heldout, names, args.per_transform, args.seed)[: args.limit]
    print(
        f"{len(queries)} queries ({len(names)} transforms x {args.per_transform} originals + as many distractors); "
        f"data dir {settings.data_dir}; CLIP {clip_model}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    baselines = Baselines(reference, args.work / "baseline_hashes.json")
    cache = args.work / "query_embeddings.npz"
    records = run_system(
        queries, settings, clip_model, cache, baselines, verbose=True, verify_top=args.verify_top
    )
    meta = {
        "reference_images": len(baselines.shas),
        "heldout_images": len(heldout),
        "per_transform": args.per_transform,
        "seed": args.seed,
        "clip_model": clip_model,
        "face_detector": str(settings.face_detector) if settings.face_detector else None,
        "data_dir": str(settings.data_dir),
        "run_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "queries": [dataclasses.asdict(q) for q in queries], "records": records})
    )
    print(f"wrote {args.out} in {meta['run_seconds']} s", file=sys.stderr)
    report(args.out)


if __name__ == "__main__":
    main()
