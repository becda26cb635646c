"""The detector tier on real faces: "is this face generated?" when Sleuth does not hold the generator.

    M=$HOME/.cache/sleuth-eval-models
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detector.py --data ../shared/data/eval-v1 \\
        --clip-model onnx:$M/clip-vit-b16-openai-image.onnx --face-detector $M/mtcnn

One run: eval-v1's generated faces (three GAN sets), real faces (UTKFace crops, deepface web photos) and generic
photos (BSDS500, scikit-image) are ingested with their labels into a store under ``--work`` (one collection per
source; resumable, skipped when done), the detector's normalised views are computed once through
``search.detector`` and cached in that store, and then the figures of issue 11 are measured:

1. ROC AUC generated vs real faces on a held-out, seeded half of every source.
2. Leave-one-generator-out: trained without one GAN source, tested on it against unseen real faces.
3. Figures 1 and 2 again after JPEG 50 + 0.5x resize of every test image (degraded as a query, from the original
   file; never trained on), by detectors trained with degraded copies of their training images (the default) and,
   for comparison, without them.
4. Real faces from a source left out of training (UTKFace only as the real class, tested on deepface_tests, and
   the other way round): AUC and the share of those real faces called generated (p >= 0.5) or abstained on,
   also at other out-of-distribution bounds (``OOD_QUANTILES``): how much of the figure is abstention.
5. Generic photos (held-out BSDS500, scikit-image) called generated faces at p >= 0.5.
6. The CLAHE/LAB normalisation of the face crop as an option: figures 1-5 with it.
7. ``detect`` of 100 indexed images (their views cached): seconds in all, per-image time.

JSON goes to ``--out``. Every split is seeded (``--seed``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.settings import Settings  # noqa: E402

SOURCES = {  # eval-v1 folder -> (collection, label)
    "gan_face/tpdne_2022": ("tpdne_2022", "generated"),
    "gan_face/stylegan3_r_ffhq": ("stylegan3_r_ffhq", "generated"),
    "gan_face/boredhumans_basemax": ("boredhumans_basemax", "generated"),
    "real_face/utkface": ("utkface", "real"),
    "real_face/deepface_tests": ("deepface_tests", "real"),
    "generic_photo/bsds500": ("bsds500", "stock"),
    "generic_photo/skimage": ("skimage", "stock"),
}
GENERATED = ("tpdne_2022", "stylegan3_r_ffhq", "boredhumans_basemax")
# Images per source (seeded draw; the machine the figures were measured on embeds about one view a second).
PER_SOURCE = {"tpdne_2022": 60, "stylegan3_r_ffhq": 60, "boredhumans_basemax": 60, "utkface": 120,
              "deepface_tests": 32, "bsds500": 60, "skimage": 9}  # fmt: skip
OOD_QUANTILES = (0.0, 0.02, 0.05)  # figure 4 also at these out-of-distribution bounds (the default: 0.1)
IMAGE_VIEW_PER_FACE_SOURCE = (
    24  # whole-image views of face images (generic photos: all), to bound the embedding
)


def write_manifest(data: Path, out: Path, *, seed: int, scale: float) -> Path:
    """A Sleuth manifest of a seeded draw of the eval-v1 sources above (``PER_SOURCE`` x ``scale`` images each):
    path, collection, label, generator, licence."""
    rows = list(csv.DictReader((data / "manifest.csv").open(encoding="utf-8")))
    by_source: dict[str, list[dict[str, str]]] = {}
    for row in sorted(rows, key=lambda r: r["file"]):
        folder = "/".join(row["file"].split("/")[:2])
        if folder in SOURCES:
            by_source.setdefault(SOURCES[folder][0], []).append(row)
    rng = random.Random(seed)
    chosen = []
    for name, group in sorted(by_source.items()):
        chosen += rng.sample(group, min(len(group), max(2, round(PER_SOURCE[name] * scale))))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "collection", "label", "generator", "licence"])
        for row in sorted(chosen, key=lambda r: r["file"]):
            folder = "/".join(row["file"].split("/")[:2])
            collection, label = SOURCES[folder]
            generator = row["generator_if_known"][:200] if label == "generated" else ""
            writer.writerow([str(data / row["file"]), collection, label, generator, row["license"][:200]])
    return out


def ingest_eval(settings: Settings, manifest: Path) -> None:
    """Ingest the manifest with its labels (resumable: a re-run skips what is stored). Hashes and thumbnails
    only: the detector embeds its own normalised views with the real CLIP (the store's whole-image CLIP
    vectors would be one more pass over every image, and the detector does not read them)."""
    from indexer.ingest import ingest

    started = time.perf_counter()
    summary = ingest(
        manifest, collection="eval-v1", settings=settings, progress=sys.stderr.isatty(), workers=1
    )
    print(f"ingest: {summary.line()} ({time.perf_counter() - started:.0f} s)", flush=True)


# --- measuring ----------------------------------------------------------------------------------------
Features = dict[str, tuple[np.ndarray, np.ndarray]]  # view -> (clip [D], spectrum [B])


def _split(store: Any, seed: int) -> tuple[dict[int, str], set[int], set[int], dict[int, str]]:
    """(collection of each image, train ids, test ids, source path of each image): a seeded half of every
    collection is held out (skimage, 9 photos, is only ever tested)."""
    from sqlalchemy import select

    from indexer.store.models import Collection, Sighting

    with store.session() as s:
        rows = s.execute(
            select(Sighting.image_id, Collection.name, Sighting.source_key).join(
                Collection, Collection.id == Sighting.collection_id
            )
        ).all()
    collection = {int(i): str(c) for i, c, _ in rows}
    path = {int(i): str(k) for i, _, k in rows}
    rng = np.random.default_rng(seed)
    train: set[int] = set()
    for name in sorted(set(collection.values())):
        ids = sorted(i for i, c in collection.items() if c == name)
        if name != "skimage":
            train |= set(rng.permutation(ids)[: len(ids) // 2].tolist())
    return collection, train, set(collection) - train, path


def _by_image(feats: dict[str, Any]) -> dict[int, Features]:
    """The features of each image as stored (its degraded training copies left out)."""
    out: dict[int, Features] = {}
    for view, f in feats.items():
        for n, i in enumerate(f.ids):
            if f.copy[n] == 0:
                out.setdefault(i, {})[view] = (f.clip[n], f.spec[n])
    return out


def degrade(image: Image.Image) -> Image.Image:
    """What figure 3 does to every test image: 0.5x (antialiased), then JPEG quality 50."""
    from search.detector_features import degrade as degrade_by

    return degrade_by(image, 0.5, 50)


def degraded_features(
    ids: list[int], path: dict[int, str], config: Any, embedder: Any, detector: Any, cache: Path
) -> dict[int, Features]:
    """Features of the degraded test images, made as a query's are (``search.detector.query_views``); cached
    in ``cache`` (.npz, no pickles)."""
    from indexer.decode import decode_file
    from search.detector import query_views, view_features

    out: dict[int, Features] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            for view in ("face", "image"):
                for i, c, sp in zip(
                    z[f"{view}_ids"].tolist(), z[f"{view}_clip"], z[f"{view}_spec"], strict=True
                ):
                    out.setdefault(int(i), {})[view] = (c, sp)
            done = set(z["done"].tolist())
    else:
        done = set()
    todo = [i for i in ids if i not in done]
    for n, i in enumerate(todo):
        views = query_views(degrade(decode_file(Path(path[i])).image), config, detector).views
        if "face" in views:  # the face view decides; the whole image is embedded only without a face
            views.pop("image")
        out[i] = view_features(views, embedder)
        done.add(i)
        if (n + 1) % 50 == 0 or n + 1 == len(todo):
            _save_degraded(cache, out, done)
            print(f"  degraded {n + 1}/{len(todo)}", flush=True)
    return {i: out.get(i, {}) for i in ids}


def _save_degraded(cache: Path, out: dict[int, Features], done: set[int]) -> None:
    arrays: dict[str, np.ndarray] = {"done": np.array(sorted(done), np.int64)}
    for view in ("face", "image"):
        ids = sorted(i for i in out if view in out[i])
        arrays[f"{view}_ids"] = np.array(ids, np.int64)
        arrays[f"{view}_clip"] = (
            np.stack([out[i][view][0] for i in ids]) if ids else np.zeros((0, 512), np.float32)
        )
        arrays[f"{view}_spec"] = (
            np.stack([out[i][view][1] for i in ids]) if ids else np.zeros((0, 48), np.float32)
        )
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, cache)


def score_all(detector: Any, feats: dict[int, Features], ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    return {i: detector.score(feats[i]) for i in ids if feats.get(i)}


def _p(result: dict[str, Any], method: str | None = None) -> float:
    """The detector's calibrated score of the view it decides on (kept also when it abstains)."""
    view = result["views"][result["scored_on"]]
    return float(view["methods"][method] if method else view["score"])


def measure(
    results: dict[int, dict[str, Any]], generated: Iterable[int], real: Iterable[int]
) -> dict[str, Any]:
    """AUC (per method too), and per class: called generated (p >= 0.5, not abstained) and abstained."""
    from sklearn.metrics import roc_auc_score

    gen = [i for i in generated if i in results]
    rea = [i for i in real if i in results]
    y = np.array([1] * len(gen) + [0] * len(rea))
    doc: dict[str, Any] = {"n_generated": len(gen), "n_real": len(rea)}
    if len(gen) and len(rea):
        doc["auc"] = round(float(roc_auc_score(y, [_p(results[i]) for i in gen + rea])), 4)
        for m in ("probe", "knn", "spectrum", "ensemble"):
            doc[f"auc_{m}"] = round(float(roc_auc_score(y, [_p(results[i], m) for i in gen + rea])), 4)
        inside = [(i, t) for i, t in zip(gen + rea, y.tolist(), strict=True) if not results[i]["abstained"]]
        if len({t for _, t in inside}) == 2:
            doc["auc_in_distribution"] = round(
                float(roc_auc_score([t for _, t in inside], [_p(results[i]) for i, _ in inside])), 4
            )
    for name, group in (("generated", gen), ("real", rea)):
        if group:
            called = [1 for i in group if not results[i]["abstained"] and results[i]["p_generated"] >= 0.5]
            doc[f"{name}_called_generated"] = round(len(called) / len(group), 4)
            doc[f"{name}_abstained"] = round(sum(results[i]["abstained"] for i in group) / len(group), 4)
            doc[f"{name}_scored_on_face"] = round(
                sum(results[i]["scored_on"] == "face" for i in group) / len(group), 4
            )
    return doc


def line(title: str, m: dict[str, Any]) -> str:
    keys = ("auc", "auc_probe", "auc_knn", "auc_spectrum", "auc_ensemble", "auc_in_distribution",
            "generated_called_generated", "generated_abstained", "real_called_generated", "real_abstained")  # fmt: skip
    parts = [f"{k}={m[k]}" for k in keys if k in m]
    return f"{title:<52} n={m.get('n_generated', 0)}/{m.get('n_real', 0)}  " + "  ".join(parts)


def run_figures(
    settings: Settings, store: Any, embedder: Any, detector: Any, config: Any, split: Any, work: Path,
    *, label: str, figures: dict[str, Any],
) -> None:  # fmt: skip
    """Figures 1-5 under one view configuration."""
    from search.detector import TrainOptions, stored_features, train_detector
    from search.detector_features import Augmentation

    collection, train, test, path = split
    ids = sorted(collection)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    image_ids = sorted(i for i in ids if collection[i] in ("bsds500", "skimage"))
    for name in (*GENERATED, "utkface", "deepface_tests"):
        mine = sorted(i for i in ids if collection[i] == name)
        image_ids += rng.permutation(mine)[:IMAGE_VIEW_PER_FACE_SOURCE].tolist()
    report = lambda a, b: print(f"  views {a}/{b}", flush=True)  # noqa: E731
    opts = TrainOptions(views=config)
    computed = stored_features(settings, store, embedder, config, ids, face_detector=detector, progress=report,
                               views=["face"], augment=opts.augment)  # fmt: skip
    computed |= stored_features(settings, store, embedder, config, sorted(image_ids), progress=report,
                                views=["image"], augment=opts.augment)  # fmt: skip
    feats = _by_image(computed)
    figures.setdefault("_both_views", set()).update(image_ids)
    print(f"[{label}] views of {len(ids)} images (and {opts.augment.copies} degraded copies of each) ready "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    of = lambda names, part: sorted(i for i in part if collection[i] in names)  # noqa: E731
    real_faces = ("utkface", "deepface_tests")
    out: dict[str, Any] = {}

    def fit(generated: tuple[str, ...], real: tuple[str, ...], part: set[int], **changes: Any) -> Any:
        return train_detector(settings, store, embedder, f"bench-{label}", generated=list(generated),
                              real=list(real), options=replace(opts, **changes), save=False, image_ids=part,
                              features=computed)  # fmt: skip

    main_det = fit(GENERATED, (*real_faces, "bsds500"), train)
    methods = ", ".join(
        f"{v}: {d['method']} (out-of-source AUC {d['out_of_source_auc']})"
        for v, d in main_det.doc["views"].items()
    )
    print(f"[{label}] detector: {main_det.scope()}; method per view: {methods}", flush=True)
    res = score_all(main_det, feats, test)
    out["1_held_out"] = measure(res, of(GENERATED, test), of(real_faces, test))
    print(line(f"[{label}] 1. held-out half", out["1_held_out"]), flush=True)
    out["5_generic"] = measure(res, [], of(("bsds500", "skimage"), test))
    print(line(f"[{label}] 5. generic photos (held-out bsds500 + skimage)", out["5_generic"]), flush=True)
    out["2_leave_one_generator_out"] = {}
    for g in GENERATED:
        det = fit(tuple(x for x in GENERATED if x != g), (*real_faces, "bsds500"), train)
        r = score_all(det, feats, of((g,), ids) + of(real_faces, test))
        out["2_leave_one_generator_out"][g] = m = measure(r, of((g,), ids), of(real_faces, test))
        print(line(f"[{label}] 2. without {g}", m), flush=True)
        figures.setdefault("_logo_detectors", {})[(label, g)] = det
        # the same without degraded copies (for figure 3's comparison; the copies' features are cached)
        figures["_logo_detectors"][(label, g, "plain")] = fit(
            tuple(x for x in GENERATED if x != g),
            (*real_faces, "bsds500"),
            train,
            augment=Augmentation(copies=0),
        )
    figures.setdefault("_main_detectors", {})[(label, "plain")] = fit(
        GENERATED, (*real_faces, "bsds500"), train, augment=Augmentation(copies=0)
    )
    for left_out, kept in (("deepface_tests", "utkface"), ("utkface", "deepface_tests")):
        part = set(of((*GENERATED, "bsds500"), train)) | set(of((kept,), ids))
        det = fit(GENERATED, (kept, "bsds500"), part)
        r = score_all(det, feats, of(GENERATED, test) + of((left_out,), ids))
        out[f"4_real_left_out_{left_out}"] = m = measure(r, of(GENERATED, test), of((left_out,), ids))
        print(line(f"[{label}] 4. real = {kept} (+bsds500), tested on {left_out}", m), flush=True)
        for q in OOD_QUANTILES:  # how much of figure 4 is abstention: the out-of-distribution bound varied
            det_q = fit(GENERATED, (kept, "bsds500"), part, ood_quantile=q)
            m = measure(score_all(det_q, feats, of(GENERATED, test) + of((left_out,), ids)),
                        of(GENERATED, test), of((left_out,), ids))  # fmt: skip
            out[f"4_real_left_out_{left_out}_ood_quantile_{q}"] = m
            print(line(f"[{label}] 4. ... tested on {left_out}, ood_quantile {q}", m), flush=True)
    figures[label] = out
    figures.setdefault("_main_detectors", {})[label] = main_det


def figure3(
    embedder: Any, detector: Any, config: Any, split: Any, work: Path, figures: dict[str, Any], label: str
) -> None:
    collection, train, test, path = split
    of = lambda names, part: sorted(i for i in part if collection[i] in names)  # noqa: E731
    real_faces = ("utkface", "deepface_tests")
    test_ids = of((*GENERATED, *real_faces), test)
    started = time.perf_counter()
    deg = degraded_features(test_ids, path, config, embedder, detector, work / f"degraded-{label}.npz")
    print(
        f"[{label}] degraded views of {len(test_ids)} test images ready ({time.perf_counter() - started:.0f} s)"
    )
    for variant, key, title in (
        ("", "3_degraded", ""),
        ("plain", "3_degraded_no_augmentation", " (no copies)"),
    ):
        main_det = figures["_main_detectors"][(label, variant) if variant else label]
        out = {
            "1_held_out": measure(
                score_all(main_det, deg, test_ids), of(GENERATED, test), of(real_faces, test)
            )
        }
        print(line(f"[{label}] 3. JPEG 50 + 0.5x{title}: held-out half", out["1_held_out"]), flush=True)
        for g in GENERATED:
            det = figures["_logo_detectors"][(label, g, variant) if variant else (label, g)]
            m = measure(score_all(det, deg, test_ids), of((g,), test), of(real_faces, test))
            out[f"2_without_{g}"] = m
            print(line(f"[{label}] 3. JPEG 50 + 0.5x{title}: without {g}", m), flush=True)
        figures[label][key] = out


def figure7(
    settings: Settings,
    store: Any,
    embedder: Any,
    detector: Any,
    split: Any,
    figures: dict[str, Any],
    fresh: int,
) -> None:
    """``detect`` as the CLI runs it (read, decode, SHA-256, cached views or new ones, score) on 100 indexed
    images (of those whose both views the benchmark cached), then on 10 images that are not indexed (their views
    made and embedded)."""
    from indexer.decode import decode_file
    from search.detector import detect_image

    collection, train, test, path = split
    det = figures["_main_detectors"]["default"]
    ids = sorted(figures["_both_views"])[:100]
    started = time.perf_counter()
    for i in ids:
        decoded = decode_file(Path(path[i]))
        detect_image(det, decoded.image, embedder, detector, store=store, sha256=decoded.sha256)
    cached_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in ids[:fresh]:
        decoded = decode_file(Path(path[i]))
        detect_image(det, degrade(decoded.image), embedder, detector)
    fresh_s = (time.perf_counter() - started) / max(fresh, 1)
    figures["7_detect"] = {"indexed_images": len(ids), "indexed_total_s": round(cached_s, 2),
                           "indexed_per_image_ms": round(1000 * cached_s / len(ids), 1),
                           "new_images": fresh, "new_per_image_s": round(fresh_s, 2) if fresh else None}  # fmt: skip
    print(f"7. detect: {len(ids)} indexed images in {cached_s:.2f} s ({1000 * cached_s / len(ids):.1f} ms each)"
          + (f"; {fresh} new (not indexed) images {fresh_s:.2f} s each (views made: MTCNN + 2 CLIP passes)" if fresh else ""),
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eval-v1")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sleuth-detector-bench"))
    parser.add_argument("--clip-model", default=os.environ.get("SLEUTH_CLIP_MODEL"))
    parser.add_argument("--face-detector", type=Path, default=os.environ.get("SLEUTH_FACE_DETECTOR"))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="x the images per source of PER_SOURCE")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "detector.json")
    parser.add_argument(
        "--fresh-images", type=int, default=10, help="figure 7: images not indexed, timed too"
    )
    parser.add_argument("--no-clahe", action="store_true", help="skip figure 6 (the CLAHE views)")
    parser.add_argument("--clahe-degraded", action="store_true", help="figure 3 with CLAHE too")
    parser.add_argument("--stage", choices=["ingest", "all"], default="all")
    args = parser.parse_args()
    if not args.clip_model or not args.face_detector:
        parser.error("give --clip-model (or SLEUTH_CLIP_MODEL) and --face-detector (or SLEUTH_FACE_DETECTOR)")
    settings = Settings(
        data_dir=args.work / "data", clip_model=args.clip_model, face_detector=args.face_detector
    )
    manifest = write_manifest(args.data, args.work / "manifest.csv", seed=args.seed, scale=args.scale)
    ingest_eval(settings, manifest)
    if args.stage == "ingest":
        return
    from indexer.embedders import load_embedder
    from indexer.faces import FaceDetector
    from indexer.store.db import open_store
    from search.detector_features import ViewConfig

    embedder = load_embedder(args.clip_model, device="cpu", batch_size=16, threads=args.threads)
    detector = FaceDetector.from_dir(args.face_detector, device="cpu")
    store = open_store(settings)
    split = _split(store, args.seed)
    figures: dict[str, Any] = {}
    configs = {"default": ViewConfig(), "clahe": ViewConfig(clahe=True)}
    run_figures(settings, store, embedder, detector, configs["default"], split, args.work, label="default",
                figures=figures)  # fmt: skip
    figure7(settings, store, embedder, detector, split, figures, args.fresh_images)
    figure3(embedder, detector, configs["default"], split, args.work, figures, "default")
    if not args.no_clahe:  # figure 6: figures 1, 2, 4, 5 (and with --clahe-degraded 3) with CLAHE
        run_figures(settings, store, embedder, detector, configs["clahe"], split, args.work, label="clahe",
                    figures=figures)  # fmt: skip
        if args.clahe_degraded:
            figure3(embedder, detector, configs["clahe"], split, args.work, figures, "clahe")
    doc = {k: v for k, v in figures.items() if not k.startswith("_")}
    doc["scope"] = figures["_main_detectors"]["default"].doc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
