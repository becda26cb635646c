"""The ``/v1`` endpoints and the operational ones (``/healthz``, ``/readyz``, ``/metrics``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api import audit, services
from api.auth import require_admin, require_any, require_ingest, require_search
from api.keys import KeyInfo
from api.search_form import SearchForm, search_form
from api.state import AppState
from indexer.decode import header_pixels
from indexer.errors import ImageTooLargeError, NotFoundError
from indexer.names import InvalidNameError, clean_name
from search.report import ProvenanceReport, render_html

router = APIRouter()
SearchKey = Annotated[KeyInfo, Depends(require_search)]
IngestKey = Annotated[KeyInfo, Depends(require_ingest)]
AdminKey = Annotated[KeyInfo, Depends(require_admin)]
AnyKey = Annotated[KeyInfo, Depends(require_any)]
CHUNK = 1024 * 1024
RowId = Annotated[int, Path(ge=1, le=2**62, description="a database id")]
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)
PublicId = Annotated[str, Path(min_length=1, max_length=64, description="a job or report id (a UUID)")]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code")
    message: str = Field(description="what went wrong, for a person")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "bad input (e.g. a corrupt image)"), (401, "missing or invalid API key"),
        (403, "the key lacks the scope"), (404, "not found"), (413, "upload too large"),
        (415, "unsupported image format"), (429, "rate limited"),
    ]
}  # fmt: skip


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = None
    progress: dict[str, Any] | None = None
    attempts: int
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    url: str


class QueuedOut(BaseModel):
    job_id: str
    job_url: str
    report_id: str | None = None
    report_url: str | None = None
    status: str = "queued"


def _clean_collection(value: str) -> str:
    try:
        return clean_name(value)
    except InvalidNameError as exc:
        raise ValueError(str(exc)) from None  # a 422 naming the field


CollectionName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_clean_collection)]


class CollectionIn(BaseModel):
    name: CollectionName


class CollectionOut(BaseModel):
    id: int
    name: str
    images: int = 0
    created_at: str | None = None


class IngestIn(BaseModel):
    source: str = Field(
        min_length=1, max_length=4096, description="a folder, manifest or shard inside SLEUTH_INGEST_ROOTS"
    )
    collection: CollectionName
    label: Literal["generated", "stock", "real", "unknown"] | None = None
    generator: str | None = Field(None, max_length=200)


class UploadOut(BaseModel):
    image_id: int
    sha256: str
    collection: str
    new: bool
    already_in_collection: bool


def _state(request: Request) -> AppState:
    return request.app.state.sleuth  # type: ignore[no-any-return]


def _charge(state: AppState, key: KeyInfo, data: bytes) -> None:
    """An upload costs one rate-limit token per ``request_cost_pixels`` of its header's size (the key's
    dependency charged the first one): a 79 Mpx image is not charged like a thumbnail."""
    pixels = header_pixels(data) or 0
    cost = max(1, math.ceil(pixels / state.api_settings.request_cost_pixels))
    if cost > 1:
        state.limiter.hit(key.id, cost - 1)


async def _read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refused as soon as it passes ``max_bytes`` (the body guard caught most already)."""
    parts, total = [], 0
    while chunk := await file.read(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(f"the upload is over the limit upload_max_bytes={max_bytes}")
        parts.append(chunk)
    return b"".join(parts)


def _job_out(view: Any) -> JobOut:
    fields = {k: v for k, v in dataclasses.asdict(view).items() if k in JobOut.model_fields}
    return JobOut(**fields, url=f"/v1/jobs/{view.id}")


def _check_owner(key: KeyInfo, owner_key_id: int | None, what: str) -> None:
    if "admin" not in key.scopes and owner_key_id != key.id:
        raise NotFoundError(f"no {what} with this id for this API key")


# --- search -------------------------------------------------------------------------------------------
@router.post(
    "/v1/searches", tags=["search"],
    responses={**ERRORS, 200: {"model": ProvenanceReport, "description": "the provenance report"},
               202: {"model": QueuedOut, "description": "refine queued"}},
    summary="Search an image (copy and similarity tiers at once; refine=true queues projection)",
)  # fmt: skip
async def create_search(
    request: Request, key: SearchKey,
    file: Annotated[UploadFile, File(description="the query image (any supported format; content is sniffed)")],
    refine: Annotated[bool, Form(description="also project faces into known generators (a job)")] = False,
    search_form: Annotated[SearchForm, Depends(search_form)] = None,  # type: ignore[assignment]
) -> JSONResponse:  # fmt: skip
    state = _state(request)
    data = await _read_upload(file, state.settings.limits.upload_max_bytes)
    _charge(state, key, data)
    filters, region = search_form.filters(), search_form.region_box()
    async with state.work_slots.take():  # decode and search: a bounded number at once (503 when full)
        report = await run_in_threadpool(
            services.run_search,
            state.engine,
            data,
            key_id=key.id,
            refine=refine,
            filters=filters,
            region=region,
        )
    state.metrics.searches.labels(str(refine).lower()).inc()
    links = {
        "report_url": f"/v1/reports/{report.report_id}",
        "report_html_url": f"/v1/reports/{report.report_id}?format=html",
    }
    if not refine:
        return JSONResponse(report.model_dump(mode="json") | links, headers={"Location": links["report_url"]})
    params: dict[str, object] = {"report_id": report.report_id, "query_sha256": report.query.sha256}
    job_id = await run_in_threadpool(state.queue.submit, "refine", params, key_id=key.id)
    await run_in_threadpool(services.attach_job, state.engine, report.report_id, job_id)
    report.refine_job = job_id
    body = QueuedOut(
        job_id=job_id,
        job_url=f"/v1/jobs/{job_id}",
        report_id=report.report_id,
        report_url=links["report_url"],
    )
    return JSONResponse(
        body.model_dump() | {"report": report.model_dump(mode="json")},
        status_code=202,
        headers={"Location": body.job_url},
    )


@router.get(
    "/v1/jobs/{job_id}", tags=["search"], response_model=JobOut, responses=ERRORS, summary="A job's state"
)
async def get_job(request: Request, job_id: PublicId, key: AnyKey) -> JobOut:
    view = await run_in_threadpool(_state(request).queue.jobs.get, job_id)
    _check_owner(key, view.key_id, "job")
    return _job_out(view)


@router.get(
    "/v1/reports/{report_id}", tags=["search"],
    responses={**ERRORS, 200: {"model": ProvenanceReport, "content": {"text/html": {}}}},
    summary="A provenance report: JSON, or HTML when Accept prefers text/html (or ?format=html)",
)  # fmt: skip
async def get_report(
    request: Request, report_id: PublicId, key: SearchKey,
    format: Annotated[Literal["json", "html"] | None, Query(description="overrides the Accept header")] = None,
) -> Response:  # fmt: skip
    state = _state(request)
    owner = await run_in_threadpool(_report_owner, state, report_id)
    _check_owner(key, owner, "report")
    report = await run_in_threadpool(services.get_report, state.engine, report_id)
    accept = request.headers.get("accept", "")
    wants_html = format == "html" or (format is None and _prefers_html(accept))
    if wants_html:
        page = await run_in_threadpool(render_html, report, settings=state.settings)
        return HTMLResponse(page, headers={"Content-Security-Policy": REPORT_CSP})
    return JSONResponse(report.model_dump(mode="json"))


def _prefers_html(accept: str) -> bool:
    html = "text/html" in accept
    json_first = accept.find("application/json")
    return html and (json_first < 0 or accept.find("text/html") < json_first)


def _report_owner(state: AppState, report_id: str) -> int | None:
    from indexer.store.api_models import Report

    with state.engine.store.session() as s:
        row = s.get(Report, report_id)
        if row is None:
            raise NotFoundError(f"no report {report_id}")
        return row.key_id


# --- collections and ingest ----------------------------------------------------------------------------
@router.get("/v1/collections", tags=["index"], response_model=list[CollectionOut], responses=ERRORS)
async def list_collections(request: Request, key: SearchKey) -> list[dict[str, object]]:
    return await run_in_threadpool(services.list_collections, _state(request).engine)


@router.post(
    "/v1/collections", tags=["index"], status_code=201, response_model=CollectionOut, responses=ERRORS
)
async def create_collection(request: Request, body: CollectionIn, key: IngestKey) -> dict[str, object]:
    return await run_in_threadpool(
        services.create_collection, _state(request).engine, body.name, key_id=key.id
    )


@router.post(
    "/v1/collections/{collection_id}/images", tags=["index"], status_code=201, response_model=UploadOut,
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "an ingest holds the index"}},
    summary="Upload an image into a collection (indexed at once; searches see it)",
)  # fmt: skip
async def upload_image(
    request: Request, collection_id: RowId, key: IngestKey,
    file: Annotated[UploadFile, File(description="the image to index")],
    label: Annotated[Literal["generated", "stock", "real", "unknown"] | None, Form()] = None,
    first_seen: Annotated[str | None, Form(max_length=40, description="ISO 8601 date")] = None,
    page_url: Annotated[str | None, Form(max_length=4096, description="recorded, never fetched")] = None,
) -> dict[str, object]:  # fmt: skip
    state = _state(request)
    data = await _read_upload(file, state.settings.limits.upload_max_bytes)
    _charge(state, key, data)
    async with state.work_slots.take():
        return await run_in_threadpool(
            services.upload_into_collection, state.engine, collection_id, data, key_id=key.id,
            label=label, first_seen=first_seen, page_url=page_url,
        )  # fmt: skip


@router.post(
    "/v1/ingest-jobs", tags=["index"], status_code=202, response_model=QueuedOut, responses=ERRORS,
    summary="Ingest a server-side folder, manifest or shard (inside SLEUTH_INGEST_ROOTS) as a job",
)  # fmt: skip
async def create_ingest_job(request: Request, body: IngestIn, key: IngestKey) -> JSONResponse:
    state = _state(request)
    source = await run_in_threadpool(
        services.resolve_ingest_source, body.source, state.api_settings.ingest_roots
    )
    params: dict[str, object] = {
        "source": str(source),
        "collection": body.collection,
        "label": body.label,
        "generator": body.generator,
    }
    job_id = await run_in_threadpool(state.queue.submit, "ingest", params, key_id=key.id)
    await run_in_threadpool(
        audit.record, state.engine.store, "ingest_job", key_id=key.id, detail=params | {"job_id": job_id}
    )
    out = QueuedOut(job_id=job_id, job_url=f"/v1/jobs/{job_id}")
    return JSONResponse(out.model_dump(), status_code=202, headers={"Location": out.job_url})


# --- images -------------------------------------------------------------------------------------------
@router.get(
    "/v1/images/{image_id}", tags=["index"], responses=ERRORS, summary="An indexed image and its sightings"
)
async def get_image(request: Request, image_id: RowId, key: SearchKey) -> dict[str, object]:
    return await run_in_threadpool(services.get_image, _state(request).engine, image_id)


@router.get(
    "/v1/images/{image_id}/thumbnail", tags=["index"], response_class=FileResponse,
    responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
)  # fmt: skip
async def get_thumbnail(request: Request, image_id: RowId, key: SearchKey) -> FileResponse:
    path = await run_in_threadpool(services.image_thumbnail, _state(request).engine, image_id)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# --- admin --------------------------------------------------------------------------------------------
@router.get(
    "/v1/audit", tags=["admin"], responses={**ERRORS, 200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}},
    summary="Export the audit log (every search: key id, time, query SHA-256, report id)",
)  # fmt: skip
async def export_audit(
    request: Request, key: AdminKey, format: Annotated[Literal["csv", "jsonl"], Query()] = "jsonl"
) -> PlainTextResponse:
    text = await run_in_threadpool(audit.export, _state(request).engine.store, format)
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return PlainTextResponse(text, media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="sleuth-audit.{format}"'})  # fmt: skip


# --- operations -----------------------------------------------------------------------------------------
@router.get("/healthz", tags=["ops"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], summary="The store answers and the searcher is loaded",
            responses={503: {"model": ErrorBody}})  # fmt: skip
async def readyz(request: Request) -> JSONResponse:
    state: AppState | None = getattr(request.app.state, "sleuth", None)
    if state is None:
        return JSONResponse({"error": "not_ready", "message": "still starting"}, status_code=503)
    try:
        await run_in_threadpool(_ping, state)
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as not ready
        return JSONResponse({"error": "not_ready", "message": f"store unavailable: {exc}"}, status_code=503)
    return JSONResponse(
        {"status": "ready", "searcher": state.engine.searcher_kind, "queue": state.api_settings.job_queue}
    )


def _ping(state: AppState) -> None:
    from sqlalchemy import text

    with state.engine.store.session() as s:
        s.execute(text("SELECT 1"))


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=ERRORS,
            summary="Prometheus metrics (admin scope)")  # fmt: skip
async def metrics(request: Request, key: AdminKey) -> Response:
    state = _state(request)
    counts = await run_in_threadpool(_job_counts, state)
    for status in ("queued", "running", "done", "failed"):
        state.metrics.jobs.labels(status).set(counts.get(status, 0))
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _job_counts(state: AppState) -> dict[str, int]:
    from sqlalchemy import func, select

    from indexer.store.api_models import Job

    with state.engine.store.session() as s:
        return {
            str(k): int(v) for k, v in s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        }
