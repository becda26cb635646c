"""The evidence comparison: a reconstruction against the query at the query's own effective resolution.

Faces circulate downscaled, upscaled and re-encoded. Comparing a sharp reconstruction with an enlarged, blurred,
blocky query would call every shared generated face real. So the reconstruction is degraded the way the query was
made: for a JPEG query, brought to the side the face had in the query file and re-encoded there at the query's
estimated quality (a face enlarged before it was saved has its JPEG blocks at the enlarged size, not at the
generator's), then reduced (area average) to the face's effective size; both are then compared at that size, at
most the LPIPS resolution. The projector's loss
uses the same sizes without the re-encoding (it is not differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from projection.face_prep import PreparedFace
from projection.images import jpeg_round_trip, to_image, to_tensor
from projection.projector import CompareTarget, Comparisons, ProjectionConfig, resize_to


def compare_target(face: PreparedFace) -> CompareTarget:
    """What reconstructions of ``face`` are compared with: its effective-size image."""
    return CompareTarget(to_tensor([face.comparison_image()])[0])  # [3, s, s]


MAX_REENCODE_SIDE = 2048  # a face larger than this in the query is re-encoded at this side (bounded memory)


def degrade_like_query(reconstruction: torch.Tensor, face: PreparedFace) -> torch.Tensor:
    """``[3, R, R]`` -> ``[3, s, s]``: for a JPEG query re-encoded at its quality at the face's side in the query
    (``PreparedFace.query_side``), then reduced to the face's effective size ``s``."""
    rec = reconstruction[None].float()
    if face.jpeg_quality is not None:
        at_query = resize_to(rec, min(face.query_side(), MAX_REENCODE_SIDE))[0]
        rec = to_tensor([jpeg_round_trip(to_image(at_query), face.jpeg_quality)])
    return resize_to(rec, face.size())[0]


def evidence_scores(
    lpips_model: torch.nn.Module,
    reconstructions: Sequence[torch.Tensor],
    faces: Sequence[PreparedFace],
    *,
    lpips_resolution: int = 256,
) -> list[tuple[float, float]]:
    """``(LPIPS, MSE)`` of each reconstruction ``[3, R, R]`` against its face, the evidence comparison above."""
    if not faces:
        return []
    config = ProjectionConfig(lpips_resolution=lpips_resolution, lpips_weight=1.0, mse_weight=1.0)
    device = next(lpips_model.parameters()).device
    comparisons = Comparisons(lpips_model, [compare_target(f) for f in faces], config, device)
    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for i, (rec, face) in enumerate(zip(reconstructions, faces, strict=True)):
            degraded = degrade_like_query(rec.cpu(), face)[None].to(device)  # [1, 3, s, s]
            _, lp, mse = comparisons.loss(degraded, [i], config)
            out.append((float(lp[0]), float(mse[0])))
    return out
