"""``sleuth models pull [NAME...]``: model files from the catalog pinned by SHA-256, into the data directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from api.cli_options import DataDirOpt, JsonOpt, err, handles_errors, out, print_json, settings_for


class _Bars:
    """One download bar per file on stderr (hidden off a terminal)."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm[Any]] = {}

    def update(self, name: str, done: int, total: int | None) -> None:
        bar = self.bars.get(name)
        if bar is None:
            bar = self.bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True, disable=None)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@handles_errors
def pull(
    names: Annotated[
        list[str] | None, typer.Argument(help="catalog entries (default: every one not marked optional)")
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", dir_okay=False, help="another catalog file of the same shape")
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="list the catalog's entries and pull nothing")
    ] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download models (resumable, SHA-256 verified) into DATA_DIR/models; the settings then default to them."""
    from indexer.model_pull import load_catalog
    from indexer.model_pull import pull as run_pull

    settings = settings_for(data_dir)
    if list_only:
        entries = load_catalog(catalog)
        if as_json:
            print_json({"models": [{"name": e.name, "description": e.description, "setting": e.setting,
                                    "optional": e.optional, "files": [f.url for f in e.files]}
                                   for e in entries.values()]})  # fmt: skip
            return
        for e in entries.values():
            tag = " (optional)" if e.optional else ""
            out.print(f"{e.name:<16} {e.setting or '-':<14} {e.description}{tag}", highlight=False)
        return
    bars = _Bars()
    try:
        results = run_pull(
            list(names or []), data_dir=settings.data_dir, catalog=catalog, progress=bars.update
        )
    finally:
        bars.close()
    if as_json:
        print_json({"pulled": [r.to_json() for r in results]})
        return
    for r in results:
        fetched = sum(f["fetched"] for f in r.files)
        unpinned = [f["name"] for f in r.files if not f["pinned"]]
        line = f"{r.name}: {len(r.files)} file(s) verified ({fetched} downloaded) in {r.folder}"
        if r.setting:
            line += f"; {r.setting} now defaults to {r.value}"
        out.print(line, highlight=False)
        if unpinned:
            err.print(f"  {', '.join(unpinned)}: not pinned in the catalog; its SHA-256 is recorded now and checked "
                      "on every later pull")  # fmt: skip
