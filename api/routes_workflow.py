"""The investigator's ``/v1`` endpoints beside the core ones: past reports, a collection's images, text queries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api import browse
from api.auth import require_search
from api.keys import KeyInfo
from api.routes import ERRORS, PublicId, RowId
from api.search_form import HitFilterFields
from api.state import AppState

router = APIRouter()
SearchKey = Annotated[KeyInfo, Depends(require_search)]
Limit = Annotated[int, Query(ge=1, le=100, description="items per page")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="items to skip")]
DateQuery = Annotated[str | None, Query(max_length=40, description="ISO 8601 date")]
Thumbnails = Annotated[bool, Query(description="each item carries a small thumbnail as a data: URI")]


class Page(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int
    next: str | None = Field(None, description="the URL of the next page, None on the last")


class CollectionPage(Page):
    collection: dict[str, Any]


class TextSearchIn(HitFilterFields):
    text: str = Field(min_length=1, max_length=1000, description="what to look for, in words")
    k: int | None = Field(None, ge=1, le=100, description="hits (default SLEUTH_SEARCH_K)")


def _state(request: Request) -> AppState:
    return request.app.state.sleuth  # type: ignore[no-any-return]


@router.get("/v1/reports", tags=["search"], response_model=Page, responses=ERRORS,
            summary="Past searches, newest first: this key's reports (an admin key sees everyone's)")  # fmt: skip
async def list_reports(
    request: Request, key: SearchKey, limit: Limit = 20, offset: Offset = 0, thumbnails: Thumbnails = False
) -> dict[str, Any]:
    return await run_in_threadpool(
        browse.list_reports, _state(request).engine, key, limit=limit, offset=offset, thumbnails=thumbnails
    )


@router.get(
    "/v1/reports/{report_id}/query-thumbnail", tags=["search"], response_class=FileResponse,
    responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}}, summary="The small JPEG of a report's query",
)  # fmt: skip
async def report_query_thumbnail(request: Request, report_id: PublicId, key: SearchKey) -> FileResponse:
    path = await run_in_threadpool(browse.report_query_thumbnail, _state(request).engine, key, report_id)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/v1/collections/{collection_id}/images", tags=["index"], response_model=CollectionPage, responses=ERRORS,
    summary="A collection's images, one per image with its earliest sighting there; filtered and paged",
)  # fmt: skip
async def collection_images(
    request: Request, collection_id: RowId, key: SearchKey, limit: Limit = 48, offset: Offset = 0,
    label: Annotated[Literal["generated", "stock", "real", "unknown"] | None, Query()] = None,
    generator: Annotated[str | None, Query(max_length=200)] = None,
    first_seen_from: DateQuery = None, first_seen_to: DateQuery = None,
    sort: Annotated[Literal["ingested", "first_seen"], Query(description="ingest order or oldest first")] = "ingested",
    thumbnails: Thumbnails = False,
) -> dict[str, Any]:  # fmt: skip
    return await run_in_threadpool(
        browse.collection_images, _state(request).engine, collection_id, limit=limit, offset=offset, label=label,
        generator=generator, first_seen_from=first_seen_from, first_seen_to=first_seen_to, sort=sort,
        thumbnails=thumbnails,
    )  # fmt: skip


@router.post("/v1/text-searches", tags=["search"], responses=ERRORS,
             summary="Search the images by a text description (CLIP text tower; needs a model that has one)")  # fmt: skip
async def text_search(request: Request, body: TextSearchIn, key: SearchKey) -> dict[str, Any]:
    state = _state(request)
    return await run_in_threadpool(
        browse.text_search, state.engine, body.text, key_id=key.id, k=body.k, filters=body.filters()
    )
