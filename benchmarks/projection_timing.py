"""Seconds per face of StyleGAN2 projection at a real resolution (random weights: only time is measured).

The fast setting (``ProjectionConfig.fast(encoder=True)``: a latent encoder's prediction as the start, 100 steps,
the faces in one batch, noise maps optimised, LPIPS at 256) against the published one (one face at a time, 1000
steps from the mean latent, VGG-LPIPS), in one process on one device. The targets are the generator's own
images of random w; the encoder is an untrained ``LatentEncoder`` of the real shape (its forward pass is timed
with the rest; its accuracy is not the point here). Meant for a GPU (``--device cuda``); on a CPU use a small
``--baseline-steps`` and read per-step costs.

    .venv/bin/python benchmarks/projection_timing.py --config ffhq-256 --device cuda --faces 16
    .venv/bin/python benchmarks/projection_timing.py --config ffhq-1024 --device cuda --faces 8
    .venv/bin/python benchmarks/projection_timing.py --config ffhq-256 --faces 2 --steps 4 --baseline-steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projection.encoder import EncoderConfig, LatentEncoder, predict_starts  # noqa: E402
from projection.lpips_loader import load_lpips  # noqa: E402
from projection.projector import ProjectionConfig, project  # noqa: E402
from projection.stylegan2 import StyleGAN2Generator  # noqa: E402

MODELS = Path(os.environ.get("SLEUTH_EVAL_MODELS", Path.home() / ".cache" / "sleuth-eval-models"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ffhq-256", help="StyleGAN2 preset: ffhq-256, ffhq-512, ffhq-1024")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--faces", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="fast setting's steps (default: fast())")
    ap.add_argument("--baseline-steps", type=int, default=1000)
    ap.add_argument("--baseline-faces", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/projection_timing.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = StyleGAN2Generator.from_preset(args.config, seed=0).to(device).eval().requires_grad_(False)
    lpips_file = MODELS / "lpips-vgg16.safetensors"
    vgg = load_lpips(lpips_file if lpips_file.is_file() else None, net="vgg", device=device)
    with torch.no_grad():
        targets = gen.synthesize(gen.mapping(gen.sample_z(args.faces, seed=1, device=device)), "w").clamp(
            -1, 1
        )
    encoder = LatentEncoder(EncoderConfig(gen.resolution, "w", gen.w_dim)).to(device).eval()

    fast = ProjectionConfig.fast("w", encoder=True)
    fast.early_stop = False  # time the full budget
    if args.steps is not None:
        fast.steps = args.steps
    synchronize(device)
    t0 = time.perf_counter()
    starts = list(predict_starts(encoder, targets, gen.latent_shape("w"))[:, None])
    project(gen, targets, lpips_model=vgg, config=fast, starts=starts, device=device)
    synchronize(device)
    fast_s = (time.perf_counter() - t0) / args.faces

    base = ProjectionConfig.published("w")
    base.steps = args.baseline_steps
    t0 = time.perf_counter()
    for i in range(min(args.baseline_faces, args.faces)):
        project(gen, targets[i : i + 1], lpips_model=vgg, config=base, device=device)
    synchronize(device)
    base_s = (time.perf_counter() - t0) / min(args.baseline_faces, args.faces)
    doc = {
        "config": args.config, "device": str(device), "faces": args.faces, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fast": {"steps": fast.steps, "seconds_per_face": fast_s, "seconds_per_step_per_face": fast_s / fast.steps},
        "published": {"steps": base.steps, "faces": min(args.baseline_faces, args.faces), "seconds_per_face": base_s,
                      "seconds_per_step": base_s / base.steps},
        "speedup_per_face": base_s / fast_s,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
