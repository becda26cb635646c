"""The optional fields of a search request (``POST /v1/searches`` form, ``POST /v1/text-searches`` body):
filters over the hits, their order, and the region of the upload to search."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Form
from pydantic import BaseModel, Field

from search.hit_filters import HitFilter
from search.region import Region

LabelIn = Literal["generated", "stock", "real", "unknown"]
SortIn = Literal["relevance", "first_seen"]


class HitFilterFields(BaseModel):
    """The filters and order of a query's hits (``search.hit_filters.HitFilter``)."""

    collection: str | None = Field(None, max_length=200, description="only hits seen in this collection")
    label: LabelIn | None = Field(None, description="only hits with this label")
    first_seen_from: str | None = Field(
        None, max_length=40, description="only hits first seen on or after (ISO date)"
    )
    first_seen_to: str | None = Field(
        None, max_length=40, description="only hits first seen on or before (ISO date)"
    )
    sort: SortIn = Field("relevance", description="relevance (best first) or first_seen (oldest first)")

    def filters(self) -> HitFilter | None:
        """The hit filter these fields ask for (None when they ask for none)."""
        if not (
            self.collection
            or self.label
            or self.first_seen_from
            or self.first_seen_to
            or self.sort != "relevance"
        ):
            return None
        return HitFilter(
            collection=self.collection or None, label=self.label, first_seen_from=self.first_seen_from or None,
            first_seen_to=self.first_seen_to or None, sort=self.sort,
        )  # fmt: skip


class SearchForm(HitFilterFields):
    """The optional fields of an image search: the filters and the region of the upload to search."""

    region: str | None = Field(
        None, max_length=80, description="search only x,y,width,height of the upload (pixels)"
    )

    def region_box(self) -> Region | None:
        return Region.parse(self.region) if self.region else None


def search_form(
    collection: Annotated[
        str | None, Form(max_length=200, description="only hits seen in this collection")
    ] = None,
    label: Annotated[LabelIn | None, Form(description="only hits with this label")] = None,
    first_seen_from: Annotated[
        str | None, Form(max_length=40, description="first seen on or after (ISO date)")
    ] = None,
    first_seen_to: Annotated[
        str | None, Form(max_length=40, description="first seen on or before (ISO date)")
    ] = None,
    sort: Annotated[
        SortIn, Form(description="relevance (best first) or first_seen (oldest first)")
    ] = "relevance",
    region: Annotated[
        str | None, Form(max_length=80, description="search only x,y,width,height of the upload")
    ] = None,
) -> SearchForm:
    """The search form's optional fields (a FastAPI dependency)."""
    return SearchForm(collection=collection, label=label, first_seen_from=first_seen_from,
                      first_seen_to=first_seen_to, sort=sort, region=region)  # fmt: skip
