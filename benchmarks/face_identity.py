"""Face identity on real faces: the same-person class of the face tier (MTCNN + dlib's ResNet descriptor).

    SLEUTH_FACE_DETECTOR=$M/mtcnn .venv/bin/python benchmarks/face_identity.py --data ../shared/data/eval-v1 \\
        --clip-model onnx:$M/clip-vit-b16-openai-image.onnx

What it measures (every face: MTCNN, the most confident face of the image, the face model on it):

1. ``pairs``: eval-v1 ``real_face/deepface_pairs.csv`` (pairs of ``real_face/deepface_tests`` photos of public
   figures, labelled same person or not by the deepface project): how many same-person pairs are called the same
   person, how many different-person pairs are (target: all found, none falsely).
2. ``different``: 1,000 pairs of faces of different people, drawn (seeded) from eval-v1's generated faces (three
   GAN sets: every image a different person) and UTKFace crops (different people as far as its labels tell):
   a third generated-generated, a third UTKFace-UTKFace, a third mixed. The false "same person" rate (target
   <= 1 %). The threshold is chosen on a second, disjoint draw of 5,000 such pairs (``--calibration-seed``), as the
   largest distance at which at most 0.02 % of those are called the same person (``--max-rate``), then measured
   on the first; a sweep of other thresholds is printed beside it.
3. ``unindexed``: faces that are not in the index (held-out generated faces, and held-out UTKFace faces, children
   among them) searched against the faces of every other image: how many hits each gets as "same person" (they
   are all different people: the right count is 0), against the baseline of CLIP on the aligned face crop at the
   face tier's 0.85 cosine, the "similar" hits the face tier gave before (needs ``--clip-model``).

4. ``search``: the same figures as a search (1:N) makes them, with Sleuth's default same-person rule
   (search/same_person.py: the pair threshold 0.30 and a margin below the query's cohort distance, its 10th-nearest
   face farther than the pair threshold). The margin is chosen on leave-one-out searches of the gallery faces
   (each against the others; none of them is a held-out query) as the smallest of 0.00, 0.01, ... 0.20 at which
   at most 2 % of those searches get a same-person hit (``--max-search-rate``), then measured on the unindexed
   queries (every hit listed, to be looked at), and on each labelled deepface pair searched as a query against
   the gallery plus its partner (same person: is the partner a same-person hit; different: is it not). Beside it,
   the alternative tried: a threshold from the gallery size alone (the impostor-distance quantile at 1 % / N over
   all pairs of gallery faces, ``--search-rate``).

The classic dlib rule (Euclidean distance of raw descriptors < 0.6) is reported beside Sleuth's unit-descriptor
distance. JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.face_identity import DLIB_PACKAGED, DlibFaceEmbedder, load_face_model  # noqa: E402
from indexer.faces import describe_faces  # noqa: E402
from indexer.mtcnn import FaceDetector  # noqa: E402
from search.query import Thresholds  # noqa: E402
from search.same_person import same_person_decision  # noqa: E402

GENERATED = ("gan_face/tpdne_2022", "gan_face/stylegan3_r_ffhq", "gan_face/boredhumans_basemax")
UTKFACE = "real_face/utkface"
CLASSIC_RAW = 0.6  # dlib's documented rule on raw descriptors
CLIP_FACE_COSINE = 0.85  # the face tier's face_min_similarity for CLIP face crops


@dataclass
class Face:
    path: str
    unit: np.ndarray  # [128] unit descriptor (what Sleuth stores)
    raw: np.ndarray  # [128] raw dlib descriptor
    clip: np.ndarray | None  # [D] CLIP embedding of the aligned crop, when a CLIP model is given


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def _load_cache(path: Path | None) -> dict[str, Face | None]:
    """Descriptors of earlier runs (``.npz``, no pickles): re-running with other options costs no detection."""
    if path is None or not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        keys, raw = [str(k) for k in z["keys"]], z["raw"]
        clip = z["clip"] if "clip" in z.files else None
    out: dict[str, Face | None] = {}
    for i, key in enumerate(keys):
        if np.isfinite(raw[i]).all():
            out[key] = Face(key, raw[i] / np.linalg.norm(raw[i]), raw[i], None if clip is None else clip[i])
        else:
            out[key] = None
    return out


def _save_cache(path: Path | None, faces: dict[str, Face | None]) -> None:
    if path is None or not faces:
        return
    keys = sorted(faces)
    arrays = {
        "keys": np.array(keys),
        "raw": np.stack([f.raw if f else np.full(128, np.nan) for f in map(faces.get, keys)]),
    }
    clips = [f.clip for f in faces.values() if f is not None]
    if clips and all(c is not None for c in clips):
        zero = np.zeros_like(clips[0])
        arrays["clip"] = np.stack(
            [f.clip if f is not None and f.clip is not None else zero for f in map(faces.get, keys)]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def describe(paths: list[Path], detector: FaceDetector, model: DlibFaceEmbedder, clip: object | None,
             root: Path, cache: dict[str, Face | None]) -> dict[str, Face | None]:  # fmt: skip
    """The most confident face of each image (None when MTCNN finds none); cached ones are not described again."""
    out: dict[str, Face | None] = {}
    started = time.perf_counter()
    for n, path in enumerate(paths, 1):
        key = path.relative_to(root).as_posix()
        cached = cache.get(key, False)
        if cached is None or (isinstance(cached, Face) and (clip is None or cached.clip is not None)):
            out[key] = cached
            continue
        image = Image.open(path).convert("RGB")
        found = describe_faces(image, detector, max_faces=1)
        if not found:
            out[key] = None
            continue
        raw = model.descriptors(image, [found[0][0]])[0]
        vec = None
        if clip is not None:
            vec = np.asarray(clip.embed([found[0][1]]), dtype=np.float32)[0]  # type: ignore[attr-defined]
        out[key] = Face(key, raw / np.linalg.norm(raw), raw, vec)
        if n % 100 == 0:
            print(
                f"  {n}/{len(paths)} faces described ({time.perf_counter() - started:.0f} s)", file=sys.stderr
            )
    return out


def unit_distance(a: Face, b: Face) -> float:
    return float(np.linalg.norm(a.unit - b.unit))


def raw_distance(a: Face, b: Face) -> float:
    return float(np.linalg.norm(a.raw - b.raw))


def different_pairs(generated: list[str], utk: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct pairs of distinct images: a third generated-generated, a third UTKFace, a third mixed."""
    rng = random.Random(seed)
    pairs: set[tuple[str, str]] = set()
    kinds = [(generated, generated), (utk, utk), (generated, utk)]
    while len(pairs) < n:
        a_pool, b_pool = kinds[len(pairs) % 3]
        a, b = rng.choice(a_pool), rng.choice(b_pool)
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def choose_threshold(distances: list[float], max_rate: float) -> float:
    """The largest distance threshold at which at most ``max_rate`` of ``distances`` (different people) pass."""
    ordered = sorted(distances)
    allowed = int(np.floor(max_rate * len(ordered)))
    # a threshold below the (allowed+1)-th smallest distance lets exactly `allowed` pairs through
    return round(float(ordered[allowed]) - 1e-4, 4)


def _distances(query: np.ndarray, others: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * others @ query))  # [M] unit-descriptor distances


def _search(d: np.ndarray, t: Thresholds, margin: float) -> tuple[np.ndarray, float]:
    """The same-person hits (a mask over ``d``) of a query whose distances to the N gallery faces are ``d``."""
    nearest = np.sort(d)[: t.clip_k + t.same_person_cohort_rank]  # what the search asks the index for
    decision = same_person_decision(nearest.tolist(), pair_threshold=t.same_person_max_distance, margin=margin,
                                    cohort_rank=t.same_person_cohort_rank, gallery_faces=len(d))  # fmt: skip
    return d <= decision.threshold, decision.threshold


def search_figures(found: dict[str, Face], gallery: list[str], held: list[str],
                   labelled: list[tuple[str, str, bool]], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Section 4 of the module doc: the 1:N same-person rule, calibrated and measured."""
    t = Thresholds()
    g = np.stack([found[k].unit for k in gallery])  # [G, 128]
    loo = g @ g.T  # [G, G] cosines
    np.fill_diagonal(loo, -1.0)  # a face is not its own neighbour
    loo_d = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * loo))  # [G, G]
    margins = [round(0.01 * i, 2) for i in range(21)]
    with_hit = {m: sum(int(_search(row, t, m)[0].any()) for row in loo_d) for m in margins}
    allowed = args.max_search_rate * len(gallery)
    margin = next((m for m in margins if with_hit[m] <= allowed), margins[-1])
    pairs_d = loo_d[np.triu_indices(len(gallery), 1)]  # every pair of gallery faces (different people)
    size_threshold = round(float(np.quantile(pairs_d, args.search_rate / len(gallery))), 4)

    def measure(rule: str) -> dict[str, Any]:
        def decide(d: np.ndarray) -> tuple[np.ndarray, float]:
            if rule == "gallery_size_threshold":
                return d <= min(t.same_person_max_distance, size_threshold), size_threshold
            return _search(d, t, margin if rule == "rule" else 0.0)

        hits = []
        for key in held:
            mask, at = decide(_distances(found[key].unit, g))
            hits += [{"query": key, "hit": gallery[i], "distance": round(float(_distances(found[key].unit, g[i:i + 1])[0]), 4),
                      "threshold": at} for i in np.flatnonzero(mask)]  # fmt: skip
        calls = {True: [0, 0], False: [0, 0]}  # same person?: [partner called the same person, searches]
        for a, b, same in labelled:
            for x, y in ((a, b), (b, a)):
                d = _distances(found[x].unit, np.vstack([g, found[y].unit[None]]))  # the partner is the last
                calls[same][0] += int(decide(d)[0][-1])
                calls[same][1] += 1
        return {"unindexed_queries_with_same_person": len({h["query"] for h in hits}),
                "unindexed_same_person_hits": len(hits), "unindexed_hits": hits,
                "deepface_same_found": calls[True][0], "deepface_same_searches": calls[True][1],
                "deepface_different_called_same": calls[False][0], "deepface_different_searches": calls[False][1]}  # fmt: skip

    return {
        "calibration_searches": len(gallery), "calibration_with_a_hit_by_margin": with_hit,
        "calibration_with_a_hit_at_margin": with_hit[margin],
        "margin_rule": f"smallest margin with <= {args.max_search_rate:.0%} of the leave-one-out searches given a hit",
        "rule": {"pair_threshold": t.same_person_max_distance, "margin": margin,
                 "cohort_rank": t.same_person_cohort_rank, "sleuth_default_margin": t.same_person_margin,
                 **measure("rule")},
        "pair_threshold_alone": measure("pair"),
        "gallery_size_threshold": {"threshold": size_threshold, "rule": f"impostor quantile at {args.search_rate:.0%}"
                                   f" / {len(gallery)} over {len(pairs_d)} gallery pairs", **measure("gallery_size_threshold")},
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eval-v1")
    ap.add_argument("--face-detector", type=Path, default=os.environ.get("SLEUTH_FACE_DETECTOR"))
    ap.add_argument("--face-model", default=DLIB_PACKAGED)
    ap.add_argument("--clip-model", default=None, help="CLIP id for the face-crop baseline (optional)")
    ap.add_argument("--pairs", type=int, default=1000, help="different-person pairs measured")
    ap.add_argument(
        "--calibration-pairs", type=int, default=5000, help="different-person pairs calibrated on"
    )
    ap.add_argument(
        "--max-rate", type=float, default=0.0002, help="false same-person rate allowed on calibration"
    )
    ap.add_argument("--per-set", type=int, default=150, help="faces drawn from each generated set")
    ap.add_argument("--utkface", type=int, default=450, help="UTKFace faces drawn")
    ap.add_argument(
        "--held-out", type=int, default=40, help="unindexed queries from each of generated and UTKFace"
    )
    ap.add_argument(
        "--max-search-rate",
        type=float,
        default=0.02,
        help="calibration searches allowed a false same-person hit when choosing the margin",
    )
    ap.add_argument(
        "--search-rate",
        type=float,
        default=0.01,
        help="per-search false-match rate of the gallery-size threshold tried beside it",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-seed", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-out" / "face_identity_descriptors.npz")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "face_identity.json")
    args = ap.parse_args()
    if args.face_detector is None:
        ap.error("give --face-detector (or SLEUTH_FACE_DETECTOR): the MTCNN weights folder")
    detector = FaceDetector.from_dir(args.face_detector)
    model = load_face_model(args.face_model)
    assert isinstance(model, DlibFaceEmbedder)
    clip = None
    if args.clip_model:
        from indexer.embedders import load_embedder

        clip = load_embedder(args.clip_model)
    data = args.data
    rng = random.Random(args.seed)
    deepface = _files(data / "real_face" / "deepface_tests")
    generated = [p for sub in GENERATED for p in rng.sample(_files(data / sub), args.per_set)]
    utk = rng.sample(_files(data / UTKFACE), args.utkface)
    print(
        f"describing {len(deepface)} deepface, {len(generated)} generated, {len(utk)} UTKFace images",
        file=sys.stderr,
    )
    cache = _load_cache(args.cache)
    started = time.perf_counter()
    faces = describe(deepface + generated + utk, detector, model, clip, data, cache)
    seconds = time.perf_counter() - started
    _save_cache(args.cache, {**cache, **faces})
    found = {k: f for k, f in faces.items() if f is not None}
    missed = sorted(k for k, f in faces.items() if f is None)

    # 1. the labelled deepface pairs
    labelled = []
    with (data / "real_face" / "deepface_pairs.csv").open() as fh:
        for row in csv.DictReader(fh):
            a, b = f"real_face/deepface_tests/{row['file_x']}", f"real_face/deepface_tests/{row['file_y']}"
            if a in found and b in found:
                labelled.append((a, b, row["same_person"] == "yes"))
    same = [(a, b) for a, b, s in labelled if s]
    diff = [(a, b) for a, b, s in labelled if not s]

    # 2. different people: calibrate on one draw, measure on a disjoint one
    gen_keys = [k for k in found if k.startswith("gan_face/")]
    utk_keys = [k for k in found if k.startswith(UTKFACE)]
    measured = different_pairs(gen_keys, utk_keys, args.pairs, args.seed)
    taken = set(measured)
    drawn = different_pairs(gen_keys, utk_keys, args.calibration_pairs + args.pairs, args.calibration_seed)
    calibration = [p for p in drawn if p not in taken][: args.calibration_pairs]
    threshold = choose_threshold([unit_distance(found[a], found[b]) for a, b in calibration], args.max_rate)

    # 3. unindexed faces searched against every other face
    held = rng.sample(gen_keys, args.held_out) + rng.sample(utk_keys, args.held_out)
    held_set = set(held)
    gallery = [k for k in found if k not in held_set and not k.startswith("real_face/deepface")]
    g_unit = np.stack([found[k].unit for k in gallery])  # [G, 128]
    query_dist = {key: np.linalg.norm(g_unit - found[key].unit, axis=1) for key in held}  # each [G]
    clip_similar: dict[str, int] | None = None
    if clip is not None:
        g_clip = np.stack([found[k].clip for k in gallery])  # type: ignore[misc]  # [G, D]
        cos = {key: g_clip @ found[key].clip for key in held}  # each [G]
        clip_similar = {"hits": sum(int((c >= CLIP_FACE_COSINE).sum()) for c in cos.values()),
                        "queries_with_a_hit": sum(int((c >= CLIP_FACE_COSINE).any()) for c in cos.values())}  # fmt: skip

    def count(pairs: list[tuple[str, str]], at: float) -> int:
        return sum(unit_distance(found[a], found[b]) <= at for a, b in pairs)

    def classic(pairs: list[tuple[str, str]]) -> int:
        return sum(raw_distance(found[a], found[b]) < CLASSIC_RAW for a, b in pairs)

    def spread(pairs: list[tuple[str, str]]) -> dict[str, float]:
        d = [unit_distance(found[a], found[b]) for a, b in pairs]
        return {"min": round(min(d), 4), "median": round(statistics.median(d), 4), "max": round(max(d), 4)}

    search = search_figures(found, gallery, held, labelled, args)

    sweep = []
    for at in sorted({0.2, 0.25, 0.28, 0.3, 0.32, 0.34, 0.36, 0.4, threshold}):
        sweep.append({
            "threshold": at, "deepface_same_found": count(same, at), "deepface_different_called_same": count(diff, at),
            "different_people_called_same": count(measured, at),
            "unindexed_queries_with_same_person": sum(int((d <= at).any()) for d in query_dist.values()),
            "unindexed_same_person_hits": sum(int((d <= at).sum()) for d in query_dist.values()),
        })  # fmt: skip
    chosen = next(r for r in sweep if r["threshold"] == threshold)
    report = {
        "face_model": model.model_id, "weights_sha256": model.weights_sha256, "threshold_unit_distance": threshold,
        "threshold_rule": f"largest unit distance with <= {args.max_rate:.2%} of {len(calibration)} calibration pairs "
        f"(seed {args.calibration_seed}, disjoint from the measured ones) called the same person",
        "described": len(faces), "no_face_found": missed, "seconds_per_image": round(seconds / max(1, len(faces)), 3),
        "deepface": {"same_pairs": len(same), "different_pairs": len(diff), "same_spread": spread(same),
                     "different_spread": spread(diff), "same_found_classic_raw_0.6": classic(same),
                     "different_called_same_classic_raw_0.6": classic(diff)},
        "different_people": {"pairs": len(measured), "spread": spread(measured),
                             "called_same_classic_raw_0.6": classic(measured)},
        "unindexed": {"queries": len(held), "gallery": len(gallery), "clip_face_crop_similar_at_0.85": clip_similar},
        "at_threshold": chosen, "sweep": sweep, "search": search,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"threshold (unit distance): {threshold}  ({report['threshold_rule']})")
    print(
        f"classic raw < 0.6: deepface same found {classic(same)}/{len(same)}, deepface different called same "
        f"{classic(diff)}/{len(diff)}, different people called same {classic(measured)}/{len(measured)}"
    )
    print(
        f"unindexed queries (of {len(held)}, gallery {len(gallery)}): CLIP face-crop similar >= 0.85: {clip_similar}"
    )
    print(
        "threshold | deepface same found | deepface different called same | different people called same | "
        "unindexed queries with a same-person hit (hits)"
    )
    for line in sweep:
        print(f"{line['threshold']:.4f} | {line['deepface_same_found']}/{len(same)} | "
              f"{line['deepface_different_called_same']}/{len(diff)} | {line['different_people_called_same']}/"
              f"{len(measured)} | {line['unindexed_queries_with_same_person']}/{len(held)} "
              f"({line['unindexed_same_person_hits']})")  # fmt: skip
    r = search["rule"]
    print(f"search (1:N, gallery {len(gallery)}): pair threshold {r['pair_threshold']}, margin {r['margin']} below "
          f"the cohort (rank {r['cohort_rank']}; chosen on {search['calibration_searches']} leave-one-out searches, "
          f"{search['calibration_with_a_hit_at_margin']} of them with a hit)")  # fmt: skip
    for name in ("rule", "pair_threshold_alone", "gallery_size_threshold"):
        m = search[name]
        print(f"  {name}: unindexed queries with a same-person hit {m['unindexed_queries_with_same_person']}/"
              f"{len(held)} ({m['unindexed_same_person_hits']} hits); deepface same-person pairs found "
              f"{m['deepface_same_found']}/{m['deepface_same_searches']}, different-person partners called same "
              f"{m['deepface_different_called_same']}/{m['deepface_different_searches']}")  # fmt: skip
    for h in search["rule"]["unindexed_hits"]:
        print(f"  unindexed hit: {h['query']} -> {h['hit']} at {h['distance']} (threshold {h['threshold']})")
    print(f"no face found in {len(missed)} of {len(faces)} images; {report['seconds_per_image']} s per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
