"""The provenance report: every tier's evidence about one query image, a verdict in plain words, and what
is needed to reproduce it. Built from the search result document of ``search.query`` (``result_to_json``),
optionally refined with projection evidence per face (``search.refine.refine_json``); rendered as JSON
(pydantic) and as one self-contained HTML page (jinja2, evidence images inlined as ``data:`` URIs).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib.metadata
import io
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from indexer.decode import DecodedImage
from indexer.ingest import thumbnail_path
from indexer.settings import Settings

log = logging.getLogger(__name__)

MATCH_CLASSES = ("exact", "near_duplicate", "same_person", "similar")
GENERATED_P = 0.5  # p(generated) at or above which a face's projection counts as evidence of generation
QUERY_THUMB_PX = 384
MAX_INLINE_IMAGES = 40
_REPO = Path(__file__).resolve().parent.parent
_env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape(["html"])
)


# --- the model -------------------------------------------------------------------------------------------
class EmbeddedMetadata(BaseModel):
    """Provenance metadata carried inside the file itself (presence, plus the telling fields)."""

    exif: bool = False
    xmp: bool = False
    iptc: bool = False
    c2pa: bool = Field(False, description="a C2PA manifest (JUMBF box labelled c2pa) is embedded")
    digital_source_type: str | None = Field(
        None, description="XMP/IPTC DigitalSourceType, e.g. trainedAlgorithmicMedia"
    )
    creator_tool: str | None = None
    software: str | None = Field(None, description="EXIF Software")
    camera: str | None = Field(None, description="EXIF Make and Model")
    date_taken: str | None = Field(None, description="EXIF DateTimeOriginal (or DateTime)")


class QueryFacts(BaseModel):
    sha256: str
    format: str
    width: int
    height: int
    num_bytes: int
    mode: str | None = None
    frames: int | None = None
    hashes: dict[str, Any] = Field(default_factory=dict, description="PDQ / pHash of the query (hex)")
    embedded: EmbeddedMetadata = Field(default_factory=EmbeddedMetadata)
    exif: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict, description="XMP fields, PNG text, C2PA, ICC")
    region: dict[str, Any] | None = Field(
        None,
        description="a region query: x, y, width, height in the upload's pixels and the upload's SHA-256",
    )


class SightingOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    collection: str | None = None
    source_key: str | None = None
    url: str | None = None
    page_url: str | None = None
    first_seen: str | None = None
    licence: str | None = None


class HitOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    rank: int = Field(description="1 = best, over all match classes")
    image_id: int
    sha256: str | None = None
    match_class: str
    score: float | None = None
    scores: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    generator: str | None = None
    width: int | None = None
    height: int | None = None
    first_seen: str | None = Field(None, description="earliest first_seen over the sightings")
    sightings: list[SightingOut] = Field(default_factory=list)
    verification: dict[str, Any] | None = None


class ProjectionOut(BaseModel):
    """One face projected into one generator (from ``search.refine``)."""

    model_config = ConfigDict(extra="allow")
    generator: str | None = None
    lpips: float | None = None
    probability_generated: float | None = None
    latent_matches: list[dict[str, Any]] = Field(default_factory=list)
    reconstruction: str | None = Field(None, description="data: URI or a file under the data directory")
    difference: str | None = None
    target: str | None = None
    steps: int | None = None
    seconds: float | None = None


class FaceOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    box: list[float] | None = None
    score: float | None = None
    hits: list[dict[str, Any]] = Field(default_factory=list)
    projections: list[ProjectionOut] = Field(default_factory=list)


class DetectorOut(BaseModel):
    """The detector tier's answer (``search.detector``): a statistical call about images like its training data,
    kept apart from copy and projection evidence."""

    model_config = ConfigDict(extra="allow")
    detector: str | None = None
    p_generated: float | None = Field(None, description="calibrated p(generated); None when it abstains")
    scored_on: str | None = Field(None, description="face (the aligned face crop) or image (the whole image)")
    abstained: bool = False
    reason: str | None = Field(None, description="why it abstained")
    views: dict[str, Any] = Field(default_factory=dict, description="per view: score, every method's score")
    scope: str | None = Field(None, description="what it was trained on and what it measured")


class Verdict(BaseModel):
    kind: Literal[
        "copy_of_generated",
        "copy_of_known",
        "reprojects_into_generator",
        "same_person",
        "similar_only",
        "no_match",
    ]
    summary: str = Field(description="the verdict in plain words")
    reasons: list[str] = Field(description="every piece of evidence behind it, strongest first")


class Reproducibility(BaseModel):
    code_version: str
    searcher: str | None = None
    tiers: list[str] = Field(default_factory=list)
    skipped_tiers: dict[str, str] = Field(default_factory=dict)
    models: dict[str, Any] = Field(default_factory=dict, description="model ids with weight SHA-256")
    index_builds: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, Any] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ProvenanceReport(BaseModel):
    report_id: str
    created_at: str
    status: Literal["done", "refining", "failed"] = "done"
    query: QueryFacts
    verdict: Verdict
    hits: dict[str, list[HitOut]] = Field(description="hits by match class: exact, near_duplicate, similar")
    faces: list[FaceOut] = Field(default_factory=list)
    refine: dict[str, Any] | None = Field(None, description="state of the projection tier, when asked for")
    refine_job: str | None = None
    detector: DetectorOut | None = Field(None, description="the detector tier, when a detector is trained")
    reproducibility: Reproducibility

    def all_hits(self) -> list[HitOut]:
        """Every hit, best first."""
        return sorted((h for group in self.hits.values() for h in group), key=lambda h: h.rank)


# --- facts about the query -------------------------------------------------------------------------------
def _has_iptc(data: bytes, fmt: str) -> bool:
    """IPTC-IIM inside the file: a Photoshop APP13 resource 0x0404 (JPEG), or TIFF tag 33723."""
    if fmt == "JPEG":
        at = data.find(b"Photoshop 3.0\x00")
        return at >= 0 and data.find(b"8BIM\x04\x04", at) >= 0
    if fmt == "TIFF":
        try:
            with Image.open(io.BytesIO(data)) as im:
                return 33723 in getattr(im, "tag_v2", {})
        except Exception:  # noqa: BLE001 - a presence probe: unreadable means absent
            return False
    return False


def embedded_metadata(decoded: DecodedImage, data: bytes | None = None) -> EmbeddedMetadata:
    """What the file says about itself: EXIF/XMP/IPTC/C2PA presence and the fields that matter for provenance."""
    exif, meta = decoded.exif, decoded.metadata
    camera = " ".join(v for v in (exif.get("Make"), exif.get("Model")) if v) or None
    return EmbeddedMetadata(
        exif=bool(exif), xmp="xmp" in meta, iptc=_has_iptc(data, decoded.format) if data else False,
        c2pa="c2pa" in meta, digital_source_type=meta.get("xmp:DigitalSourceType"),
        creator_tool=meta.get("xmp:CreatorTool"), software=exif.get("Software"), camera=camera,
        date_taken=exif.get("DateTimeOriginal") or exif.get("DateTime"),
    )  # fmt: skip


def query_facts(decoded: DecodedImage, data: bytes | None = None) -> QueryFacts:
    return QueryFacts(
        sha256=decoded.sha256, format=decoded.format, width=decoded.width, height=decoded.height,
        num_bytes=decoded.num_bytes, mode=decoded.mode, frames=decoded.n_frames,
        embedded=embedded_metadata(decoded, data), exif=dict(decoded.exif), metadata=dict(decoded.metadata),
    )  # fmt: skip


def query_thumbnail_path(settings: Settings, sha256: str) -> Path:
    return settings.data_dir / "queries" / "thumbs" / sha256[:2] / f"{sha256}.jpg"


def save_query_thumbnail(settings: Settings, decoded: DecodedImage) -> Path:
    """A small JPEG of the query for its report page (content-addressed, written once)."""
    path = query_thumbnail_path(settings, decoded.sha256)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        im = decoded.image.copy()
        im.thumbnail((QUERY_THUMB_PX, QUERY_THUMB_PX))
        tmp = path.with_suffix(".tmp")
        im.save(tmp, "JPEG", quality=85)
        tmp.replace(path)
    return path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the checkout the code runs from, else the installed package version."""
    if (_REPO / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"], cwd=_REPO, capture_output=True,
                text=True, timeout=5, check=True,
            )  # fmt: skip
            return f"git {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"sleuth {importlib.metadata.version('sleuth')}"
    except importlib.metadata.PackageNotFoundError:
        return "sleuth (unknown version)"


# --- building --------------------------------------------------------------------------------------------
def _earliest(sightings: list[SightingOut]) -> str | None:
    dates = sorted(s.first_seen for s in sightings if s.first_seen)
    return dates[0] if dates else None


def _hit(raw: Mapping[str, Any], rank: int) -> HitOut:
    sightings = [SightingOut(**s) for s in raw.get("sightings") or [] if isinstance(s, Mapping)]
    fields = {k: v for k, v in raw.items() if k not in ("sightings", "rank")}
    fields["match_class"] = str(raw.get("match_class") or "similar")
    return HitOut(**fields, rank=rank, sightings=sightings, first_seen=_earliest(sightings))


def _projections(raw: Any) -> list[ProjectionOut]:
    if isinstance(raw, Mapping):
        raw = raw.get("generators", [raw]) if "generators" in raw else [raw]
    return [ProjectionOut(**p) for p in raw or [] if isinstance(p, Mapping)]


def _face(raw: Mapping[str, Any], index: int) -> FaceOut:
    fields = {k: v for k, v in raw.items() if k not in ("projection", "projections", "index")}
    projections = _projections(raw.get("projection", raw.get("projections")))
    return FaceOut(**fields, index=index, projections=projections)


def _where(hit: HitOut) -> str:
    """Where a hit was first seen, in words."""
    firsts = sorted(hit.sightings, key=lambda s: s.first_seen or "9999")
    if not firsts:
        return ""
    s = firsts[0]
    place = s.page_url or s.url or (f"{s.source_key} in {s.collection}" if s.source_key else s.collection)
    when = f" first seen {s.first_seen[:10]}" if s.first_seen else ""
    return f"{when} at {place}" if place else when


def _known(hit: HitOut) -> str:
    if hit.label == "generated":
        return "a known generated image" + (f" ({hit.generator})" if hit.generator else "")
    if hit.label and hit.label != "unknown":
        return f"a known {hit.label} image"
    return "a known image"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "?" if x is None else f"{x:.{digits}f}".rstrip("0").rstrip(".") if digits else str(x)


def _nearest_latent(p: ProjectionOut) -> str:
    if not p.latent_matches:
        return ""
    m = p.latent_matches[0]
    what = _latent_words(m)
    cosine = f" (cosine {_fmt(m['cosine'])})" if isinstance(m.get("cosine"), int | float) else ""
    return f"; the nearest stored latent is that of {what}{cosine}"


def _latent_words(m: Mapping[str, Any]) -> str:
    """A stored latent named by its image, else by its seed."""
    return f"image {m['image_id']}" if m.get("image_id") is not None else f"seed {m.get('seed')}"


def _stored_reason(n: int, gen: str, p: ProjectionOut, m: Mapping[str, Any]) -> str:
    """A face that a stored latent of a known generated image reproduces (``Evidence.reproducing_match``)."""
    what = _latent_words(m)
    prob = (
        "" if p.probability_generated is None else f"; p(generated by it)={_fmt(p.probability_generated, 2)}"
    )
    return (f"Face {n} is reproduced by the stored latent of {what}, a known generated image of {gen}: LPIPS "
            f"{_fmt(m.get('image_lpips'))} at the query's resolution, as close as its own reprojection "
            f"(LPIPS {_fmt(p.lpips)}){prob}.")  # fmt: skip


def _generator_words(p: ProjectionOut) -> str:
    """The generator as the evidence may name it: its registered name and what it is (a distilled student says
    whose student it is; a probability is about this generator only, never about the one it was distilled from)."""
    gen = p.generator or "a generator"
    extra = p.model_extra or {}
    description = str(extra.get("description") or "").split(";")[0].strip()
    return f"{gen} ({description})" if description else gen


def _calibration_words(p: ProjectionOut) -> str:
    sizes = (p.model_extra or {}).get("calibration_sizes") or {}
    if sizes.get("n_generated") and sizes.get("n_real"):
        from projection.calibration import sample_sizes_words

        return f", calibrated on {sample_sizes_words(sizes)}"
    return ""


def _face_reasons(faces: list[FaceOut]) -> tuple[list[str], list[str]]:
    """(faces that reproject into a generator, the other projection results), as sentences."""
    strong, other = [], []
    for face in faces:
        for p in face.projections:
            if p.lpips is None and p.probability_generated is None:
                continue
            gen, n = _generator_words(p), face.index + 1
            stored = (p.model_extra or {}).get("reproduced_by_stored_latent")
            if isinstance(stored, Mapping):
                strong.append(_stored_reason(n, gen, p, stored))
                continue
            if p.probability_generated is None:  # not calibrated, or out of its range: the distance, no call
                note = (p.model_extra or {}).get("probability_note") or "the generator is not calibrated"
                other.append(f"Face {n} projects into {gen} with LPIPS {_fmt(p.lpips)} "
                             f"({note}, so no p(generated)){_nearest_latent(p)}.")  # fmt: skip
                continue
            extra = p.model_extra or {}
            judged = {
                "mse": f"pixel MSE {_fmt(extra.get('mse'), 4)} (a face under 64 px is judged by it), ",
                "lpips+mse": f"pixel MSE {_fmt(extra.get('mse'), 4)}, ",
            }.get(str(extra.get("metric")), "")
            both = (
                " (the lower of its LPIPS and pixel-MSE maps)" if extra.get("metric") == "lpips+mse" else ""
            )
            stats = (f"{judged}LPIPS {_fmt(p.lpips)}, p(generated by it)={_fmt(p.probability_generated, 2)}{both}"
                     f"{_calibration_words(p)}")  # fmt: skip
            if p.probability_generated >= GENERATED_P:
                strong.append(f"Face {n} reprojects into {gen} with {stats}{_nearest_latent(p)}.")
            else:
                other.append(f"Face {n} does not reproject well into {gen} ({stats}).")
    return strong, other


def _detector_reason(detector: DetectorOut | None) -> str | None:
    """The detector's finding in words that claim no more than it measured (``search.detector.verdict_words``)."""
    if detector is None:
        return None
    from search.detector import verdict_words

    return verdict_words(detector.model_dump())


def decide(
    hits: dict[str, list[HitOut]], faces: list[FaceOut], detector: DetectorOut | None = None
) -> Verdict:
    """The verdict: rules over the evidence, strongest first; every rule that fires adds a reason. The detector's
    call is a reason of its own, after the copy and projection evidence, and never changes the verdict's kind."""
    copies: list[tuple[str, str]] = []  # (kind, sentence)
    for cls, words in (("exact", "Exact copy of"), ("near_duplicate", "Near-duplicate of")):
        for hit in hits.get(cls, [])[:3]:
            kind = "copy_of_generated" if hit.label == "generated" else "copy_of_known"
            extra = f" (image {hit.image_id}, {len(hit.sightings)} sighting(s))"
            copies.append((kind, f"{words} {_known(hit)}{_where(hit)}{extra}."))
    copies.sort(key=lambda c: c[0] != "copy_of_generated")  # a known generated source is the stronger finding
    reprojects, other_faces = _face_reasons(faces)
    same_person = _same_person_reasons(hits.get("same_person", []))
    similar_reason = _similar_reason(hits.get("similar", []))
    reasons = [c[1] for c in copies] + reprojects + same_person + similar_reason + other_faces
    if copies:
        kind, summary = copies[0]
    elif reprojects:
        kind, summary = "reprojects_into_generator", reprojects[0]
    elif same_person:
        kind, summary = "same_person", same_person[0]
    elif similar_reason:
        kind, summary = "similar_only", "No copy found in the index. " + similar_reason[0]
    else:
        kind = "no_match"
        summary = " ".join(["No match: nothing in the index resembles this image.", *other_faces[:1]])
    detected = _detector_reason(detector)
    if detected and kind in ("no_match", "similar_only"):
        summary = (
            f"{summary} {detected}" if kind == "similar_only" else f"No copy found in the index. {detected}"
        )
    if not reasons and detected:
        reasons = ["No exact, near-duplicate or similar image was found in the index."]
    if detected:
        reasons.append(detected)
    if not reasons:
        reasons = ["No exact, near-duplicate or similar image was found in the index."]
    return Verdict(kind=kind, summary=summary, reasons=reasons)  # type: ignore[arg-type]


# --- issue 12: same-person and similar evidence, named by the score that decided it ----------------------
def _same_person_reasons(hits: list[HitOut]) -> list[str]:
    """One sentence per same-person hit (a face identity model's call), closest first, at most three."""
    out = []
    for hit in sorted(hits, key=lambda h: h.scores.get("face_distance", 9.0))[:3]:
        out.append(f"A face in it is the same person as a face of {_known(hit)}{_where(hit)} (image {hit.image_id}, "
                   f"face identity distance {_fmt(hit.scores.get('face_distance'))}).")  # fmt: skip
    return out


def _similar_reason(similar: list[HitOut]) -> list[str]:
    """The similar hits in one sentence: the closest by CLIP cosine (a look-alike, not a copy), or by the
    face-crop cosine when only faces look alike."""
    if not similar:
        return []
    by_clip = [h for h in similar if isinstance(h.scores.get("clip_similarity"), int | float)]
    if by_clip:
        best = max(by_clip, key=lambda h: h.scores["clip_similarity"])
        score = f"CLIP cosine {_fmt(best.scores['clip_similarity'])}"
    else:
        best = max(similar, key=lambda h: h.scores.get("face_similarity", h.score or 0.0))
        score = (
            f"face-crop cosine {_fmt(best.scores.get('face_similarity'))}: a similar face, not an identity"
        )
    return [
        f"{len(similar)} visually similar image(s); the closest is image {best.image_id} ({score}){_where(best)}."
    ]


def build_report(
    result: Mapping[str, Any], *, report_id: str, created_at: str | None = None, query: QueryFacts | None = None,
    status: str = "done", refine_job: str | None = None, searcher: str | None = None,
    extra_timings_ms: Mapping[str, float] | None = None,
) -> ProvenanceReport:  # fmt: skip
    """The report of one search result document (``search.query.result_to_json``, maybe refined)."""
    raw_hits = [h for h in result.get("hits") or [] if isinstance(h, Mapping)]
    hits: dict[str, list[HitOut]] = {cls: [] for cls in MATCH_CLASSES}
    for rank, raw in enumerate(raw_hits, start=1):
        hit = _hit(raw, rank)
        hits.setdefault(hit.match_class, []).append(hit)
    faces = [_face(f, i) for i, f in enumerate(result.get("faces") or []) if isinstance(f, Mapping)]
    if query is None:
        q = dict(result.get("query") or {})
        query = QueryFacts(**{k: q.get(k) for k in ("sha256", "format", "width", "height", "num_bytes")})
    hashes = result.get("hashes") or (result.get("query") or {}).get("hashes") or {}
    query = query.model_copy(update={"hashes": dict(hashes)})
    timings = {k: float(v) for k, v in (result.get("timings_ms") or {}).items() if isinstance(v, int | float)}
    timings.update(extra_timings_ms or {})
    refine = result.get("refine") if isinstance(result.get("refine"), Mapping) else None
    raw_detector = result.get("detector")
    detector = DetectorOut(**raw_detector) if isinstance(raw_detector, Mapping) else None
    return ProvenanceReport(
        report_id=report_id, created_at=created_at or dt.datetime.now(dt.UTC).isoformat(),
        status=status,  # type: ignore[arg-type]
        query=query, verdict=decide(hits, faces, detector), hits=hits, faces=faces, refine=refine,
        refine_job=refine_job, detector=detector,
        reproducibility=Reproducibility(
            code_version=code_version(), searcher=searcher, tiers=list(result.get("tiers") or []),
            skipped_tiers=dict(result.get("skipped_tiers") or {}), models=dict(result.get("models") or {}),
            index_builds=dict(result.get("index_builds") or {}), thresholds=dict(result.get("thresholds") or {}),
            timings_ms=timings,
        ),
    )  # fmt: skip


# --- HTML ------------------------------------------------------------------------------------------------
def _data_uri(path: Path, mime: str = "image/jpeg") -> str | None:
    try:
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def _evidence_uri(value: str | None, settings: Settings) -> str | None:
    """A projection image as a data: URI: kept if it is one, read if it is a file inside the data directory."""
    if not value:
        return None
    if value.startswith("data:image/"):
        return value
    path = Path(value)
    path = path if path.is_absolute() else settings.data_dir / path
    try:
        inside = path.resolve().is_relative_to(settings.data_dir.resolve())
    except OSError:
        return None
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return _data_uri(path, mime) if inside else None


def render_html(report: ProvenanceReport, *, settings: Settings) -> str:
    """One self-contained page: styles inline, the query and evidence images as data: URIs, no scripts."""
    thumbs: dict[int, str | None] = {}
    for hit in report.all_hits()[:MAX_INLINE_IMAGES]:
        if hit.sha256:
            thumbs[hit.image_id] = _data_uri(thumbnail_path(settings, hit.sha256))
    evidence = {
        (face.index, i, what): _evidence_uri(getattr(p, what), settings)
        for face in report.faces
        for i, p in enumerate(face.projections)
        for what in ("target", "reconstruction", "difference")
    }
    query_thumb = _data_uri(query_thumbnail_path(settings, report.query.sha256))
    return _env.get_template("report.html").render(
        r=report, thumbs=thumbs, evidence=evidence, labels={c: c.replace("_", " ") for c in MATCH_CLASSES},
        query_thumb=query_thumb, **_workflow_context(report, thumbs, query_thumb),
    )  # fmt: skip


# --- issue 12: evidence in words and the compare view of verified hits ----------------------------------
def _workflow_context(
    report: ProvenanceReport, thumbs: dict[int, str | None], query_thumb: str | None
) -> dict[str, Any]:
    """What the page adds to each hit: ``why`` (search.explain) and ``compare`` views (search.compare)."""
    from search.compare import compare_views
    from search.explain import why

    hits = report.all_hits()
    thresholds = report.reproducibility.thresholds
    return {
        "why": {h.image_id: why(h.model_dump(), thresholds) for h in hits},
        "compare": compare_views(
            hits, query_size=(report.query.width, report.query.height), query_uri=query_thumb, thumbs=thumbs
        ),
    }
