"""Face detection and face search on real images with real weights (MTCNN + CLIP ONNX).

    .venv/bin/python benchmarks/face_paste.py detection --models ~/.cache/sleuth-eval-models
    .venv/bin/python benchmarks/face_paste.py paste --models ~/.cache/sleuth-eval-models

``detection``: MTCNN on 50 real faces (eval-v1 real_face/utkface) and 50 generated faces (gan_face/tpdne_2022):
detection rate, landmark sanity (left eye left of right eye, eyes above nose above mouth), time per image, and,
for the FFHQ-aligned tpdne faces, how far the FFHQ square rebuilt from MTCNN's landmarks lies from the image
square (the images were cropped with that recipe from dlib landmarks, so the two should nearly agree).

``paste``: each generated face (the whole FFHQ-aligned gan_face image, resized to 30 % of the photo's width) is
pasted at a seeded random place into a generic_photo/bsds500 stock photo and re-encoded as JPEG. The face index
holds the aligned faces of every source image plus every face found in the stock photos (distractors). For each
composite: detect, keep the face that overlaps the pasted square, align, embed, search a FAISS IndexFlatIP, and
count rank 1 = its source. The whole-image CLIP search of the composite against the whole source images is run
alongside as the baseline the face path should beat.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.face_align import ffhq_quad  # noqa: E402
from indexer.faces import describe_faces  # noqa: E402
from indexer.mtcnn import DetectedFace, FaceDetector  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "eval-v1"


def _images(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return files[:n]


def _sane(face: DetectedFace) -> bool:
    (lx, ly), (rx, ry), (_nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    return lx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry)


def run_detection(detector: FaceDetector, n: int) -> dict[str, object]:
    report: dict[str, object] = {}
    warm = Image.open(_images(DATA / "real_face" / "utkface", 1)[0]).convert("RGB")
    detector.detect(warm)  # warm-up (allocator, thread pool)
    for name, folder in (
        ("utkface", DATA / "real_face" / "utkface"),
        ("tpdne_2022", DATA / "gan_face" / "tpdne_2022"),
    ):
        files = _images(folder, n)
        times, cpu_times, found, sane, multi, corner_err = [], [], 0, 0, 0, []
        for path in files:
            image = Image.open(path).convert("RGB")
            t0, c0 = time.perf_counter(), time.process_time()
            faces = detector.detect(image)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if not faces:
                print(f"  no face: {path.name}")
                continue
            found += 1
            multi += len(faces) > 1
            sane += _sane(faces[0])
            if name == "tpdne_2022":  # FFHQ-aligned: the rebuilt square should be the image square
                quad = ffhq_quad(faces[0].landmarks)
                w, h = image.size
                square = np.array([[0, 0], [0, h], [w, h], [w, 0]], dtype=np.float64)
                corner_err.append(float(np.abs(quad.corners - square).mean() / w))
        report[name] = {
            "images": len(files),
            "size": f"{image.width}x{image.height}",
            "detected": found,
            "detection_rate": found / len(files),
            "landmarks_sane_rate": sane / max(found, 1),
            "images_with_more_than_one_face": multi,
            "ms_per_image_mean": 1000 * statistics.mean(times),
            "ms_per_image_median": 1000 * statistics.median(times),
            "cpu_ms_per_image_mean": 1000 * statistics.mean(cpu_times),
        }
        if corner_err:
            report[name]["ffhq_square_corner_error_pct_of_side_mean"] = 100 * statistics.mean(corner_err)  # type: ignore[index]
            report[name]["ffhq_square_corner_error_pct_of_side_max"] = 100 * max(corner_err)  # type: ignore[index]
        batch = [Image.open(p).convert("RGB") for p in files]
        t0 = time.perf_counter()
        detector.detect_batch(batch)
        report[name]["ms_per_image_detect_batch"] = 1000 * (time.perf_counter() - t0) / len(batch)  # type: ignore[index]
    return report


def _jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _face_sources(n_faces: int) -> list[Path]:
    """Half tpdne, a quarter StyleGAN3, the rest boredhumans (first files of each folder, sorted)."""
    sources: list[Path] = []
    per_folder = {"tpdne_2022": n_faces // 2, "stylegan3_r_ffhq": n_faces // 4}
    per_folder["boredhumans_basemax"] = n_faces - sum(per_folder.values())
    for folder, count in per_folder.items():
        sources += _images(DATA / "gan_face" / folder, count)
    return sources


def _composite(
    face: Path, photos: list[Path], rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The face image resized to 30 % of a random stock photo's width, pasted at a random place, JPEG q90;
    with the pasted square (x0, y0, x1, y1)."""
    photo = Image.open(photos[int(rng.integers(len(photos)))]).convert("RGB")
    side = round(0.3 * photo.width)
    face_img = Image.open(face).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    x = int(rng.integers(0, photo.width - side + 1))
    y = int(rng.integers(0, photo.height - side + 1))
    composite = photo.copy()
    composite.paste(face_img, (x, y))
    return _jpeg(composite), (x, y, x + side, y + side)


def _overlap(box: tuple[float, float, float, float], rect: tuple[int, int, int, int]) -> float:
    """Fraction of ``box`` inside ``rect``."""
    ix = max(0.0, min(box[2], rect[2]) - max(box[0], rect[0]))
    iy = max(0.0, min(box[3], rect[3]) - max(box[1], rect[1]))
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    return ix * iy / area


def run_paste(
    detector: FaceDetector, clip_model: str, n_faces: int, seed: int, size: int
) -> dict[str, object]:
    import faiss

    from indexer.embedders import load_embedder

    embedder = load_embedder(clip_model, batch_size=16)
    rng = np.random.default_rng(seed)
    sources = _face_sources(n_faces)
    photos = _images(DATA / "generic_photo" / "bsds500", 250)

    # 1. Index: the aligned face of every source image, plus every face in the stock photos.
    crops, labels = [], []
    t0 = time.perf_counter()
    missing_source_face = 0
    for i, path in enumerate(sources):
        described = describe_faces(Image.open(path).convert("RGB"), detector, size=size, max_faces=1)
        if not described:
            missing_source_face += 1
            continue
        crops.append(described[0][1])
        labels.append(i)
    distractors = 0
    for path in photos:
        for _face, crop in describe_faces(Image.open(path).convert("RGB"), detector, size=size):
            crops.append(crop)
            labels.append(-1)
            distractors += 1
    vectors = embedder.embed(crops)  # [F, D]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    whole = faiss.IndexFlatIP(vectors.shape[1])
    whole.add(embedder.embed([Image.open(p).convert("RGB") for p in sources]))  # [S, D] baseline index
    build_s = time.perf_counter() - t0

    # 2. Queries: one composite per source face.
    label_arr = np.array(labels)
    detected = rank1 = baseline_rank1 = 0
    query_s: list[float] = []
    failures: list[str] = []
    for i, path in enumerate(sources):
        composite, rect = _composite(path, photos, rng)

        t0 = time.perf_counter()
        described = describe_faces(composite, detector, size=size)
        inside = [(f, c) for f, c in described if _overlap(f.box, rect) > 0.5]
        if inside:
            detected += 1
            query = embedder.embed([inside[0][1]])  # [1, D]
            _scores, ids = index.search(query, 1)
            hit = int(label_arr[ids[0, 0]])
            rank1 += hit == i
            if hit != i:
                failures.append(f"{path.parent.name}/{path.name} -> {hit}")
        else:
            failures.append(f"{path.parent.name}/{path.name}: face not detected in composite")
        query_s.append(time.perf_counter() - t0)
        _scores, ids = whole.search(embedder.embed([composite]), 1)
        baseline_rank1 += int(ids[0, 0]) == i

    n = len(sources)
    return {
        "clip_model": clip_model,
        "aligned_size": size,
        "sources": n,
        "sources_without_a_detected_face": missing_source_face,
        "distractor_faces_from_bsds500": distractors,
        "indexed_faces": int(index.ntotal),
        "composite_face_detected_rate": detected / n,
        "face_rank1_rate": rank1 / n,
        "whole_image_clip_rank1_rate": baseline_rank1 / n,
        "index_build_s": build_s,
        "query_ms_mean (detect+align+embed+search)": 1000 * statistics.mean(query_s),
        "failures": failures,
    }


def run_search(
    detector: FaceDetector, clip_model: str, n_faces: int, n_photos: int, seed: int, work: Path
) -> dict[str, object]:
    """The same test through the product: ingest (faces detected, aligned and embedded into the face index)
    and :class:`search.query.Searcher` on each composite; rank 1 = the query face's best face match is the
    source image's face."""
    import csv
    import shutil

    from indexer.decode import decode_image
    from indexer.embedders import load_embedder
    from indexer.ingest import ingest
    from indexer.settings import Settings
    from search.query import Searcher, result_to_json

    embedder = load_embedder(clip_model, batch_size=16)
    rng = np.random.default_rng(seed)
    sources = _face_sources(n_faces)
    photos = _images(DATA / "generic_photo" / "bsds500", n_photos)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    manifest = work / "index.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([[str(p), "generated"] for p in sources] + [[str(p), "stock"] for p in photos])
    settings = Settings(data_dir=work / "data", clip_model=clip_model)
    t0 = time.perf_counter()
    summary = ingest(
        manifest, collection="faces", settings=settings, embedder=embedder, face_detector=detector
    )
    build_s = time.perf_counter() - t0
    searcher = Searcher.open(settings, clip_model=embedder, face_detector=detector)
    key_of: dict[str, str] = {}
    with searcher.store.session() as s:
        from sqlalchemy import func, select

        from indexer.store.models import Face, Sighting
        from indexer.store.models import Image as ImageRow

        key_of = dict(s.execute(select(ImageRow.sha256, Sighting.source_key).join(Sighting)).all())
        n_faces_indexed = int(s.execute(select(func.count(Face.id))).scalar() or 0)
        sources_with_face = int(
            s.execute(
                select(func.count(func.distinct(Face.image_id))).join(Sighting, Sighting.image_id == Face.image_id)
                .where(Sighting.source_key.in_([str(p) for p in sources]))
            ).scalar() or 0
        )  # fmt: skip
    detected = rank1 = image_rank1 = 0
    query_ms: list[float] = []
    source_sims: list[float] = []
    other_sims: list[float] = []
    failures: list[str] = []
    for path in sources:
        composite, rect = _composite(path, photos, rng)
        buf = io.BytesIO()
        composite.save(buf, format="JPEG", quality=95)  # already JPEG q90 once: a re-saved upload
        t0 = time.perf_counter()
        doc = result_to_json(searcher.search(decode_image(buf.getvalue()), k=10))
        query_ms.append(1000 * (time.perf_counter() - t0))
        inside = [f for f in doc["faces"] if _overlap(tuple(f["box"]), rect) > 0.5]  # type: ignore[arg-type]
        if not inside:
            failures.append(f"{path.parent.name}/{path.name}: face not detected in composite")
            continue
        detected += 1
        matches = inside[0]["matches"]
        ids = [m["image_id"] for m in matches]
        with searcher.store.session() as s:
            from sqlalchemy import select

            from indexer.store.models import Image as ImageRow

            sha_of = dict(s.execute(select(ImageRow.id, ImageRow.sha256).where(ImageRow.id.in_(ids))).all())
        keys = [key_of.get(sha_of.get(m["image_id"], ""), "") for m in matches]
        ok = bool(keys) and keys[0] == str(path)
        rank1 += ok
        for m, key in zip(matches, keys, strict=True):
            (source_sims if key == str(path) else other_sims).append(float(m["similarity"]))
        face_hits = [h for h in doc["hits"] if "face_similarity" in h["scores"]]
        face_hits.sort(key=lambda h: -h["scores"]["face_similarity"])
        image_rank1 += bool(face_hits) and face_hits[0]["sightings"][0]["source_key"] == str(path)
        if not ok:
            failures.append(f"{path.parent.name}/{path.name} -> {keys[:1]}")
    searcher.close()
    n = len(sources)
    return {
        "clip_model": clip_model,
        "sources": n,
        "stock_photos_indexed": len(photos),
        "ingest": summary.line(),
        "faces_indexed": n_faces_indexed,
        "sources_with_an_indexed_face": sources_with_face,
        "composite_face_detected_rate": detected / n,
        "face_rank1_rate": rank1 / n,
        "hit_with_best_face_similarity_is_source_rate": image_rank1 / n,
        "source_face_similarity": {
            "min": min(source_sims, default=None),
            "median": statistics.median(source_sims) if source_sims else None,
        },
        "best_other_face_similarity_p99": float(np.quantile(other_sims, 0.99)) if other_sims else None,
        "face_min_similarity_threshold": searcher_thresholds(),
        "index_build_s": build_s,
        "query_ms_median (whole Searcher.search)": statistics.median(query_ms),
        "failures": failures,
    }


def searcher_thresholds() -> float:
    from search.query import Thresholds

    return Thresholds().face_min_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["detection", "paste", "search"])
    parser.add_argument("--photos", type=int, default=100, help="stock photos indexed (search)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sleuth-bench/faces"))
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache" / "sleuth-eval-models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "-n", type=int, default=None, help="images per folder (detection: 50) or sources (paste: 200)"
    )
    parser.add_argument("--size", type=int, default=224, help="aligned face size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    detector = FaceDetector.from_dir(args.models / "mtcnn", device=args.device)
    if args.what == "detection":
        report = run_detection(detector, args.n or 50)
    elif args.what == "search":
        clip = "onnx:" + str(args.models / "clip-vit-b16-openai-image.onnx")
        report = run_search(detector, clip, args.n or 100, args.photos, args.seed, args.work)
        out = ROOT / "bench-out"
        out.mkdir(exist_ok=True)
        (out / "face_paste_search.json").write_text(json.dumps(report, indent=1))
    else:
        clip = "onnx:" + str(args.models / "clip-vit-b16-openai-image.onnx")
        report = run_paste(detector, clip, args.n or 200, args.seed, args.size)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
