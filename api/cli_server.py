"""``sleuth serve``, ``sleuth worker`` and ``sleuth keys create | list | revoke | audit-export``."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from api import commands
from api.cli_options import DataDirOpt, JsonOpt, err, handles_errors, out, print_json, settings_for
from indexer.store.api_models import SCOPES

keys_app: typer.Typer = typer.Typer(no_args_is_help=True, help="API keys (stored hashed) and the audit log.")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@handles_errors
def serve(
    host: Annotated[
        str | None, typer.Option(help="address to bind (default SLEUTH_API_HOST, 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (default SLEUTH_API_PORT, 8000)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    data_dir: DataDirOpt = None,
) -> None:
    """Run the API and web page (models and indexes load once; refuses default secrets outside development)."""
    _configure_logging(log_level)
    commands.serve(host=host, port=port, settings=settings_for(data_dir), log_level=log_level)


@handles_errors
def worker(
    max_jobs: Annotated[int | None, typer.Option(help="stop after this many jobs")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run jobs from the Redis queue (SLEUTH_JOB_QUEUE=redis://...) until interrupted."""
    _configure_logging("info")
    ran = commands.worker(settings=settings_for(data_dir), max_jobs=max_jobs)
    err.print(f"worker stopped after {ran} job(s)")


@keys_app.command("create")
@handles_errors
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    scope: Annotated[list[str], typer.Option("--scope", help=f"repeatable: {', '.join(SCOPES)}")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a key; the token is printed once and only its SHA-256 is stored."""
    info, token = commands.keys_create(name, scope, settings=settings_for(data_dir))
    if as_json:
        print_json({"key": asdict(info), "token": token})
        return
    out.print(f"created key {info.prefix} ({info.name}) with scope(s) {', '.join(info.scopes)}")
    out.print("token (shown once, store it now):")
    print(token)


@keys_app.command("list")
@handles_errors
def keys_list(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Every key: prefix, name, scopes, dates (never tokens)."""
    keys = commands.keys_list(settings=settings_for(data_dir))
    if as_json:
        print_json({"keys": [asdict(k) for k in keys]})
        return
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        out.print(f"{k.prefix}  {k.name:<24} {','.join(k.scopes):<20} created {k.created_at}  {state}")
    if not keys:
        out.print("no keys yet: sleuth keys create NAME --scope search")


@keys_app.command("revoke")
@handles_errors
def keys_revoke(
    prefix_or_name: Annotated[str, typer.Argument(help="the key's prefix (or its name, if unique)")],
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke a key: it stops working at once."""
    info = commands.keys_revoke(prefix_or_name, settings=settings_for(data_dir))
    out.print(f"revoked key {info.prefix} ({info.name})")


@keys_app.command("audit-export")
@handles_errors
def audit_export(
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="write to this file instead of stdout")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The audit log: every search (key id, time, query SHA-256, report id) and key/ingest actions."""
    text = commands.audit_export(fmt, out=out_file, settings=settings_for(data_dir))
    if out_file is None:
        sys.stdout.write(text)
    else:
        err.print(f"wrote {len(text.splitlines())} line(s) to {out_file}")
