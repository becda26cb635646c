"""Project images into a generator's latent space (Karras et al. 2020, StyleGAN2, sec. 5 and appendix D).

The published algorithm, per image: start at the mean latent; optimise the latent (and, for StyleGAN-family
generators, the per-layer noise maps) with Adam; the learning rate ramps up over the first ``lr_rampup`` of
the steps and down with a cosine over the last ``lr_rampdown``; Gaussian noise of scale
``latent_std_total * initial_noise_factor * max(0, 1 - t / noise_ramp) ** 2`` is added to the latent at each
step (``latent_std_total`` = RMS distance of latent samples from their mean, i.e. per-coordinate std *
sqrt(dim)); the loss is the VGG-LPIPS distance (both images area-downsampled to ``lpips_resolution`` when the
generator is larger) plus ``noise_reg_weight`` times the multi-scale noise autocorrelation penalty; the noise
maps are renormalised to zero mean and unit variance after every step. For DCGAN (only z) the same loop
optimises z, without noise maps.

Made fast (``ProjectionConfig.fast()`` is the evidence setting Sleuth uses, measured in
``benchmarks/projection.py``; ``ProjectionConfig.published()`` is the paper's setting):

- a learned start (``projection.encoder``, given by the caller as start 1): a generator's encoder predicts the
  latent of a face in one forward pass, so a short run from there refines instead of searching; with it the fast
  setting runs that row alone (``mean_start=False``);
- every target x every start is one row of a single batched run (latents ``[B*S, ...]``); starts are the mean
  latent plus optional given latents per target (e.g. stored latents of the top generated-face hits);
- Adam is applied per element, so each row evolves exactly as it would alone (the latent noise of a row comes
  from its own generator seeded by ``(seed, start index)``), and rows can stop independently;
- per-row early stopping: a row whose loss has not improved by ``rel_tol`` (relative) over ``patience`` steps
  stops and is no longer computed; the run ends when every row has stopped;
- a forward-only search for a good basin (``candidate_starts``): the random z sample whose image is nearest the
  target in pixels becomes one more start (``mean_start=False`` then drops the mean-latent row);
- fewer steps with an extra pixel-MSE term; the best-loss latent of each row is kept, and per target the start
  with the lowest final objective wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from projection.generator_base import Generator

logger = logging.getLogger(__name__)

_MALLOC_TUNED = False


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc to keep large freed blocks in the heap instead of returning them to the OS (once per process).

    Every projection step allocates and frees the generator's activations (hundreds of MB at 1024 px). glibc
    serves blocks that large with mmap and gives them back with munmap, so the kernel maps and zeroes fresh
    pages at every step: on MobileStyleGAN-FFHQ that doubled the time of a step on this CPU (2.3-3.1 s against
    1.3-1.5 s on one core). The cost is that the process keeps its peak heap. No-op off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not trim the heap's top back to the OS
    except (OSError, AttributeError):
        logger.debug("mallopt is not available; projection runs with the allocator's defaults")


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ENCODER_STEPS = 100  # the fast setting from an encoder's start (measured in benchmarks/projection.py)


@dataclass
class ProjectionConfig:
    """Hyper-parameters of one projection run (defaults: the fast setting, chosen by measurement)."""

    space: str = "w"  # generators without it (DCGAN: only z) use their only space
    steps: int = 150
    lr: float = 0.1
    noise_ramp: float = 0.75
    lr_rampup: float = 0.05
    lr_rampdown: float = 0.25
    initial_noise_factor: float = 0.05
    noise_reg_weight: float = 1e5
    mse_weight: float = 1.0
    lpips_weight: float = 1.0
    patience: int = 25
    rel_tol: float = 1e-3
    seed: int = 0
    lpips_resolution: int = 256
    early_stop: bool = True
    candidate_starts: int = 0  # > 0: also start from the best (pixel MSE) of this many random z samples
    mean_start: bool = True  # False: skip the mean latent where other starts are given (one row per target)
    preview: bool = True  # optimise on the generator's exact lower-resolution read-out when it suffices

    @classmethod
    def fast(cls, space: str = "w", *, encoder: bool = False) -> ProjectionConfig:
        """Sleuth's evidence setting (measured in benchmarks/projection.py).

        With a latent encoder (``encoder=True``; its prediction is given as a start): ``ENCODER_STEPS`` steps from
        that start alone (real DCGAN, 10 + 10 faces the 1000-step baseline separates perfectly: AUC 1.00 at 50 and
        100 steps with AlexNet-LPIPS + MSE, 0.8 s per face at 100). Without one: 200 steps with the MSE term and
        early stopping, starting from the mean latent and from the best of 64 random samples (200 + 200 faces:
        AUC 0.970 at 200 steps, 0.945 at 100; 0.90 on those 20 faces)."""
        if encoder:
            return cls(space=space, steps=ENCODER_STEPS, mean_start=False)
        return cls(space=space, steps=200, candidate_starts=64)

    @classmethod
    def published(cls, space: str = "w") -> ProjectionConfig:
        """The paper's settings: 1000 steps, lr 0.1, LPIPS only (no MSE), no early stopping, every step at the
        generator's full resolution."""
        return cls(space=space, steps=1000, lr=0.1, mse_weight=0.0, early_stop=False, preview=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProjectionResult:
    """The best reconstruction of one target."""

    latent: torch.Tensor  # latent_shape(space), on the CPU
    space: str
    reconstruction: torch.Tensor  # [3, R, R] in [-1, 1], on the CPU
    lpips: float
    mse: float
    loss_trace: list[float] = field(default_factory=list)  # the winning start's objective per step
    steps: int = 0  # steps the winning start ran before it stopped
    seconds: float = 0.0  # wall time of the batched run divided by the number of targets
    start_index: int = 0  # 0: the mean latent; k: the k-th given start of this target


# --- learning rate and latent noise schedules ----------------------------------------------------------
def learning_rate(config: ProjectionConfig, step: int) -> float:
    """Ramp up linearly over ``lr_rampup``, cosine ramp down over the last ``lr_rampdown`` of the steps."""
    t = step / config.steps
    ramp = min(1.0, (1.0 - t) / config.lr_rampdown) if config.lr_rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    if config.lr_rampup > 0:
        ramp *= min(1.0, t / config.lr_rampup)
    return config.lr * ramp


def latent_noise_scale(config: ProjectionConfig, step: int, latent_std_total: float) -> float:
    """``latent_std_total * initial_noise_factor * max(0, 1 - t / noise_ramp) ** 2`` (zero after the ramp)."""
    t = step / config.steps
    if config.noise_ramp <= 0:
        return 0.0
    return latent_std_total * config.initial_noise_factor * max(0.0, 1.0 - t / config.noise_ramp) ** 2


# --- noise maps --------------------------------------------------------------------------------------
def noise_regularization(noises: list[torch.Tensor]) -> torch.Tensor:
    """Per-row multi-scale autocorrelation penalty of the noise maps: ``[N]``.

    For each map ``[N, 1, H, W]`` and each level of its 2x average-pooling pyramid down to 8x8: the squared
    mean product of the map with itself shifted by one pixel horizontally, plus the same vertically.
    """
    assert noises, "no noise maps"
    reg = noises[0].new_zeros(noises[0].shape[0])  # [N]
    for v in noises:
        while True:
            reg = reg + (v * torch.roll(v, shifts=1, dims=3)).mean(dim=(1, 2, 3)) ** 2
            reg = reg + (v * torch.roll(v, shifts=1, dims=2)).mean(dim=(1, 2, 3)) ** 2
            if v.shape[2] <= 8:
                break
            v = F.avg_pool2d(v, kernel_size=2)
    return reg


def normalize_noises_(noises: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Renormalise the maps of ``rows`` to zero mean, unit variance (in place, per row)."""
    with torch.no_grad():
        for v in noises:
            sel = v[rows]  # [n, 1, H, W]
            sel = sel - sel.mean(dim=(1, 2, 3), keepdim=True)
            sel = sel * torch.rsqrt(sel.square().mean(dim=(1, 2, 3), keepdim=True) + 1e-12)
            v[rows] = sel


def _noise_shapes(generator: Generator) -> list[tuple[int, int]]:
    """``[(H, W)]`` of the generator's per-layer noise maps, empty when it has none (DCGAN)."""
    buffers = getattr(generator, "noise_buffers", None)
    if buffers is None:
        return []
    return [tuple(b.shape[-2:]) for b in buffers()]  # type: ignore[misc]


def _stylegan2_synthesize(
    generator: Any, latent: torch.Tensor, space: str, noises: list[torch.Tensor]
) -> torch.Tensor:
    """StyleGAN2 synthesis with a separate noise map per row: ``noises[k]`` ``[N, 1, R_k, R_k]``.

    The per-row counterpart of the generator's ``noise_mode="const"`` path (which shares one map per layer
    across the batch); built from the generator's own layers, checked against it in the tests.
    """
    from projection.stylegan2 import modulated_conv2d, upsample2x

    if space == "z":
        latent, space = generator.mapping(latent), "w"
    ws = latent[:, None, :].expand(-1, generator.num_ws, -1) if space == "w" else latent  # [N, num_ws, w_dim]
    net = generator.synthesis_net

    def conv(k: int, x: torch.Tensor) -> torch.Tensor:
        layer = net.layers[k]
        styles = layer.affine(ws[:, k])  # [N, Cin]
        fir = net.fir if layer.upsample else None
        x = modulated_conv2d(
            x, layer.weight * layer.weight_gain, styles, demodulate=True, upsample_kernel=fir
        )
        x = x + noises[k] * layer.noise_strength  # [N, 1, R, R] broadcast over channels
        x = F.leaky_relu(x + layer.bias[None, :, None, None], 0.2) * math.sqrt(2.0)
        return x if layer.conv_clamp is None else x.clamp(-layer.conv_clamp, layer.conv_clamp)

    x = net.const[None].expand(ws.shape[0], -1, -1, -1)  # [N, C4, 4, 4]
    img: torch.Tensor | None = None
    for b in range(len(net.to_rgbs)):
        x = conv(0, x) if b == 0 else conv(2 * b, conv(2 * b - 1, x))
        y = net.to_rgbs[b](x, ws[:, 2 * b + 1])  # [N, 3, R_b, R_b]
        img = y if img is None else upsample2x(img, net.fir) + y
    assert img is not None
    return img


def synthesize(
    generator: Generator, latent: torch.Tensor, space: str, noises: list[torch.Tensor]
) -> torch.Tensor:
    """Images ``[N, 3, R, R]`` from latents ``[N, ...]`` and per-row noise maps (if the generator has any)."""
    if noises:
        return _stylegan2_synthesize(generator, latent, space, noises)
    return generator.synthesize(latent, space)


# --- comparison targets and LPIPS with their features computed once ---------------------------------------
LPIPS_MIN_SIDE = 64  # smaller comparisons are enlarged (bilinear, both images alike) before LPIPS


@dataclass
class CompareTarget:
    """What a reconstruction is compared with: the face at its effective size in the query's own pixels."""

    image: torch.Tensor  # [3, s, s] in [-1, 1]

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, size, size]``: area average when reducing, bilinear when enlarging."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def comparison_size(target_size: int, lpips_resolution: int) -> int:
    """The side both images are brought to for the loss and the evidence: the target's, at most LPIPS's."""
    return min(target_size, lpips_resolution)


def _lpips_input(images: torch.Tensor) -> torch.Tensor:
    return resize_to(images, LPIPS_MIN_SIDE) if images.shape[-1] < LPIPS_MIN_SIDE else images


class LpipsDistance:
    """VGG/AlexNet LPIPS of candidate images against fixed targets, the targets' features computed once.

    Uses the ``lpips.LPIPS`` module's own pieces (scaling layer, backbone slices, unit-normalisation, linear
    layers), so ``distance`` equals ``lpips_model(candidates, targets)``. Targets may have different sizes; each
    call compares candidates of one size with targets of that size.
    """

    def __init__(self, lpips_model: torch.nn.Module, targets: list[torch.Tensor]) -> None:
        """targets: ``[3, c, c]`` each, in [-1, 1], at their comparison size."""
        self.model: Any = lpips_model  # an lpips.LPIPS (untyped package)
        self.target_feats: list[list[torch.Tensor]] = []  # per target: [C_k, h_k, w_k] per layer
        with torch.no_grad():
            for t in targets:
                feats = self._features(_lpips_input(t[None]))
                self.target_feats.append([self._normalized(f)[0] for f in feats])

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.net(self.model.scaling_layer(x)))

    @staticmethod
    def _normalized(f: torch.Tensor) -> torch.Tensor:
        return f * torch.rsqrt(f.square().sum(dim=1, keepdim=True) + 1e-20)  # = lpips.normalize_tensor

    def distance(self, candidates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """LPIPS ``[n]`` of candidates ``[n, 3, c, c]`` against targets ``rows`` (indices ``[n]``, one size c)."""
        idx = rows.tolist()
        total = candidates.new_zeros(candidates.shape[0])
        for k, feat in enumerate(self._features(_lpips_input(candidates))):
            target = torch.stack([self.target_feats[i][k] for i in idx])  # [n, C_k, h, w]
            total = total + self.model.lins[k]((self._normalized(feat) - target) ** 2).mean(dim=(1, 2, 3))
        return total


class Comparisons:
    """Each target at its comparison size, grouped so that rows of one size are compared together."""

    def __init__(
        self,
        lpips_model: torch.nn.Module,
        compare: list[CompareTarget],
        config: ProjectionConfig,
        device: torch.device,
    ) -> None:
        self.sizes = [comparison_size(c.size, config.lpips_resolution) for c in compare]
        self.images = [
            resize_to(c.image[None].to(device, torch.float32), s)[0]
            for c, s in zip(compare, self.sizes, strict=True)
        ]
        self.lpips = LpipsDistance(lpips_model, self.images)

    def largest(self, targets: list[int]) -> int:
        return max(self.sizes[t] for t in targets)

    def loss(
        self, images: torch.Tensor, target_rows: list[int], config: ProjectionConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective, LPIPS, MSE), each ``[n]``, of ``images`` ``[n, 3, H, W]`` against targets ``target_rows``."""
        n = images.shape[0]
        lp, mse = images.new_zeros(n), images.new_zeros(n)
        for size in sorted({self.sizes[t] for t in target_rows}):
            sel = [i for i, t in enumerate(target_rows) if self.sizes[t] == size]
            idx = torch.tensor(sel, device=images.device)
            tg = [target_rows[i] for i in sel]
            small = resize_to(images[idx], size)
            if config.lpips_weight:
                lp = lp.index_put((idx,), self.lpips.distance(small, torch.tensor(tg)))
            tgt = torch.stack([self.images[t] for t in tg])  # MSE is cheap: always reported
            mse = mse.index_put((idx,), (small - tgt).square().mean(dim=(1, 2, 3)))
        return config.lpips_weight * lp + config.mse_weight * mse, lp, mse


# --- the batched run ---------------------------------------------------------------------------------
def resolve_space(generator: Generator, space: str) -> str:
    """``space`` if the generator has it; a z-only generator (DCGAN) uses z."""
    if space in generator.latent_spaces:
        return space
    if generator.latent_spaces == ("z",):
        return "z"
    raise ValueError(f"{type(generator).__name__} has no latent space {space!r} ({generator.latent_spaces})")


def _start_rows(
    generator: Generator, space: str, batch: int, starts: list[torch.Tensor] | None, include_mean: bool = True
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Initial latents ``[n_rows, *shape]``, each row's target index, and each row's start index.

    ``include_mean=False`` skips the mean latent (start 0) for targets that have given starts."""
    shape = generator.latent_shape(space)
    mean = generator.mean_latent(space).detach().to("cpu", torch.float32).reshape(shape)
    if starts is not None and len(starts) != batch:
        raise ValueError(f"starts must hold one tensor per target ({batch}), got {len(starts)}")
    rows, target_of, start_of = [], [], []
    for b in range(batch):
        given = torch.empty((0, *shape))
        if starts is not None and starts[b] is not None and starts[b].numel():
            given = starts[b].detach().to("cpu", torch.float32).reshape(-1, *shape)
        for s, latent in enumerate([mean, *given]):
            if s == 0 and not include_mean and len(given):
                continue
            rows.append(latent)
            target_of.append(b)
            start_of.append(s)
    return torch.stack(rows), target_of, start_of


def _row_generators(seed: int, start_of: list[int]) -> list[torch.Generator]:
    """One CPU random generator per row, seeded by (seed, start index): independent of batching."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + s) for s in start_of]


def _randn(gens: list[torch.Generator], rows: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``[len(rows), *shape]`` standard normal values, row ``i`` drawn from ``gens[rows[i]]``."""
    return torch.stack([torch.randn(shape, generator=gens[r]) for r in rows])


class _Adam:
    """Adam (Kingma & Ba 2015) applied to selected rows of each parameter tensor; rows are independent."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[torch.Tensor], rows: torch.Tensor, lr: float) -> None:
        self.t += 1
        b1, b2 = ADAM_BETAS
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
                m[rows] = b1 * m[rows] + (1 - b1) * g
                v[rows] = b2 * v[rows] + (1 - b2) * g.square()
                m_hat = m[rows] / (1 - b1**self.t)
                v_hat = v[rows] / (1 - b2**self.t)
                p[rows] = p[rows] - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


@dataclass
class _RowState:
    best_loss: torch.Tensor  # [n_rows]
    since_improved: torch.Tensor  # [n_rows] steps without a relative improvement of rel_tol
    active: torch.Tensor  # [n_rows] bool
    steps: torch.Tensor  # [n_rows] steps run
    traces: list[list[float]]


def project(
    generator: Generator,
    targets: torch.Tensor,
    *,
    lpips_model: torch.nn.Module,
    config: ProjectionConfig | None = None,
    starts: list[torch.Tensor] | None = None,
    compare: list[CompareTarget] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[ProjectionResult]:
    """Project each of ``targets`` ``[B, 3, R, R]`` (in [-1, 1]) into ``generator``; one result per target.

    ``compare[b]``: what target ``b``'s reconstructions are scored against (the face at its effective size, with
    default: the target itself); the loss and the result's LPIPS compare at ``comparison_size``.
    ``starts[b]``: optional extra start latents ``[S_b, *latent_shape]`` for target ``b`` (the mean latent is
    always start 0). Every (target, start) pair is one row of one batched optimisation; per target the row with
    the lowest final objective wins. ``progress(step, active_rows)`` is called after each step.
    """
    config = config or ProjectionConfig()
    device = torch.device(device)
    keep_freed_memory_for_reuse()
    res = generator.resolution
    assert targets.ndim == 4 and targets.shape[1:] == (3, res, res), (tuple(targets.shape), res)
    if compare is None:
        compare = [CompareTarget(t) for t in targets]
    assert len(compare) == targets.shape[0], (len(compare), targets.shape[0])
    space = resolve_space(generator, config.space)
    shape = generator.latent_shape(space)
    started = time.perf_counter()
    generator.to(device)
    lpips_model.to(device)
    if config.candidate_starts > 0:
        starts = _with_best_candidates(generator, targets.to(device, torch.float32), space, config, starts)
    grad_flags = [p.requires_grad for p in generator.parameters()]
    generator.requires_grad_(False)
    try:
        comparisons = Comparisons(lpips_model, compare, config, device)
        rows_best, row_state, row_noises, target_of, start_of = _optimise(
            generator, comparisons, targets.shape[0], config, starts, space, shape, device, progress
        )
        results = _finish(
            generator, comparisons, targets.shape[0], config, space, rows_best, row_noises, row_state, target_of,
            start_of,
        )  # fmt: skip
    finally:
        for p, flag in zip(generator.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    seconds = (time.perf_counter() - started) / max(1, len(results))
    for r in results:
        r.seconds = seconds
    return results


def _render(
    generator: Generator,
    latent: torch.Tensor,
    space: str,
    noises: list[torch.Tensor],
    size: int,
    preview: bool,
) -> torch.Tensor:
    """Images of the rows for a comparison at ``size``: the exact preview read-out when it is large enough."""
    if preview and not noises and 0 < size <= generator.preview_resolution:
        return generator.synthesize_preview(latent, space)
    return synthesize(generator, latent, space, noises)


def _with_best_candidates(
    generator: Generator,
    targets: torch.Tensor,
    space: str,
    config: ProjectionConfig,
    starts: list[torch.Tensor] | None,
    chunk: int = 256,
) -> list[torch.Tensor]:
    """``starts`` plus, per target, the latent of the ``config.candidate_starts`` random z samples (seeded by
    ``config.seed``) whose image is nearest the target in pixel MSE: a forward-only search for a good basin."""
    z = generator.sample_z(config.candidate_starts, seed=config.seed, device=targets.device)  # [K, *z_shape]
    chunk = max(1, min(chunk, 2**22 // generator.resolution**2))
    with torch.no_grad():
        latents = z if space == "z" else generator.mapping(z)  # type: ignore[operator]
        if space == "w+":
            num_ws = int(getattr(generator, "num_ws"))  # noqa: B009 - StyleGAN-family only
            latents = latents[:, None, :].expand(-1, num_ws, -1)  # [K, num_ws, w_dim]
        errors = []
        for lo in range(0, len(latents), chunk):
            images = generator.synthesize_preview(latents[lo : lo + chunk], space)  # [c, 3, P, P]
            small = resize_to(targets, images.shape[-1])
            errors.append(torch.cdist(small.flatten(1), images.flatten(1)))  # [B, c] (L2 = sqrt(MSE * D))
        best = torch.cat(errors, dim=1).argmin(dim=1)  # [B]
    out: list[torch.Tensor] = []
    for b in range(targets.shape[0]):
        given = starts[b] if starts is not None and starts[b] is not None else torch.empty(0)
        given = given.detach().to("cpu", torch.float32).reshape(-1, *latents.shape[1:])
        out.append(torch.cat([given, latents[best[b]].detach().cpu()[None]]))
    return out


def _optimise(
    generator: Generator,
    comparisons: Comparisons,
    n_targets: int,
    config: ProjectionConfig,
    starts: list[torch.Tensor] | None,
    space: str,
    shape: tuple[int, ...],
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> tuple[torch.Tensor, _RowState, list[torch.Tensor], list[int], list[int]]:
    """The optimisation loop over all rows. Returns the best latents and noise maps per row and the row state."""
    init, target_of, start_of = _start_rows(generator, space, n_targets, starts, config.mean_start)
    n_rows = init.shape[0]
    gens = _row_generators(config.seed, start_of)
    all_rows = list(range(n_rows))
    latent = init.to(device).clone()  # [n_rows, *shape]
    noise_shapes = _noise_shapes(generator)
    noises = [_randn(gens, all_rows, (1, h, w)).to(device) for h, w in noise_shapes]  # [n_rows, 1, H, W] each
    if noises:
        normalize_noises_(noises, torch.arange(n_rows, device=device))
    std_total = generator.latent_std(space) * math.sqrt(math.prod(shape[-1:] if space == "w+" else shape))
    adam = _Adam([latent, *noises])
    best_latent = latent.clone()
    best_noises = [v.clone() for v in noises]
    state = _RowState(
        best_loss=torch.full((n_rows,), math.inf, device=device),
        since_improved=torch.zeros(n_rows, dtype=torch.long, device=device),
        active=torch.ones(n_rows, dtype=torch.bool, device=device),
        steps=torch.zeros(n_rows, dtype=torch.long, device=device),
        traces=[[] for _ in range(n_rows)],
    )
    for step in range(config.steps):
        rows = state.active.nonzero().flatten()  # [n]
        if rows.numel() == 0:
            break
        row_list = rows.tolist()
        row_targets = [target_of[r] for r in row_list]
        noise_scale = latent_noise_scale(config, step, std_total)
        w_noise = _randn(gens, row_list, shape).to(device) * noise_scale  # [n, *shape]
        lat = latent[rows].clone().requires_grad_(True)
        row_noise = [v[rows].clone().requires_grad_(True) for v in noises]
        size = comparisons.largest(row_targets)
        images = _render(generator, lat + w_noise, space, row_noise, size, config.preview)  # [n, 3, H, H]
        loss, _, _ = comparisons.loss(images, row_targets, config)
        if row_noise:
            loss = loss + config.noise_reg_weight * noise_regularization(row_noise)
        grads = torch.autograd.grad(loss.sum(), [lat, *row_noise])
        with torch.no_grad():
            _track_best(
                state, rows, loss.detach(), lat + w_noise, row_noise, best_latent, best_noises, config
            )
        adam.step(list(grads), rows, learning_rate(config, step))
        with torch.no_grad():
            generator.constrain_(latent, space)
        if noises:
            normalize_noises_(noises, rows)
        state.steps[rows] += 1
        if progress is not None:
            progress(step, int(state.active.sum()))
    logger.debug("projection: %d rows, steps per row %s", n_rows, state.steps.tolist())
    return best_latent, state, best_noises, target_of, start_of


def _track_best(
    state: _RowState,
    rows: torch.Tensor,
    loss: torch.Tensor,
    evaluated: torch.Tensor,
    row_noise: list[torch.Tensor],
    best_latent: torch.Tensor,
    best_noises: list[torch.Tensor],
    config: ProjectionConfig,
) -> None:
    """Keep each row's best evaluated latent (the one the loss was computed at); stop rows that plateau."""
    for i, r in enumerate(rows.tolist()):
        state.traces[r].append(float(loss[i]))
    improved = loss < state.best_loss[rows] * (1.0 - config.rel_tol)
    better = loss < state.best_loss[rows]
    idx = rows[better]
    best_latent[idx] = evaluated[better].detach()
    for dst, src in zip(best_noises, row_noise, strict=True):
        dst[idx] = src[better].detach()
    state.best_loss[idx] = loss[better]
    state.since_improved[rows] = torch.where(improved, 0, state.since_improved[rows] + 1)
    if config.early_stop:
        stop = state.since_improved[rows] >= config.patience
        state.active[rows[stop]] = False


def _finish(
    generator: Generator,
    comparisons: Comparisons,
    n_targets: int,
    config: ProjectionConfig,
    space: str,
    best_latent: torch.Tensor,
    best_noises: list[torch.Tensor],
    state: _RowState,
    target_of: list[int],
    start_of: list[int],
) -> list[ProjectionResult]:
    """Evaluate every row's best latent once (noise-free, full resolution), pick the best start per target."""
    chunk = max(1, 2**22 // (generator.resolution**2))  # rows rendered at once (memory of large generators)
    images_parts, lp_parts, mse_parts, obj_parts = [], [], [], []
    with torch.no_grad():
        for lo in range(0, best_latent.shape[0], chunk):
            rows = list(range(lo, min(lo + chunk, best_latent.shape[0])))
            noise = [v[lo : lo + chunk] for v in best_noises]
            images = synthesize(generator, best_latent[lo : lo + chunk], space, noise)  # [c, 3, R, R]
            objective, lp, mse = comparisons.loss(images, [target_of[r] for r in rows], config)
            images_parts.append(images.cpu())
            lp_parts.append(lp)
            mse_parts.append(mse)
            obj_parts.append(objective)
    images_all, lp_all = torch.cat(images_parts), torch.cat(lp_parts)
    mse_all, objective_all = torch.cat(mse_parts), torch.cat(obj_parts)
    results: list[ProjectionResult] = []
    for b in range(n_targets):
        candidates = [r for r, t in enumerate(target_of) if t == b]
        r = min(candidates, key=lambda i: float(objective_all[i]))
        results.append(
            ProjectionResult(
                latent=best_latent[r].detach().cpu(),
                space=space,
                reconstruction=images_all[r],
                lpips=float(lp_all[r]),
                mse=float(mse_all[r]),
                loss_trace=state.traces[r],
                steps=int(state.steps[r]),
                start_index=start_of[r],
            )
        )
    return results
