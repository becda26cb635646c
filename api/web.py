"""The web page: enter an API key, upload an image, watch the job, read the report (no framework, no cookies)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

router = APIRouter(include_in_schema=False)
_env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape()
)


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The page shell holds no data: everything it shows comes from /v1 with the key the person enters."""
    return HTMLResponse(
        _env.get_template("index.html").render(),
        headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "frame-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
