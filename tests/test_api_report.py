"""The provenance report (search/report.py): verdict rules, embedded metadata, self-contained HTML."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from indexer.decode import decode_image
from indexer.ingest import thumbnail_path
from indexer.settings import Settings
from search.report import (
    ProvenanceReport,
    build_report,
    code_version,
    query_facts,
    render_html,
    save_query_thumbnail,
)
from tests.synthetic_images import synthetic_photo

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def png_uri(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def hit(image_id: int, sha: str, cls: str, **extra: Any) -> dict[str, Any]:
    return {
        "image_id": image_id, "sha256": sha, "match_class": cls, "score": 0.9, "width": 64, "height": 64,
        "scores": {"pdq_distance": 4}, "label": None, "generator": None, "verification": None, "sightings": [],
    } | extra  # fmt: skip


def sighting(
    first_seen: str | None, page_url: str | None = None, collection: str = "crawl"
) -> dict[str, Any]:
    return {
        "collection": collection, "source_key": "f.jpg", "url": None, "page_url": page_url,
        "first_seen": first_seen, "licence": None,
    }  # fmt: skip


def result_doc(hits: list[dict[str, Any]], faces: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The documented shape of search.query.result_to_json."""
    return {
        "query": {"sha256": "d" * 64, "width": 64, "height": 48, "format": "JPEG", "num_bytes": 1234,
                  "hashes": {"pdq": "00" * 32, "phash": "11" * 8}},
        "tiers": ["sha256", "pdq", "phash", "clip"], "skipped_tiers": {"faces": "no face detector"},
        "hits": hits, "faces": faces or [],
        "thresholds": {"pdq_max_distance": 31}, "index_builds": {"pdq": 3, "clip": 4},
        "models": {"clip": {"model_id": "onnx:clip.onnx", "weights_sha256": "e" * 64}},
        "timings_ms": {"decode": 1.5, "embed": 20.0, "search": 2.0, "verify": 30.0, "metadata": 1.0},
    }  # fmt: skip


def test_exact_copy_of_a_known_generated_face_says_when_and_where_it_was_first_seen() -> None:
    doc = result_doc([
        hit(7, SHA_A, "exact", label="generated", generator="StyleGAN2-FFHQ",
            sightings=[sighting("2023-01-02", "https://b.example/p"), sighting("2022-05-14", "https://a.example/x")]),
        hit(9, SHA_B, "similar", scores={"clip_similarity": 0.91}),
    ])  # fmt: skip
    report = build_report(doc, report_id="r1")
    assert report.verdict.kind == "copy_of_generated"
    assert report.verdict.summary == (
        "Exact copy of a known generated image (StyleGAN2-FFHQ) first seen 2022-05-14 at https://a.example/x "
        "(image 7, 2 sighting(s))."
    )
    assert any("visually similar" in r for r in report.verdict.reasons[1:])
    assert [h.image_id for h in report.hits["exact"]] == [7] and report.hits["exact"][
        0
    ].first_seen == "2022-05-14"
    assert [h.rank for h in report.all_hits()] == [1, 2]
    repro = report.reproducibility
    assert repro.models["clip"]["weights_sha256"] == "e" * 64 and repro.index_builds == {"pdq": 3, "clip": 4}
    assert repro.thresholds == {"pdq_max_distance": 31} and repro.timings_ms["verify"] == 30.0
    assert repro.code_version and repro.skipped_tiers == {"faces": "no face detector"}
    assert report.query.hashes["pdq"] == "00" * 32
    again = ProvenanceReport.model_validate_json(report.model_dump_json())  # JSON round trip
    assert again == report


def test_near_duplicate_of_a_stock_photo_and_no_match() -> None:
    doc = result_doc([hit(3, SHA_A, "near_duplicate", label="stock", sightings=[sighting("2021-03-04")])])
    verdict = build_report(doc, report_id="r").verdict
    assert verdict.kind == "copy_of_known"
    assert verdict.summary.startswith(
        "Near-duplicate of a known stock image first seen 2021-03-04 at f.jpg in crawl"
    )
    empty = build_report(result_doc([]), report_id="r").verdict
    assert empty.kind == "no_match" and empty.summary.startswith("No match")


def test_face_that_reprojects_into_a_generator_is_the_verdict_when_no_copy_exists() -> None:
    projection = {
        "generator": "StyleGAN2-FFHQ", "lpips": 0.06, "probability_generated": 0.98, "steps": 120,
        "latent_matches": [{"image_id": 11, "seed": 42, "cosine": 0.93, "distance": 0.12}],
        "reconstruction": png_uri((10, 200, 30)), "difference": png_uri((0, 0, 0)), "target": png_uri((9, 9, 9)),
    }  # fmt: skip
    real = {"generator": "StyleGAN2-FFHQ", "lpips": 0.41, "probability_generated": 0.03}
    faces = [{"box": [1, 2, 30, 40], "score": 0.99, "projection": projection},
             {"box": [40, 2, 60, 30], "score": 0.97, "projection": [real]}]  # fmt: skip
    report = build_report(result_doc([hit(5, SHA_C, "similar")], faces), report_id="r")
    assert report.verdict.kind == "reprojects_into_generator"
    assert report.verdict.summary == (
        "Face 1 reprojects into StyleGAN2-FFHQ with LPIPS 0.06, p(generated by it)=0.98; "
        "the nearest stored latent is that of image 11 (cosine 0.93)."
    )
    assert (
        "Face 2 does not reproject well into StyleGAN2-FFHQ (LPIPS 0.41, p(generated by it)=0.03)."
        in report.verdict.reasons
    )
    assert report.faces[0].projections[0].latent_matches[0]["image_id"] == 11
    uncalibrated = {"generator": "DCGAN", "lpips": 0.2, "probability_generated": None,
                    "latent_matches": [{"image_id": None, "seed": 7, "cosine": 0.5}]}  # fmt: skip
    neutral = build_report(result_doc([], [{"projection": uncalibrated}]), report_id="r").verdict
    assert neutral.kind == "no_match" and neutral.reasons == [
        "Face 1 projects into DCGAN with LPIPS 0.2 (the generator is not calibrated, so no p(generated)); "
        "the nearest stored latent is that of seed 7 (cosine 0.5)."
    ]
    assert report.faces[1].projections[0].lpips == 0.41


def test_a_face_a_stored_latent_reproduces_is_named_as_that_known_generated_image(tmp_path: Path) -> None:
    stored = {
        "latent_id": 3,
        "image_id": 11,
        "seed": 42,
        "origin": "manifest",
        "cosine": 0.9,
        "image_lpips": 0.021,
    }
    projection = {"generator": "G", "lpips": 0.15, "probability_generated": 0.4, "latent_matches": [stored],
                  "reproduced_by_stored_latent": stored}  # fmt: skip
    report = build_report(result_doc([], [{"projection": projection}]), report_id="r")
    assert report.verdict.kind == "reprojects_into_generator"
    assert report.verdict.summary == (
        "Face 1 is reproduced by the stored latent of image 11, a known generated image of G: LPIPS 0.021 at the "
        "query's resolution, as close as its own reprojection (LPIPS 0.15); p(generated by it)=0.4."
    )
    page = render_html(report, settings=Settings(data_dir=tmp_path / "data"))
    assert "Reproduced by a stored latent" in page and "0.021" in page


def test_a_distilled_student_is_named_as_such_and_an_uncovered_size_gets_no_probability() -> None:
    card = ("MobileStyleGAN FFHQ 1024x1024 (Belousov 2021), a convolutional student distilled from NVIDIA "
            "StyleGAN2-FFHQ config-f; mapping network z -> w as in StyleGAN2")  # fmt: skip
    student = {"generator": "mobilestylegan-ffhq", "description": card, "lpips": 0.08, "probability_generated": 0.97,
               "calibration_sizes": {"n_generated": 40, "n_real": 40}}  # fmt: skip
    verdict = build_report(result_doc([], [{"projection": student}]), report_id="r").verdict
    assert verdict.summary == (
        "Face 1 reprojects into mobilestylegan-ffhq (MobileStyleGAN FFHQ 1024x1024 (Belousov 2021), a convolutional "
        "student distilled from NVIDIA StyleGAN2-FFHQ config-f) with LPIPS 0.08, p(generated by it)=0.97, "
        "calibrated on 40 generated / 40 real faces."
    )
    assert "generated by StyleGAN2" not in " ".join(verdict.reasons)
    small = {**student, "probability_generated": None,
             "probability_note": "the face's effective size (64 px) is below the smallest the calibration measured "
                                 "(256 px): no probability"}  # fmt: skip
    verdict = build_report(result_doc([], [{"projection": small}]), report_id="r").verdict
    assert (
        verdict.kind == "no_match"
        and "(64 px) is below the smallest the calibration measured" in verdict.reasons[0]
    )


def test_a_real_face_with_only_similar_images_is_not_called_generated() -> None:
    faces = [{"projection": {"generator": "G", "lpips": 0.5, "probability_generated": 0.1}}]
    report = build_report(
        result_doc([hit(5, SHA_C, "similar", scores={"clip_similarity": 0.88})], faces), report_id="r"
    )
    assert report.verdict.kind == "similar_only"
    assert report.verdict.summary.startswith("No copy found in the index. 1 visually similar image(s)")


def _jpeg_with_metadata() -> bytes:
    im = synthetic_photo(3)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131] = "Acme", "Cam 1", "Editor 2.0"  # Make, Model, Software
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        b'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/>'
        b"</rdf:RDF></x:xmpmeta>"
    )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif, xmp=xmp)
    data = buf.getvalue()
    iptc = b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00\x00\x00\x00\x07" + b"\x1c\x02\x05\x00\x02hi\x00"
    app13 = b"\xff\xed" + (len(iptc) + 2).to_bytes(2, "big") + iptc
    return data[:2] + app13 + data[2:]  # right after SOI


def test_query_facts_report_exif_xmp_iptc_and_the_digital_source_type() -> None:
    data = _jpeg_with_metadata()
    decoded = decode_image(data)
    facts = query_facts(decoded, data)
    e = facts.embedded
    assert (e.exif, e.xmp, e.iptc, e.c2pa) == (True, True, True, False)
    assert e.camera == "Acme Cam 1" and e.software == "Editor 2.0"
    assert e.digital_source_type is not None and e.digital_source_type.endswith("trainedAlgorithmicMedia")
    plain = io.BytesIO()
    synthetic_photo(3).save(plain, "PNG")
    bare = query_facts(decode_image(plain.getvalue()), plain.getvalue()).embedded
    assert (bare.exif, bare.xmp, bare.iptc, bare.c2pa) == (False, False, False, False)


def test_html_is_self_contained_escapes_sources_and_inlines_evidence(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    data = _jpeg_with_metadata()
    decoded = decode_image(data)
    save_query_thumbnail(settings, decoded)
    thumb = thumbnail_path(settings, SHA_A)
    thumb.parent.mkdir(parents=True, exist_ok=True)
    synthetic_photo(4).save(thumb, "JPEG")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    inside = settings.data_dir / "reports" / "diff.png"
    inside.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(inside)
    hostile = "https://evil.example/<script>alert(1)</script>"
    projection = {"generator": "G", "lpips": 0.05, "probability_generated": 0.97,
                  "reconstruction": str(inside), "difference": str(outside), "target": png_uri((1, 2, 3)),
                  "latent_matches": [{"image_id": None, "seed": 7, "cosine": 0.9, "distance": 1.5}]}  # fmt: skip
    doc = result_doc(
        [hit(1, SHA_A, "exact", sightings=[sighting("2020-01-01", hostile)])],
        [{"projection": projection, "matches": [{"image_id": 1, "face_id": 2, "similarity": 0.97}]}],
    )
    report = build_report(doc, report_id="r-html", query=query_facts(decoded, data))
    page = render_html(report, settings=settings)
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert 'id="query-image"' in page and 'alt="indexed image 1"' in page
    assert 'alt="reconstruction of face 1"' in page and 'alt="target of face 1"' in page
    assert 'alt="difference of face 1"' not in page  # a file outside the data directory is never read
    assert "Exact copy of a known image first seen 2020-01-01" in page
    assert "Matches indexed faces: image 1 (a similar face, face-crop cosine 0.97)" in page
    assert "Projected into <strong>G</strong>: LPIPS 0.050,\n    p(generated by it) 0.97" in page
    assert "<td> seed 7</td>" in page and "<td>0.9</td><td>1.5</td>" in page
    assert "IPTC yes" in page and "trainedAlgorithmicMedia" in page and code_version() in page
