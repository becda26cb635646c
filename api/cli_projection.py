"""``sleuth generators add|list|convert|train-encoder|calibrate`` and ``sleuth project``: the projection verbs of the CLI.

A thin typer layer over ``projection.registry``, ``projection.calibration`` and ``projection.evidence``;
registered on the main app at the end of ``api/cli.py``. Library errors end the command through the same
``handles_errors`` as every other verb (one clear line on stderr, exit 2).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from tqdm import tqdm

from api.cli_options import (
    DataDirOpt,
    DeviceOpt,
    FaceDetectorOpt,
    JsonOpt,
    err,
    handles_errors,
    out,
    print_json,
    settings_for,
)
from indexer.errors import SourceError

generators_app: typer.Typer = typer.Typer(
    no_args_is_help=True,
    help="Register, list, convert, train encoders for and calibrate generator checkpoints.",
)

StepsOpt = Annotated[
    int | None, typer.Option("--steps", min=1, help="projection step budget (default: the fast setting)")
]


def _with_device(data_dir: Path | None, device: str | None) -> Any:
    settings = settings_for(data_dir)
    if device is not None:
        settings = settings.model_copy(update={"device": device})
    return settings


@generators_app.command("add")
@handles_errors
def generators_add(
    name: Annotated[str, typer.Argument(help="name to register the generator under")],
    path: Annotated[
        Path,
        typer.Argument(
            help="checkpoint (NVlabs .pkl, rosinality .pt, DCGAN .pt, safetensors) or, for --family onnx, "
            "the model card JSON naming the ONNX files"
        ),
    ],
    family: Annotated[str, typer.Option("--family", help="stylegan2, dcgan or onnx")],
    latent_distribution: Annotated[
        str | None,
        typer.Option(
            "--latent-distribution",
            help="DCGAN only: how z was drawn in training, normal (default) or uniform",
        ),
    ] = None,
    description: Annotated[
        str | None,
        typer.Option("--description", help="what the generator is, as reports name it (default: the card's)"),
    ] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a generator: read safely (no code runs), its files copied or converted once, SHA-256s recorded."""
    from projection.registry import register_generator

    info = register_generator(
        settings_for(data_dir), name, path, family=family, z_distribution=latent_distribution,
        description=description,
    )  # fmt: skip
    if as_json:
        print_json(info.to_json())
    else:
        out.print(
            f"registered [bold]{info.name}[/] ({info.family}, {info.resolution}x{info.resolution}): "
            f"{info.description}\n  -> {info.weights_path}\n  source sha256 {info.source_sha256}\n"
            f"  weights sha256 {info.weights_sha256}",
            highlight=False,
        )


@generators_app.command("list")
@handles_errors
def generators_list(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """The registered generators with their checksums and calibration sample sizes."""
    from projection.calibration import sample_sizes_words
    from projection.registry import list_generators

    infos = list_generators(settings_for(data_dir))
    if as_json:
        print_json({"generators": [i.to_json() for i in infos]})
        return
    if not infos:
        out.print("no generators registered; add one with `sleuth generators add NAME PATH --family ...`")
        return
    table = Table("name", "family", "resolution", "weights sha256", "encoder", "calibrated")
    for i in infos:
        sizes = i.to_json()["calibration_sizes"]
        cal = sample_sizes_words(sizes) if sizes else "no"
        enc = f"cosine {i.encoder['report']['holdout_cosine']:.2f}" if i.encoder else "no"
        table.add_row(i.name, i.family, str(i.resolution), i.weights_sha256[:16], enc, cal)
    out.print(table)


@generators_app.command("convert")
@handles_errors
def generators_convert(
    src: Annotated[Path, typer.Argument(help="checkpoint to convert")],
    dst: Annotated[Path, typer.Argument(help="safetensors file to write")],
    as_json: JsonOpt = False,
) -> None:
    """Convert any supported checkpoint to safetensors (no registration); prints both SHA-256s."""
    from projection.checkpoints import convert_to_safetensors

    src_sha, dst_sha = convert_to_safetensors(src, dst)
    if as_json:
        print_json({"source": str(src), "source_sha256": src_sha, "path": str(dst), "sha256": dst_sha})
    else:
        out.print(f"{src} (sha256 {src_sha}) -> {dst} (sha256 {dst_sha})")


@generators_app.command("train-encoder")
@handles_errors
def generators_train_encoder(
    name: Annotated[str, typer.Argument(help="registered generator")],
    samples: Annotated[
        int, typer.Option("--samples", min=256, help="generator samples to train on")
    ] = 20_000,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="passes over the samples")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="seed of the samples and the training")] = 0,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="cnn: a small network trained from scratch (needs ~20000 samples); features: frozen VGG16 "
            "features + ridge regression (a few thousand samples: for large generators)",
        ),
    ] = "cnn",
    backbone: Annotated[
        Path | None,
        typer.Option(
            "--backbone", help="--kind features: the VGG16 LPIPS weights (default SLEUTH_LPIPS_WEIGHTS)"
        ),
    ] = None,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the latent encoder whose prediction starts every projection (fewer steps, right basin); clears the
    calibration, which must then be made again with `calibrate`. Drawn samples are kept: training again with
    other epochs or another kind does not draw them again."""
    from projection.encoder import TrainingConfig, train_generator_encoder

    shown: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        step = max(1, total // 10)  # about ten lines per phase
        if done == total or done // step != shown.get(phase, -1):
            shown[phase] = done // step
            err.print(
                f"{'drawing samples of ' + name if phase == 'sampling' else 'training epoch'}: {done}/{total}"
            )

    settings = _with_device(data_dir, device)
    if kind not in ("cnn", "features"):
        raise SourceError(f"--kind must be cnn or features, got {kind!r}")
    training = TrainingConfig(
        samples=samples, epochs=epochs, seed=seed, holdout=min(500, samples // 10), kind=kind,
        backbone=str(backbone) if backbone else None,
    )  # fmt: skip
    info, report = train_generator_encoder(settings, name, training, progress=progress)
    if as_json:
        print_json({"generator": name, "encoder": info.encoder})
        return
    out.print(
        f"encoder for [bold]{name}[/] ({report.samples} samples, {report.epochs} epochs, {report.seconds:.0f}s): "
        f"held-out cosine {report.holdout_cosine:.3f}, relative MSE {report.holdout_relative_mse:.3f}\n"
        f"  -> {info.encoder and info.encoder['path']}\n  calibration cleared: run `sleuth generators calibrate "
        f"{name} --real DIR`"
    )


@generators_app.command("calibrate")
@handles_errors
def generators_calibrate(
    name: Annotated[str, typer.Argument(help="registered generator")],
    real: Annotated[Path, typer.Option("--real", help="folder of real face photos")],
    k: Annotated[int, typer.Option("--k", min=2, help="generated samples and real faces to project")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="seed of the samples")] = 0,
    steps: StepsOpt = None,
    against: Annotated[
        list[str] | None,
        typer.Option(
            "--against",
            help="another registered generator whose samples join the negative class (repeatable): faces it "
            "made must not be called this generator's",
        ),
    ] = None,
    k_other: Annotated[
        int | None, typer.Option("--k-other", min=1, help="samples of each --against generator (default K/2)")
    ] = None,
    device: DeviceOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Project K perturbed generator samples and K real faces (and samples of the --against generators); store
    the LPIPS distributions and the fit."""
    from projection.calibration import calibrate_generator

    cal = calibrate_generator(_with_device(data_dir, device), name, real, k=k, seed=seed, steps=steps,
                              other_generators=against or (), k_other=k_other)  # fmt: skip
    doc = cal.to_json()
    if as_json:
        keys = ("method", "n_generated", "n_real", "n_other", "auc")
        print_json({"generator": name, **{k_: doc[k_] for k_ in keys}})
        return
    gen, rl = sorted(cal.generated_lpips), sorted(cal.real_lpips)
    other = ""
    if cal.other_lpips:
        ot = sorted(cal.other_lpips)
        other = f", {cal.n_other} of other generators (median LPIPS {ot[len(ot) // 2]:.4f})"
    out.print(
        f"calibrated [bold]{name}[/]: {cal.n_generated} generated (median LPIPS {gen[len(gen) // 2]:.4f}), "
        f"{cal.n_real} real (median LPIPS {rl[len(rl) // 2]:.4f}){other}; AUC on these samples {doc['auc']:.3f}"
    )


def _step(bar: tqdm[Any], _faces_done: int, step: int, steps: int) -> None:
    """``project_images``' ``progress(faces_done, step, steps)`` on a tqdm bar of the steps."""
    bar.total = steps
    bar.update(step - bar.n)


def _stem(index: int, path: Path, generator: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    return f"{index:03d}-{safe}-{generator}"


@handles_errors
def project(
    images: Annotated[list[Path], typer.Argument(help="image files, each holding a face")],
    generator: Annotated[str, typer.Option("--generator", "-g", help="registered generator name")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="folder for the reconstruction and difference-map PNGs")
    ] = Path("projection-out"),
    steps: StepsOpt = None,
    device: DeviceOpt = None,
    face_detector: FaceDetectorOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON document per image per line, in input order")
    ] = False,
) -> None:
    """Project the face of each image into a generator (models load once) and print the evidence."""
    from indexer.decode import decode_file
    from projection.calibration import sample_sizes_words
    from projection.evidence import project_images

    settings = _with_device(data_dir, device)
    if face_detector is not None:
        settings = settings.model_copy(update={"face_detector": face_detector})
    decoded = []
    for path in images:
        try:
            decoded.append(decode_file(path, limits=settings.limits))
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    evidence = []
    for n, d in enumerate(decoded, 1):  # one image per projection batch: each gets its own seconds
        with tqdm(desc=f"projecting {n}/{len(decoded)}", unit="step", disable=None, leave=False) as bar:
            evidence += project_images(
                settings, [d.image], generator, steps=steps, jpeg_qualities=[d.jpeg_quality],
                progress=partial(_step, bar),
            )  # fmt: skip
    for i, (path, d, ev) in enumerate(zip(images, decoded, evidence, strict=True)):
        doc = ev.to_json(images="files", image_dir=out_dir, stem=_stem(i, path, generator))
        doc = {"image": str(path), "sha256": d.sha256, **doc}
        if as_json:
            print_json(doc)
            continue
        prob = ev.probability_generated
        verdict = (
            str(ev.probability_note)
            if prob is None
            else f"p(generated by {generator}: {ev.description}) = {prob:.3f} "
            f"(calibrated on {sample_sizes_words(ev.calibration_sizes)})"
        )
        judged = " (judged by MSE: a face under 64 px)" if ev.metric == "mse" else ""
        out.print(
            f"[bold]{path}[/] -> {generator}: LPIPS {ev.lpips:.4f}, MSE {ev.mse:.5f}{judged}; {verdict}",
            soft_wrap=True,
        )
        quality = f", JPEG quality {ev.face['jpeg_quality']}" if ev.face.get("jpeg_quality") else ""
        out.print(
            f"  face: {ev.face['how']}, compared at its effective size {ev.face['effective_size']} px{quality}; "
            f"{ev.steps} steps, {ev.seconds:.2f}s",
            soft_wrap=True,
        )
        for m in ev.latent_matches:
            image = "" if m.image_lpips is None else f", its image LPIPS {m.image_lpips:.4f}"
            out.print(
                f"  latent match: seed {m.seed} image {m.sha256 or '-'} cosine {m.cosine:.3f} "
                f"distance {m.distance:.3f}{image}",
                soft_wrap=True,
            )
        if (match := ev.reproducing_match) is not None:
            out.print(
                f"  reproduced by the stored latent {match.latent_id} (a known generated image): LPIPS "
                f"{match.image_lpips:.4f} <= its reprojection's {ev.lpips:.4f}",
                soft_wrap=True,
            )
        out.print(f"  wrote {doc['reconstruction']} and {doc['difference']}", soft_wrap=True, highlight=False)
    if not as_json:
        err.print(f"{len(evidence)} image(s) projected into {generator}")
