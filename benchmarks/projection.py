"""Projection as forensic evidence, measured with the real DCGAN (dcgan-digiface-64.pt) and real LPIPS weights.

1. N generated faces (random seeds, then JPEG q90 and a 0.8 resize round trip) against N real faces from
   eval-v1 (UTKFace, aligned FFHQ-style to 64x64 with MTCNN): ROC AUC of the projection evidence (-LPIPS), and of
   the calibrated probability (2-fold cross-fitted: each half scored by a calibration fitted on the other half).
2. Latent match: the generating latents are stored (plus distractor latents of other seeds) in the latent index;
   the projected latent of each generated face must find its seed among the top 5.
3. Time per face: the fast projector (batched; started from the generator's latent encoder, ``--encoder train``,
   trained here through ``train_generator_encoder`` or reused with ``--encoder-file``; or, with ``--encoder
   none``, from the mean latent and the best of 64 random samples; early stopping, MSE term, AlexNet-LPIPS) on
   all faces against the published settings (one image at a time, 1000 steps, VGG-LPIPS only) on a subset, in
   the same process. The fast path's reconstructions are also scored with VGG-LPIPS so both AUCs use one metric.
   The encoder's training is a one-time cost per generator, reported on its own.

Run (CPU, from the repo root; the issue-4 notes give the figures: the issue's size, then the 1000-step
baseline's own AUC on 15 + 15 faces, both reusing the encoder the first run trained):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/projection.py --n 200 --baseline-n 2 --distractors 800 \
        --batch 40 --threads 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/projection.py --n 15 --baseline-n 30 --distractors 90 \
        --batch 30 --threads 2 --encoder-file bench-out/encoder-dcgan-digiface-64-20000x8.safetensors
Writes bench-out/projection.json and prints a table. Needs ~/.cache/sleuth-eval-models (see shared/models).
The fast path's LPIPS is AlexNet-LPIPS (``--fast-lpips alex``); its reconstructions are also scored with VGG.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.decode import decode_file  # noqa: E402
from indexer.faces import load_face_detector  # noqa: E402
from indexer.settings import Settings  # noqa: E402
from indexer.store.db import open_store  # noqa: E402
from projection.calibration import Calibration, generated_faces, roc_auc  # noqa: E402
from projection.evidence import PreparedFace, prepare_face, project_faces, to_tensor  # noqa: E402
from projection.latent_match import LatentMatcher, store_latents, sync_latent_index  # noqa: E402
from projection.lpips_loader import load_lpips  # noqa: E402
from projection.projector import ProjectionConfig, project  # noqa: E402
from projection.registry import load_generator, register_generator  # noqa: E402

MODELS = Path(os.environ.get("SLEUTH_EVAL_MODELS", Path.home() / ".cache" / "sleuth-eval-models"))
EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval-v1"
NAME = "dcgan-digiface-64"
log = logging.getLogger("bench.projection")


def real_faces(n: int, seed: int, detector: Any, resolution: int) -> tuple[list[PreparedFace], list[str]]:
    """``n`` UTKFace photos (random sample) aligned with MTCNN; centre crop where no face is found."""
    with open(EVAL / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["class"] == "real_face" and "utkface" in r["file"]]
    rows = sorted(random.Random(seed).sample(rows, n), key=lambda r: r["file"])
    faces = [prepare_face(decode_file(EVAL / r["file"]).image, resolution, detector=detector) for r in rows]
    return faces, [r["file"] for r in rows]


def cross_fitted_probabilities(gen: list[float], real: list[float]) -> tuple[list[float], list[float]]:
    """Each half of each class scored by a calibration fitted on the other half (no sample scores itself)."""
    pg, pr = [0.0] * len(gen), [0.0] * len(real)
    for fold in (0, 1):
        fit = Calibration.fit(
            [v for i, v in enumerate(gen) if i % 2 != fold], [v for i, v in enumerate(real) if i % 2 != fold]
        )
        for i, v in enumerate(gen):
            if i % 2 == fold:
                pg[i] = fit.probability(v)
        for i, v in enumerate(real):
            if i % 2 == fold:
                pr[i] = fit.probability(v)
    return pg, pr


def encoder_for(settings: Settings, store: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The generator's latent encoder: trained here (and a copy kept in bench-out/) or reused from a file."""
    import shutil

    from projection.checkpoints import sha256_file
    from projection.encoder import TrainingConfig, load_encoder, train_generator_encoder
    from projection.registry import encoder_path, set_encoder

    if args.encoder_file is not None:
        load_encoder(args.encoder_file)  # refuses anything that is not an encoder
        path = encoder_path(settings, NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.encoder_file, path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            report = json.loads((fh.metadata() or {}).get("report", "{}"))
        doc = {"path": str(path), "sha256": sha256_file(path), "space": "z", "report": report, "reused": True}
        set_encoder(settings, NAME, doc, store=store)
        log.info("encoder reused from %s: %s", args.encoder_file, report)
        return doc
    training = TrainingConfig(samples=args.encoder_samples, epochs=args.encoder_epochs)
    info, report = train_generator_encoder(
        settings, NAME, training, store=store, progress=lambda phase, d, t: log.info("encoder %s %d/%d", phase, d, t)
    )  # fmt: skip
    assert info.encoder is not None
    keep = args.out.parent / f"encoder-{NAME}-{training.samples}x{training.epochs}.safetensors"
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.encoder["path"], keep)
    log.info(
        "encoder trained in %.0fs: held-out cosine %.3f (copy: %s)",
        report.seconds,
        report.holdout_cosine,
        keep,
    )
    return dict(info.encoder)


def vgg_lpips(model: torch.nn.Module, targets: list[PreparedFace], recon: list[Any]) -> list[float]:
    with torch.no_grad():
        return [
            float(model(to_tensor([t.image]), to_tensor([r]))) for t, r in zip(targets, recon, strict=True)
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="generated faces and real faces (each)")
    ap.add_argument(
        "--baseline-n", type=int, default=6, help="faces (half generated) for the 1000-step baseline"
    )
    ap.add_argument("--baseline-steps", type=int, default=1000)
    ap.add_argument("--distractors", type=int, default=9800, help="extra stored latents of other seeds")
    ap.add_argument("--steps", type=int, default=None, help="fast projector: step budget (default: fast())")
    ap.add_argument("--encoder", choices=("train", "none"), default="train", help="fast projector's start")
    ap.add_argument("--encoder-samples", type=int, default=20_000)
    ap.add_argument("--encoder-epochs", type=int, default=8)
    ap.add_argument(
        "--encoder-file", type=Path, default=None,
        help="reuse an encoder written by an earlier run (bench-out/encoder-*.safetensors) instead of training",
    )  # fmt: skip
    ap.add_argument("--starts", type=int, default=0, help="fast projector: extra random starts")
    ap.add_argument("--candidates", type=int, default=64, help="fast projector: best-of-K random z start")
    ap.add_argument("--batch", type=int, default=50, help="fast projector: faces per batched run")
    ap.add_argument("--no-mean-start", action="store_true", help="fast projector: skip the mean-latent row")
    ap.add_argument("--fast-lpips", choices=("alex", "vgg"), default="alex")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", type=Path, default=Path("bench-out/projection.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="sleuth-bench-proj-"))
    fast_lpips_file = MODELS / (
        "lpips-alex.safetensors" if args.fast_lpips == "alex" else "lpips-vgg16.safetensors"
    )
    settings = Settings(data_dir=work / "data", lpips_weights=fast_lpips_file, face_detector=MODELS / "mtcnn")
    store = open_store(settings)
    info = register_generator(settings, NAME, MODELS / "dcgan-digiface-64.pt", family="dcgan", store=store)
    generator, _ = load_generator(settings, NAME, store=store)
    res = generator.resolution
    encoder_doc = None if args.encoder == "none" else encoder_for(settings, store, args)
    vgg = load_lpips(MODELS / "lpips-vgg16.safetensors", net="vgg")

    # --- faces -------------------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    seeds = [int(s) for s in rng.choice(2**31 - 1, size=args.n + args.distractors, replace=False)]
    gen_seeds = seeds[: args.n]
    gen_images = []
    for s in gen_seeds:  # one latent per seed: z = randn from torch.Generator().manual_seed(seed)
        gen_images += generated_faces(generator, 1, seed=s)
    fake = [PreparedFace(im, "generated") for im in gen_images]
    t0 = time.perf_counter()
    real, real_files = real_faces(args.n, args.seed, load_face_detector(settings), res)
    align_s = time.perf_counter() - t0
    alignment = {how: sum(f.how == how for f in real) for how in {f.how for f in real}}
    log.info("faces ready: %d generated, %d real (%s) in %.1fs", len(fake), len(real), alignment, align_s)

    # --- stored latents: the generating ones plus distractors ------------------------------------------------
    z_all = np.stack([generator.sample_z(1, seed=s)[0].flatten().cpu().numpy() for s in seeds])  # [n+d, nz]
    store_latents(store, NAME, "z", z_all, seeds=seeds, origin="manifest")
    index_size = sync_latent_index(settings, store, NAME, "z", z_all.shape[1])

    # --- fast projector: every face, batched, several starts, early stopping ----------------------------------
    faces = fake + real
    start_rng = torch.Generator().manual_seed(args.seed)
    starts = [
        torch.randn((args.starts, *generator.latent_shape("z")), generator=start_rng).numpy() for _ in faces
    ]
    if encoder_doc is not None:
        fast_cfg = ProjectionConfig.fast("z", encoder=True)
    else:
        fast_cfg = ProjectionConfig.fast("z")
        fast_cfg.candidate_starts, fast_cfg.mean_start = args.candidates, not args.no_mean_start
    if args.steps is not None:
        fast_cfg.steps = args.steps
    t0 = time.perf_counter()
    evidence = []
    for lo in range(0, len(faces), args.batch):
        evidence += project_faces(
            settings, faces[lo : lo + args.batch], NAME, device="cpu", config=fast_cfg,
            starts=starts[lo : lo + args.batch], store=store, match_k=5, batch_size=args.batch,
        )  # fmt: skip
        log.info("fast: %d/%d faces, %.1fs", len(evidence), len(faces), time.perf_counter() - t0)
    fast_s = time.perf_counter() - t0
    fast_lp = [e.lpips for e in evidence]
    fast_vgg = vgg_lpips(vgg, faces, [e.reconstruction for e in evidence])
    n = args.n
    auc_fast = roc_auc([-v for v in fast_lp[:n]], [-v for v in fast_lp[n:]])
    auc_fast_vgg = roc_auc([-v for v in fast_vgg[:n]], [-v for v in fast_vgg[n:]])
    pg, pr = cross_fitted_probabilities(fast_lp[:n], fast_lp[n:])
    auc_prob = roc_auc(pg, pr)
    brier = (sum((1 - p) ** 2 for p in pg) + sum(p**2 for p in pr)) / (len(pg) + len(pr))
    top5 = [
        any(m.seed == s for m in e.latent_matches[:5]) for e, s in zip(evidence[:n], gen_seeds, strict=True)
    ]
    top1 = [
        bool(e.latent_matches) and e.latent_matches[0].seed == s
        for e, s in zip(evidence[:n], gen_seeds, strict=True)
    ]
    log.info("fast: %.1fs for %d faces, AUC %.4f (VGG %.4f)", fast_s, len(faces), auc_fast, auc_fast_vgg)
    cos_only = LatentMatcher.open(settings, store, NAME, "z").match(
        np.stack([e.latent for e in evidence[:n]]), k=5
    )
    top5_cos = [any(m.seed == s for m in found) for found, s in zip(cos_only, gen_seeds, strict=True)]
    log.info(
        "latent match top-1 %.3f top-5 %.3f (cosine only: top-5 %.3f) of %d stored",
        np.mean(top1), np.mean(top5), np.mean(top5_cos), index_size,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = {"fast_seconds_per_face": fast_s / len(faces), "auc_lpips": auc_fast, "auc_vgg": auc_fast_vgg,
               "top5": float(np.mean(top5)), "lpips": fast_lp, "vgg_lpips": fast_vgg}  # fmt: skip
    args.out.with_suffix(".partial.json").write_text(json.dumps(partial))

    # --- published baseline: one image at a time, 1000 steps, VGG-LPIPS only ---------------------------------
    half = args.baseline_n // 2
    gen_sub, real_sub = list(range(half)), list(range(n, n + args.baseline_n - half))
    subset = [i for pair in zip(gen_sub, real_sub, strict=False) for i in pair] + real_sub[len(gen_sub) :]
    base_cfg = ProjectionConfig.published(space="z")
    base_cfg.steps = args.baseline_steps
    base_lp: dict[int, float] = {}
    base_seconds = 0.0
    for i in subset:  # generated and real faces alternate, so an interrupted run still compares both
        t0 = time.perf_counter()
        (r,) = project(generator, to_tensor([faces[i].image]), lpips_model=vgg, config=base_cfg)
        base_seconds += time.perf_counter() - t0
        base_lp[i] = r.lpips
        log.info("baseline face %d: lpips %.4f, %.1fs", i, r.lpips, time.perf_counter() - t0)
        done_gen, done_real = [j for j in base_lp if j < n], [j for j in base_lp if j >= n]
        progress: dict[str, Any] = {
            "faces": len(base_lp),
            "seconds_per_face": base_seconds / len(base_lp),
            "lpips": base_lp,
        }
        if done_gen and done_real:
            progress["auc"] = roc_auc([-base_lp[j] for j in done_gen], [-base_lp[j] for j in done_real])
            progress["fast_auc_same_faces_vgg"] = roc_auc(
                [-fast_vgg[j] for j in done_gen], [-fast_vgg[j] for j in done_real]
            )
        args.out.with_suffix(".baseline.partial.json").write_text(json.dumps(progress))
    auc_base = roc_auc([-base_lp[j] for j in gen_sub], [-base_lp[j] for j in real_sub])
    auc_fast_sub = roc_auc([-fast_vgg[j] for j in gen_sub], [-fast_vgg[j] for j in real_sub])
    per_face_fast = fast_s / len(faces)
    per_face_base = base_seconds / len(subset)

    start_counts = {
        str(k): sum(e.start_index == k for e in evidence) for k in sorted({e.start_index for e in evidence})
    }
    doc = {
        "generator": {"name": NAME, "weights_sha256": info.weights_sha256, "source_sha256": info.source_sha256},
        "device": "cpu", "threads": args.threads, "torch": torch.__version__,
        "faces": {"generated": n, "real": len(real), "real_alignment": alignment, "real_files_sample": real_files[:5],
                  "perturbation": "JPEG q90 + 0.8 resize round trip"},
        "fast": {
            "config": fast_cfg.to_dict(), "extra_random_starts": args.starts, "batch": args.batch,
            "encoder": encoder_doc,
            "lpips_net": args.fast_lpips, "seconds_total": fast_s, "seconds_per_face": per_face_fast,
            "steps_mean": float(np.mean([e.steps for e in evidence])),
            "start_index_counts": start_counts,
            "auc_lpips": auc_fast, "auc_vgg_lpips": auc_fast_vgg, "auc_probability_crossfit": auc_prob,
            "brier_crossfit": brier,
            "lpips_generated_median": float(np.median(fast_lp[:n])), "lpips_real_median": float(np.median(fast_lp[n:])),
        },
        "latent_match": {"stored_latents": index_size, "queries": n, "top1": float(np.mean(top1)),
                         "top5": float(np.mean(top5)),
                         "top5_cosine_only": float(np.mean(top5_cos)),
                         "method": "50 nearest by cosine, re-ranked by the pixel MSE of their images"},
        "baseline": {
            "config": base_cfg.to_dict(), "lpips_net": "vgg", "faces": len(subset), "generated": half,
            "seconds_total": base_seconds, "seconds_per_face": per_face_base, "auc_subset": auc_base,
            "fast_auc_same_subset_vgg": auc_fast_sub, "lpips": [base_lp[j] for j in subset], "faces_in_order": subset,
        },
        "speedup_per_face": per_face_base / per_face_fast,
        "gpu": "not measured (no GPU in this session)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"{'measure':<44} {'value':>12}")
    rows = [
        ("faces generated / real", f"{n} / {len(real)}"),
        ("fast: AUC (-LPIPS, " + args.fast_lpips + ")", f"{auc_fast:.4f}"),
        ("fast: AUC (-VGG-LPIPS of reconstruction)", f"{auc_fast_vgg:.4f}"),
        ("fast: AUC (cross-fitted probability)", f"{auc_prob:.4f}"),
        ("fast: Brier score (cross-fitted)", f"{brier:.4f}"),
        ("latent match top-1 / top-5", f"{np.mean(top1):.3f} / {np.mean(top5):.3f}"),
        ("latent match top-5, cosine only", f"{np.mean(top5_cos):.3f}"),
        ("stored latents in the index", f"{index_size}"),
        ("fast: seconds per face", f"{per_face_fast:.3f}"),
        ("fast: mean steps", f"{doc['fast']['steps_mean']:.1f}"),
        (f"baseline ({len(subset)} faces): seconds per face", f"{per_face_base:.2f}"),
        ("baseline: AUC on its subset", f"{auc_base:.4f}"),
        ("fast: AUC on the same subset (VGG)", f"{auc_fast_sub:.4f}"),
        ("speed-up per face", f"{per_face_base / per_face_fast:.1f}x"),
    ]
    if encoder_doc is not None and not encoder_doc.get("reused"):
        once = float(encoder_doc["report"]["seconds"])
        rows.append(("encoder training, once per generator (s)", f"{once:.0f}"))
        rows.append(
            ("  break-even vs baseline (faces)", f"{once / max(per_face_base - per_face_fast, 1e-9):.1f}")
        )
    for k, v in rows:
        print(f"{k:<44} {v:>12}")
    print(f"written {args.out}")
    store.dispose()


if __name__ == "__main__":
    main()
