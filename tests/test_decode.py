"""The one decode path: limits, typed errors, EXIF transpose, every mode to RGB, metadata, and fuzzing."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile, ImageOps, PngImagePlugin

from indexer import errors
from indexer.decode import DecodedImage, decode_file, decode_image, sniff_format, to_rgb
from indexer.errors import (
    CorruptImageError,
    DecodeError,
    DecompressionBombError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from indexer.settings import Limits
from tests.image_zoo import (
    EXPECTED,
    GOOD_SIZE,
    animated_gif_bytes,
    build_zoo,
    jpeg_bytes,
    palette_alpha,
    png_bytes,
    sixteen_bit_gradient,
    textured_rgb,
)

LIMITS = Limits()
FUZZ_EXIF = settings(max_examples=300, deadline=None)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def pixel(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = decoded.image.getpixel(xy)
    assert isinstance(value, tuple)
    return (int(value[0]), int(value[1]), int(value[2]))


# --- the zoo --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_zoo_file_has_its_expected_outcome(zoo: dict[str, Path], name: str) -> None:
    expected = EXPECTED[name]
    if expected == "ok":
        decoded = decode_file(zoo[name], limits=LIMITS)
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == (decoded.width, decoded.height)
        decoded.image.getpixel((0, 0))  # fully loaded: pixels are readable
    else:
        with pytest.raises(getattr(errors, expected)) as caught:
            decode_file(zoo[name], limits=LIMITS)
        assert isinstance(caught.value, DecodeError)
        assert str(caught.value)


def test_good_jpeg_records_sha256_of_original_bytes_and_its_facts(zoo: dict[str, Path]) -> None:
    data = zoo["good.jpg"].read_bytes()
    decoded = decode_image(data, limits=LIMITS)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    assert (decoded.format, decoded.mode, decoded.n_frames) == ("JPEG", "RGB", 1)
    assert (decoded.width, decoded.height) == GOOD_SIZE
    assert decoded.num_bytes == len(data)
    original = np.asarray(textured_rgb(*GOOD_SIZE, seed=1), dtype=np.float64)
    assert np.abs(np.asarray(decoded.image, dtype=np.float64) - original).mean() < 12


def test_decode_file_and_decode_image_agree(zoo: dict[str, Path]) -> None:
    from_file = decode_file(str(zoo["good.png"]), limits=LIMITS)
    from_bytes = decode_image(zoo["good.png"].read_bytes(), limits=LIMITS)
    assert from_file.sha256 == from_bytes.sha256
    assert np.array_equal(np.asarray(from_file.image), np.asarray(from_bytes.image))


def test_png_is_lossless_through_decode(zoo: dict[str, Path]) -> None:
    decoded = decode_file(zoo["good.png"], limits=LIMITS)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(textured_rgb(*GOOD_SIZE, seed=2)))


# --- size and bomb limits -------------------------------------------------------------------------
def test_empty_bytes_raise_empty_image_error() -> None:
    with pytest.raises(EmptyImageError, match="0 bytes"):
        decode_image(b"", limits=LIMITS)


def test_image_over_byte_cap_is_refused_with_the_limit_in_the_message(zoo: dict[str, Path]) -> None:
    data = zoo["good.jpg"].read_bytes()
    with pytest.raises(ImageTooLargeError, match=f"{len(data)} bytes.*max_bytes=100"):
        decode_image(data, limits=Limits(max_bytes=100))


def test_decode_file_checks_file_size_before_reading_it(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened although it is over the byte cap")

    monkeypatch.setattr(Path, "open", no_reading)
    monkeypatch.setattr(Path, "read_bytes", no_reading)
    with pytest.raises(ImageTooLargeError, match="max_bytes=100"):
        decode_file(zoo["good.jpg"], limits=Limits(max_bytes=100))


def test_decompression_bomb_is_refused_before_decoding_pixels(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pixels(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded for a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_pixels, raising=False)
    assert zoo["bomb.png"].stat().st_size < 100_000  # tiny file ...
    with pytest.raises(DecompressionBombError):  # ... refused by Pillow's guard and ours alike
        decode_file(zoo["bomb.png"], limits=LIMITS)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our guard alone, without Pillow's global one
    with pytest.raises(
        DecompressionBombError, match="20000x20000 = 400000000 pixels, over max_pixels=80000000"
    ):
        decode_file(zoo["bomb.png"], limits=LIMITS)


def test_configured_pixel_and_side_limits_are_enforced(zoo: dict[str, Path]) -> None:
    data = zoo["good.png"].read_bytes()
    with pytest.raises(DecompressionBombError, match="3072 pixels, over max_pixels=1000"):
        decode_image(data, limits=Limits(max_pixels=1000))
    with pytest.raises(DecompressionBombError, match="side 64 is over max_side=50"):
        decode_image(data, limits=Limits(max_side=50))


def test_pillow_decompression_bomb_warning_becomes_our_error(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # good.png (3072 px) is past Pillow's warning level
    data = zoo["good.png"].read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecompressionBombError, match="decompression"):
            decode_image(data, limits=LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DecompressionBombError, match="over PIL.Image.MAX_IMAGE_PIXELS=2000"):
            decode_image(data, limits=LIMITS)


def test_pillow_decompression_bomb_error_becomes_our_error(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 px is past twice Pillow's level: its error
    with pytest.raises(DecompressionBombError, match="Pillow"):
        decode_image(zoo["good.png"].read_bytes(), limits=LIMITS)


# --- corrupt, truncated, unsupported --------------------------------------------------------------
def test_truncated_jpeg_is_an_error_not_a_grey_image(zoo: dict[str, Path]) -> None:
    with pytest.raises(CorruptImageError, match="truncated"):
        decode_file(zoo["truncated.jpg"], limits=LIMITS)


def test_truncated_jpeg_stays_an_error_when_someone_enabled_load_truncated_images(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CorruptImageError):
        decode_file(zoo["truncated.jpg"], limits=LIMITS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_random_bytes_behind_a_jpeg_header_are_corrupt_not_unsupported(zoo: dict[str, Path]) -> None:
    with pytest.raises(CorruptImageError):
        decode_file(zoo["corrupt.jpg"], limits=LIMITS)


def test_text_file_is_unsupported_format(zoo: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedFormatError, match="not a recognised image format"):
        decode_file(zoo["text.txt"], limits=LIMITS)


def test_format_outside_the_allow_list_is_refused(zoo: dict[str, Path]) -> None:
    png_only = Limits(formats=("PNG",))
    with pytest.raises(UnsupportedFormatError, match="JPEG is not in the allowed formats PNG"):
        decode_file(zoo["good.jpg"], limits=png_only)
    buffer = io.BytesIO()
    textured_rgb(16, 16).save(buffer, "TIFF")
    with pytest.raises(UnsupportedFormatError, match="TIFF"):
        decode_image(buffer.getvalue(), limits=png_only)
    assert decode_file(zoo["good.png"], limits=png_only).format == "PNG"


def test_format_pillow_knows_but_sleuth_does_not_allow_is_unsupported() -> None:
    buffer = io.BytesIO()
    textured_rgb(16, 16).save(buffer, "PPM")
    with pytest.raises(UnsupportedFormatError):
        decode_image(buffer.getvalue(), limits=LIMITS)


def test_unknown_format_names_in_the_allow_list_are_ignored_not_fatal(zoo: dict[str, Path]) -> None:
    data = zoo["good.png"].read_bytes()
    assert decode_image(data, limits=Limits(formats=("PNG", "NOPE"))).format == "PNG"
    with pytest.raises(UnsupportedFormatError, match="PNG is not in the allowed formats NOPE"):
        decode_image(data, limits=Limits(formats=("NOPE",)))


def test_mpo_allowed_alone_still_refuses_plain_jpeg(zoo: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedFormatError, match="JPEG is not in the allowed formats MPO"):
        decode_file(zoo["good.jpg"], limits=Limits(formats=("MPO",)))


def test_heic_decodes_through_pillow_heif() -> None:
    pytest.importorskip("pillow_heif")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, "HEIF", quality=90)
    decoded = decode_image(buffer.getvalue(), limits=LIMITS)
    assert (decoded.format, decoded.width, decoded.height) == ("HEIF", 32, 24)
    red, green, blue = pixel(decoded, (16, 12))
    assert red > 170 and green < 70 and blue < 70
    with pytest.raises(UnsupportedFormatError, match="HEIF"):
        decode_image(buffer.getvalue(), limits=Limits(formats=("JPEG", "PNG")))


def test_allowed_format_without_an_installed_decoder_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pillow_heif")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "HEIF")
    monkeypatch.delitem(Image.OPEN, "HEIF")  # as if pillow-heif were not installed
    with pytest.raises(UnsupportedFormatError, match="HEIF is allowed but no decoder for it is installed"):
        decode_image(buffer.getvalue(), limits=LIMITS)


def test_avif_is_refused_unless_allowed() -> None:
    buffer = io.BytesIO()
    try:
        Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, "AVIF")
    except KeyError:
        pytest.skip("this Pillow has no AVIF encoder")
    with pytest.raises(UnsupportedFormatError, match="AVIF is not in the allowed formats"):
        decode_image(buffer.getvalue(), limits=LIMITS)
    decoded = decode_image(buffer.getvalue(), limits=Limits(formats=(*LIMITS.formats, "AVIF")))
    assert decoded.format == "AVIF"
    assert pixel(decoded, (8, 8))[1] > 150


def test_wrong_extension_is_decoded_by_its_content(zoo: dict[str, Path]) -> None:
    decoded = decode_file(zoo["wrong_extension.png"], limits=LIMITS)
    assert decoded.format == "JPEG"
    assert (decoded.width, decoded.height) == (40, 30)


# --- orientation, animation, modes ----------------------------------------------------------------
def test_exif_rotated_image_is_transposed_to_upright() -> None:
    stored = Image.new("RGB", (64, 48), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(jpeg_bytes(stored, exif=exif.tobytes()), limits=LIMITS)
    assert (decoded.width, decoded.height) == (48, 64)
    red, green, blue = pixel(decoded, (48 - 8, 8))  # the block is now top-right
    assert red > 200 and green < 60 and blue < 60
    assert min(pixel(decoded, (8, 8))) > 200  # top-left is white
    assert decoded.exif["Orientation"] == "6"


def _exif_block(changes: list[tuple[int, int]], *, double_prefix: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0131] = "x" * 50
    block = bytearray((b"Exif\x00\x00" if double_prefix else b"") + exif.tobytes())  # starts b"Exif\0\0"
    for where, value in changes:
        block[6 + where % (len(block) - 6)] = value
    return bytes(block)


@FUZZ_EXIF
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6), st.booleans()
)
def test_a_malformed_exif_block_never_makes_a_good_jpeg_undecodable(
    changes: list[tuple[int, int]], double_prefix: bool
) -> None:
    block = _exif_block(changes, double_prefix=double_prefix)
    decoded = decode_image(jpeg_bytes(textured_rgb(16, 12), exif=block), limits=LIMITS)
    assert (decoded.width, decoded.height) in ((16, 12), (12, 16))


def test_exif_that_breaks_pillows_exif_transpose_still_decodes() -> None:
    block = _exif_block([(29, 8), (15, 50)], double_prefix=True)  # found by fuzzing: struct.error in Pillow
    with pytest.raises(struct.error):
        ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg_bytes(textured_rgb(16, 12), exif=block))))
    decoded = decode_image(jpeg_bytes(textured_rgb(16, 12), exif=block), limits=LIMITS)
    assert decoded.image.mode == "RGB"


def test_orientation_is_applied_even_when_exif_transpose_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(image: Image.Image) -> Image.Image:
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(jpeg_bytes(textured_rgb(64, 48), exif=exif.tobytes()), limits=LIMITS)
    assert (decoded.width, decoded.height) == (48, 64)


def test_exif_tags_are_recorded_as_readable_strings(zoo: dict[str, Path]) -> None:
    decoded = decode_file(zoo["exif_rotated.jpg"], limits=LIMITS)
    assert decoded.exif["Software"] == "SleuthZoo 1.0"
    assert all(isinstance(v, str) and len(v) <= 300 for v in decoded.exif.values())
    assert decode_file(zoo["good.png"], limits=LIMITS).exif == {}


def test_animated_gif_yields_its_first_frame_and_frame_count() -> None:
    decoded = decode_image(animated_gif_bytes(), limits=LIMITS)
    assert decoded.format == "GIF"
    assert decoded.n_frames == 3
    assert pixel(decoded, (5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_yield_their_first_frame(fmt: str) -> None:
    frames = [
        Image.new("RGB", (20, 10), color) for color in ((0, 0, 255), (0, 255, 0), (255, 0, 0), (9, 9, 9))
    ]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    decoded = decode_image(buffer.getvalue(), limits=LIMITS)
    assert decoded.n_frames == 4
    assert pixel(decoded, (5, 5)) == (0, 0, 255)


def test_sixteen_bit_png_keeps_its_gradient(zoo: dict[str, Path]) -> None:
    decoded = decode_file(zoo["sixteen_bit.png"], limits=LIMITS)
    assert decoded.mode == "I;16"
    row = np.asarray(decoded.image)[0, :, 0].astype(int)  # [W]
    assert row[0] <= 1 and row[-1] >= 254
    assert abs(row[128] - 128) <= 2
    assert np.all(np.diff(row) >= 0)
    assert len(set(row.tolist())) > 200  # a gradient, not clipped to a few values


def test_palette_transparency_is_composited_onto_white() -> None:
    decoded = decode_image(png_bytes(palette_alpha()), limits=LIMITS)
    assert decoded.mode == "P"
    assert pixel(decoded, (4, 4)) == (255, 0, 0)
    assert pixel(decoded, (28, 4)) == (255, 255, 255)  # transparent blue shows white


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode: str) -> None:
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 4))  # left opaque black, right transparent
    rgba.putpixel((6, 2), (0, 0, 0, 128))  # half-transparent black -> mid grey
    decoded = decode_image(png_bytes(rgba.convert(mode)), limits=LIMITS)
    assert decoded.mode == mode
    assert pixel(decoded, (1, 1)) == (0, 0, 0)
    assert pixel(decoded, (7, 1)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in pixel(decoded, (6, 2)))


def test_cmyk_jpeg_becomes_rgb_close_to_the_original(zoo: dict[str, Path]) -> None:
    decoded = decode_file(zoo["cmyk.jpg"], limits=LIMITS)
    assert decoded.mode == "CMYK"
    original = np.asarray(textured_rgb(*GOOD_SIZE, seed=1), dtype=np.float64)
    assert np.abs(np.asarray(decoded.image, dtype=np.float64) - original).mean() < 15


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"])
def test_every_tiff_mode_becomes_rgb_of_the_same_size(mode: str) -> None:
    source = textured_rgb(24, 12, seed=5)
    converted = source.convert("L").convert(mode) if mode in ("I", "I;16", "F") else source.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, "TIFF")
    decoded = decode_image(buffer.getvalue(), limits=LIMITS)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (24, 12)
    assert decoded.mode == converted.mode


def test_high_bit_depth_and_float_gray_are_scaled_not_clipped() -> None:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :].repeat(4, axis=0)  # [4, 64]
    as_float = to_rgb(Image.fromarray(ramp, "F"))
    assert np.asarray(as_float)[0, -1, 0] == 255 and np.asarray(as_float)[0, 0, 0] == 0
    sixteen_in_int32 = Image.fromarray((ramp * 65535).astype(np.int32), "I")
    assert abs(int(np.asarray(to_rgb(sixteen_in_int32))[0, 32, 0]) - 130) <= 3
    wide = Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32), "I")  # outside 16 bits: min-max scaled
    values = np.asarray(to_rgb(wide))[0, :, 0]
    assert values[0] == 0 and values[-1] == 255
    assert np.asarray(to_rgb(sixteen_bit_gradient()))[0, -1, 0] == 255


# --- metadata -------------------------------------------------------------------------------------
def test_xmp_digital_source_type_and_icc_profile_name_are_recorded() -> None:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
        b'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"'
        b' xmp:CreatorTool="SleuthTest 2"/></rdf:RDF></x:xmpmeta>'
    )
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode_image(jpeg_bytes(textured_rgb(16, 16), xmp=xmp, icc_profile=icc), limits=LIMITS)
    assert decoded.metadata["xmp"] == "present"
    assert decoded.metadata["xmp:DigitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert decoded.metadata["xmp:CreatorTool"] == "SleuthTest 2"
    assert decoded.metadata["icc_profile"] == "sRGB built-in"


def test_xmp_written_as_elements_is_read_too() -> None:
    xmp = (
        "<x:xmpmeta><rdf:RDF><rdf:Description><Iptc4xmpExt:DigitalSourceType>"
        "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture</Iptc4xmpExt:DigitalSourceType>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    decoded = decode_image(png_bytes(textured_rgb(16, 16), pnginfo=info), limits=LIMITS)
    assert decoded.metadata["xmp:DigitalSourceType"].endswith("/digitalCapture")
    assert "png:XML:com.adobe.xmp" not in decoded.metadata


def test_png_text_chunks_are_recorded_short() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a portrait photo, Steps: 30, Sampler: Euler a, Seed: 1234")
    info.add_text("Comment", "x" * 5000, zip=True)
    decoded = decode_image(png_bytes(textured_rgb(16, 16), pnginfo=info), limits=LIMITS)
    assert decoded.metadata["png:parameters"].startswith("a portrait photo")
    assert len(decoded.metadata["png:Comment"]) == 300


def test_c2pa_jumbf_manifest_presence_is_recorded() -> None:
    label_box = b"jumd" + bytes.fromhex("6332706100110010800000aa00389b71") + b"\x03c2pa\x00"
    superbox = struct.pack(">I", 8 + 8 + len(label_box)) + b"jumb" + struct.pack(">I", 8 + len(label_box))
    payload = b"JP\x00\x01\x00\x00\x00\x01" + superbox + label_box
    segment = b"\xff\xeb" + struct.pack(">H", len(payload) + 2) + payload  # APP11
    plain = jpeg_bytes(textured_rgb(16, 16))
    decoded = decode_image(plain[:2] + segment + plain[2:], limits=LIMITS)
    assert decoded.metadata["c2pa"] == "present"
    assert decoded.metadata["jumbf"] == "present"
    assert "c2pa" not in decode_image(plain, limits=LIMITS).metadata


def test_corrupt_icc_profile_does_not_make_the_image_undecodable() -> None:
    decoded = decode_image(jpeg_bytes(textured_rgb(16, 16), icc_profile=b"not a profile" * 20), limits=LIMITS)
    assert decoded.metadata["icc_profile"] == "present"


# --- sniffing -------------------------------------------------------------------------------------
def test_sniff_format_reads_magic_bytes_not_extensions(zoo: dict[str, Path]) -> None:
    assert sniff_format(zoo["wrong_extension.png"].read_bytes()) == "JPEG"
    assert sniff_format(zoo["good.png"].read_bytes()) == "PNG"
    assert sniff_format(zoo["animated.gif"].read_bytes()) == "GIF"
    assert sniff_format(zoo["text.txt"].read_bytes()) is None
    assert sniff_format(b"") is None
    for fmt in ("WEBP", "TIFF", "BMP"):
        buffer = io.BytesIO()
        textured_rgb(8, 8).save(buffer, fmt)
        assert sniff_format(buffer.getvalue()) == fmt
    assert sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "HEIF"
    assert sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1") == "AVIF"
    assert sniff_format(b"BM is also how this sentence starts") is None


# --- fuzzing: bad bytes only ever raise DecodeError -----------------------------------------------
def _valid_samples() -> list[bytes]:
    samples = [
        jpeg_bytes(textured_rgb(24, 16, seed=8)),
        png_bytes(textured_rgb(24, 16, seed=9)),
        png_bytes(sixteen_bit_gradient(32, 4)),
        png_bytes(palette_alpha()),
        animated_gif_bytes(),
    ]
    for fmt in ("WEBP", "TIFF", "BMP", "HEIF"):
        if fmt in Image.SAVE:
            buffer = io.BytesIO()
            textured_rgb(24, 16, seed=10).save(buffer, fmt)
            samples.append(buffer.getvalue())
    return samples


VALID_SAMPLES = _valid_samples()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_decode_error(data: bytes) -> None:
    try:
        decoded = decode_image(data, limits=LIMITS)
    except DecodeError as exc:
        assert str(exc)
        return
    assert decoded.image.mode == "RGB"
    if decoded.scale == 1.0:
        assert decoded.image.size == (decoded.width, decoded.height)
    else:  # decoded at the working size; width and height stay the original's
        assert max(decoded.image.size) == LIMITS.working_side < max(decoded.width, decoded.height)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_decode_errors(data: bytes) -> None:
    _decode_or_decode_error(data)


@FUZZ
@given(st.sampled_from(VALID_SAMPLES), st.floats(min_value=0.0, max_value=1.0))
def test_random_truncations_of_valid_images_only_raise_decode_errors(sample: bytes, fraction: float) -> None:
    _decode_or_decode_error(sample[: int(len(sample) * fraction)])


@FUZZ
@given(
    st.sampled_from(VALID_SAMPLES), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8)
)
def test_random_byte_changes_in_valid_images_only_raise_decode_errors(
    sample: bytes, changes: list[tuple[float, int]]
) -> None:
    data = bytearray(sample)
    for where, value in changes:
        data[min(int(where * len(data)), len(data) - 1)] = value
    _decode_or_decode_error(bytes(data))
