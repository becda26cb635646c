"""Scale measurements for issue 13, each in one run:

    .venv/bin/python benchmarks/scale.py ingest --source ../shared/data/eval-v1 [--clip-model onnx:...] [--limit N]
    .venv/bin/python benchmarks/scale.py int8 --clip-model onnx:$HOME/.cache/sleuth-eval-models/clip-vit-b16-openai-image.onnx
    .venv/bin/python benchmarks/scale.py vectors --n 10000000 --scratch /tmp/sleuth-scale

1. ``ingest``: images/s of the naive loop (``benchmarks/ingest.py``'s), the plain ingest, 2 local processes and
   Ray with 2 workers, each in its own child process on a fresh data dir, as ratios to naive.
2. ``int8``: ``indexer.quantize`` (``sleuth models quantize``) of the CLIP model; images/s of INT8 and FP32
   (same images, same threads), cosine of INT8 to FP32 embeddings on eval-v1 images, and a CLIP-tier copy
   recall@1 for both (each edited copy's nearest CLIP neighbour among the ``--n`` originals is its own original;
   not the full ``benchmarks/copy_detection.py`` run, which takes ``--clip-model`` of either file).
3. ``vectors``: ``n`` synthetic clustered 512-d unit vectors (power-law spectrum around random centres, like CLIP
   embeddings), written in chunks to ``--scratch`` (they need not fit in RAM), the on-disk IVF-PQ build of
   ``indexer.ondisk_index`` (trained on a sample, filled shard by shard, merged into memory-mapped lists), then:
   build time, bytes on disk per vector of codes + ids, resident memory while searching, recall@10 against exact
   search (1,000 queries) from the codes alone and re-ranked with SQ8, p50/p99 latency with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- 3. vectors ---------------------------------------------------------------------------------------------
def _generator(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = (1.0 / np.arange(1, dim + 1) ** 0.7).astype(np.float32)  # power law, as CLIP's PCA spectrum
    spectrum *= 0.9 / np.sqrt(np.sum(spectrum**2))
    return centres, spectrum


def _chunk(start: int, n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors ``start .. start+n`` (deterministic per chunk): [n, dim] float32 unit rows."""
    centres, spectrum = _generator(dim, seed)
    rng = np.random.default_rng([seed, start])
    rot = np.random.default_rng(seed + 1).standard_normal((dim, dim)).astype(np.float32)
    rot, _ = np.linalg.qr(rot)
    noise = (rng.standard_normal((n, dim)).astype(np.float32) * spectrum) @ rot.T
    x = centres[rng.integers(0, len(centres), n)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_vectors(args: argparse.Namespace) -> dict[str, object]:
    import faiss

    from indexer.ondisk_index import OnDiskIndex, build_ondisk, ondisk_factory
    from indexer.vector_index import IndexInfo

    n, dim, chunk = args.n, 512, 200_000
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    data = scratch / f"vectors-{n}.f32"
    t0 = time.perf_counter()
    if not data.exists() or data.stat().st_size != n * dim * 4:
        with open(data, "wb") as fh:
            for start in range(0, n, chunk):
                fh.write(_chunk(start, min(chunk, n - start), dim, 0).tobytes())
    gen_s = time.perf_counter() - t0
    vecs = np.memmap(data, dtype=np.float32, mode="r", shape=(n, dim))
    queries = _chunk(n + 10_000_000, 1000, dim, 0)  # unseen vectors of the same distribution
    # exact ground truth, chunk by chunk (never the whole set in RAM)
    t0 = time.perf_counter()
    best_s = np.full((1000, 10), -np.inf, np.float32)
    best_i = np.full((1000, 10), -1, np.int64)
    for start in range(0, n, chunk):
        sims = queries @ np.asarray(vecs[start : start + chunk]).T  # [1000, c]
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    exact_s = time.perf_counter() - t0
    factory = args.factory or ondisk_factory(n, dim)
    nlist = int(factory.split(",IVF")[1].split("_")[0].split(",")[0])
    sample_n = min(n, max(100_000, 40 * nlist), 1_000_000)
    sample_idx = np.sort(np.random.default_rng(0).choice(n, size=sample_n, replace=False))
    sample = np.asarray(vecs[sample_idx])

    def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, n, chunk):
            yield (
                np.arange(start, min(n, start + chunk), dtype=np.int64),
                np.asarray(vecs[start : start + chunk]),
            )

    index_dir = scratch / "index"
    shutil.rmtree(index_dir, ignore_errors=True)
    index_dir.mkdir()
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    built = build_ondisk(
        index_dir, IndexInfo("bench", "float", dim, factory), chunks, sample=sample, refine="SQ8",
        shard_vectors=args.shard, progress=lambda m: print(m, flush=True),
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    del sample, built
    folder = next(index_dir.glob("bench.ondisk.*"))
    lists = (folder / "lists.ivfdata").stat().st_size
    header = (folder / "populated.index").stat().st_size
    rss_before = _rss_mb()
    from indexer.vector_index import load_index

    index = load_index(index_dir, "bench")
    assert isinstance(index, OnDiskIndex)
    out: dict[str, object] = {
        "n": n, "factory": factory, "generate_s": round(gen_s, 1), "exact_gt_s": round(exact_s, 1),
        "build_s": round(build_s, 1), "train_s": index.info.extra.get("train_s"),
        "codes_and_ids_bytes_per_vector": round(lists / n, 1), "header_bytes": header,
        "rerank_store_bytes_per_vector": round((folder / "refine.codes").stat().st_size / n, 1),
    }  # fmt: skip
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        for rerank in (False, True):
            lat = []
            found = np.empty((1000, 10), np.int64)
            for i in range(1000):
                t = time.perf_counter()
                _, ids = index.search(queries[i : i + 1], 10, rerank=rerank)
                lat.append(time.perf_counter() - t)
                found[i] = ids[0]
            recall = np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, best_i, strict=True)])
            key = f"nprobe{nprobe}_{'sq8' if rerank else 'codes'}"
            out[key] = {
                "recall_at_10": round(float(recall), 4),
                "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
                "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
            }
            print(key, out[key], flush=True)
    out["search_rss_mb"] = round(_rss_mb(), 1)
    out["search_rss_mb_before_load"] = round(rss_before, 1)
    out["peak_rss_mb_whole_run"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# --- 2. int8 -----------------------------------------------------------------------------------------------
def _edited(image: Any, seed: int) -> Any:
    """A modified copy: a 75-90 % crop, resized, JPEG q=40 (the copy-detection tier's bread and butter)."""
    import io

    from PIL import Image

    assert isinstance(image, Image.Image)
    rng = np.random.default_rng(seed)
    w, h = image.size
    f = rng.uniform(0.75, 0.9)
    x0, y0 = int(rng.uniform(0, 1 - f) * w), int(rng.uniform(0, 1 - f) * h)
    crop = image.crop((x0, y0, x0 + int(f * w), y0 + int(f * h))).resize((int(0.7 * w), int(0.7 * h)))
    buf = io.BytesIO()
    crop.convert("RGB").save(buf, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def run_int8(args: argparse.Namespace) -> dict[str, object]:
    from indexer.decode import decode_image
    from indexer.embedders import load_embedder
    from indexer.quantize import quantize_onnx
    from indexer.sources import iter_source

    images = []
    for item in iter_source(args.source):
        try:
            images.append(decode_image(item.read()).image)
        except Exception:  # noqa: BLE001 - a file the benchmark cannot decode is skipped
            continue
        if len(images) >= args.n:
            break
    result = quantize_onnx(args.clip_model, check_images=images[:32], min_cosine=0.0)
    out: dict[str, object] = {"quantize": {k: str(v) for k, v in result.__dict__.items()}}
    copies = [_edited(im, i) for i, im in enumerate(images)]
    vectors = {}
    for name, model_id in (("fp32", args.clip_model), ("int8", result.model_id)):
        model = load_embedder(model_id, batch_size=16, threads=args.threads)
        model.embed(images[:4])  # warm-up
        t0 = time.perf_counter()
        originals = model.embed(images)
        seconds = time.perf_counter() - t0
        queries = model.embed(copies)
        top = np.argmax(queries @ originals.T, axis=1)
        vectors[name] = originals
        out[name] = {
            "images_per_s": round(len(images) / seconds, 2),
            "clip_copy_recall_at_1": round(float(np.mean(top == np.arange(len(images)))), 4),
        }
        print(name, out[name], flush=True)
    cos = np.sum(vectors["fp32"] * vectors["int8"], axis=1)
    out["cosine_int8_to_fp32"] = {"min": round(float(cos.min()), 4), "mean": round(float(cos.mean()), 4)}
    fp32, int8 = out["fp32"], out["int8"]
    assert isinstance(fp32, dict) and isinstance(int8, dict)
    out["speedup"] = round(int8["images_per_s"] / fp32["images_per_s"], 2)
    out["recall_delta"] = round(int8["clip_copy_recall_at_1"] - fp32["clip_copy_recall_at_1"], 4)
    return out


# --- 1. ingest ----------------------------------------------------------------------------------------------
def _ingest_child(variant: str, source: str, data_dir: str, clip_model: str | None) -> dict[str, float]:
    from indexer.embedders import load_embedder
    from indexer.ingest import ingest
    from indexer.ingest_distributed import ingest_distributed
    from indexer.settings import Settings

    settings = Settings(data_dir=Path(data_dir), clip_model=clip_model)
    t0 = time.perf_counter()
    if variant == "plain":
        embedder = load_embedder(clip_model) if clip_model else None
        summary = ingest(source, collection="eval", settings=settings, embedder=embedder)
    else:
        summary = ingest_distributed(source, engine=variant, workers=2, collection="eval", settings=settings)
    seconds = time.perf_counter() - t0
    return {"items": summary.items, "failures": summary.failures, "seconds": seconds}


def run_ingest(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sleuth-scale-") as tmp:
        source = args.source
        if args.limit:
            from benchmarks.ingest import _limited_source

            source = _limited_source(args.source, args.limit, Path(tmp))
        for variant in ("naive", "plain", "processes", "ray"):
            cmd = [sys.executable, __file__, "ingest-child", variant, source, str(Path(tmp) / variant)]
            if variant == "naive":
                cmd = [sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--child", "naive", source,
                       str(Path(tmp) / variant)]  # fmt: skip
            if args.clip_model:
                cmd += ["--clip-model", args.clip_model]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][7:])
            r["images_per_s"] = (r["items"] - r["failures"]) / r["seconds"]
            results[variant] = r
            print(variant, r, flush=True)
    naive = results["naive"]["images_per_s"]
    return {"variants": results, "ratio_to_naive": {k: v["images_per_s"] / naive for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vectors")
    v.add_argument("--n", type=int, default=10_000_000)
    v.add_argument("--scratch", default="/tmp/sleuth-scale")
    v.add_argument("--factory", default=None)
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--shard", type=int, default=1_000_000)
    v.add_argument("--nprobe", type=int, nargs="+", default=[64, 128])
    i = sub.add_parser("ingest")
    i.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "eval-v1"))
    i.add_argument("--clip-model", default=os.environ.get("SLEUTH_CLIP_MODEL"))
    i.add_argument("--limit", type=int, default=None)
    q = sub.add_parser("int8")
    q.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "eval-v1" / "generic_photo"))
    q.add_argument("--clip-model", default=os.environ.get("SLEUTH_CLIP_MODEL"))
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("ingest-child")
    c.add_argument("variant")
    c.add_argument("source")
    c.add_argument("data_dir")
    c.add_argument("--clip-model", default=None)
    args = parser.parse_args()
    if args.what == "ingest-child":
        result = _ingest_child(args.variant, args.source, args.data_dir, args.clip_model)
        print("RESULT " + json.dumps(result), flush=True)
        return
    out = {"vectors": run_vectors, "int8": run_int8, "ingest": run_ingest}[args.what](args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
