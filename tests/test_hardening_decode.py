"""Issue 10, defect 1 (decode side) and 6 (PNG text): large images are decoded at the size the pipeline needs,
ingest batches are bounded by decoded bytes, PNG text chunks are capped."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from indexer import ingest as ingest_module
from indexer.decode import decode_image
from indexer.ingest import ingest
from indexer.settings import Limits, Settings
from search.region import Region, crop_to_region
from tests.synthetic_images import synthetic_photo


def _big_jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    synthetic_photo(3, (256, 192)).resize(size, Image.Resampling.NEAREST).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_the_working_size_with_its_original_dimensions_kept() -> None:
    data = _big_jpeg((4400, 3000))
    decoded = decode_image(data, limits=Limits(working_side=1024))
    assert max(decoded.image.size) <= 1024, decoded.image.size  # not 13 Mpx of RGB
    assert max(decoded.image.size) >= 512  # JPEG draft (1/2, 1/4, 1/8) then an exact reduce, never below
    assert (decoded.width, decoded.height) == (4400, 3000)  # the original's dimensions are what is recorded
    assert decoded.scale == pytest.approx(max(decoded.image.size) / 4400, rel=1e-3)


def test_a_large_png_is_reduced_to_the_working_size_too() -> None:
    buf = io.BytesIO()
    synthetic_photo(4, (256, 192)).resize((3000, 2000)).save(buf, "PNG", compress_level=1)
    decoded = decode_image(buf.getvalue(), limits=Limits(working_side=1000))
    assert max(decoded.image.size) == 1000 and (decoded.width, decoded.height) == (3000, 2000)


def test_small_images_are_untouched_by_the_working_size() -> None:
    buf = io.BytesIO()
    synthetic_photo(5, (300, 200)).save(buf, "JPEG", quality=90)
    decoded = decode_image(buf.getvalue(), limits=Limits(working_side=1024))
    assert decoded.image.size == (300, 200) and decoded.scale == 1.0


def test_a_region_is_given_in_the_original_pixels_of_a_reduced_image() -> None:
    decoded = decode_image(_big_jpeg((4000, 2000)), limits=Limits(working_side=1000))
    region, _ = crop_to_region(decoded, Region(2000, 0, 2000, 2000), limits=Limits(working_side=1000))
    assert (region.width, region.height) == pytest.approx((500, 500), abs=2)  # the right half, at scale 1/4


def test_ingest_batches_are_bounded_by_decoded_bytes_not_only_by_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(6):
        synthetic_photo(i, (600, 600)).save(folder / f"{i}.png")  # 1.08 MB of RGB each once decoded
    sizes: list[int] = []
    original = ingest_module._Writer.write

    def spy(self: ingest_module._Writer, batch: list[ingest_module.Prepared]) -> None:
        sizes.append(len(batch))
        original(self, batch)

    monkeypatch.setattr(ingest_module._Writer, "write", spy)
    settings = Settings(
        data_dir=tmp_path / "data", batch_size=32, limits=Limits(ingest_batch_max_bytes=2_500_000)
    )
    summary = ingest(folder, collection="big", settings=settings)
    assert summary.new == 6
    assert max(sizes) <= 3 and sum(sizes) == 6, sizes  # 32 by count, but at most ~2.5 MB of pixels held


def test_png_text_chunks_are_capped_in_the_metadata() -> None:
    info = PngImagePlugin.PngInfo()
    for i in range(2000):
        info.add_text(f"k{i}", "x" * 200)
    buf = io.BytesIO()
    synthetic_photo(6, (64, 64)).save(buf, "PNG", pnginfo=info)
    decoded = decode_image(buf.getvalue())
    png_keys = [k for k in decoded.metadata if k.startswith("png:")]
    assert 0 < len(png_keys) <= 32, len(png_keys)
    assert sum(len(k) + len(v) for k, v in decoded.metadata.items()) <= 16_384
