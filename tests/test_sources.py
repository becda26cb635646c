"""Ingest sources: folders, CSV/JSONL manifests, WebDataset tar shards (hostile ones included), eval-v1."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from indexer.decode import decode_image
from indexer.errors import ImageTooLargeError, SourceError
from indexer.settings import Limits
from indexer.sources import LABELS, SourceItem, count_source, expand_braces, iter_source, source_kind
from tests.image_zoo import jpeg_bytes, png_bytes, textured_rgb

EVAL_V1 = Path("/work/shared/data/eval-v1")


def jpeg(seed: int) -> bytes:
    return jpeg_bytes(textured_rgb(16, 12, seed=seed))


def keys(items: list[SourceItem]) -> list[str]:
    return [item.key for item in items]


# --- folders --------------------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "crawl"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden_dir").mkdir()
    (root / "z.jpg").write_bytes(jpeg(1))
    (root / "a" / "x.PNG").write_bytes(png_bytes(textured_rgb(8, 8, seed=2)))
    (root / "b" / "deep" / "y.webp").write_bytes(b"not really a webp")  # image extension: included
    (root / "b" / "really_a_jpeg.txt").write_bytes(jpeg(3))  # sniffed: included
    (root / "b" / "notes.txt").write_bytes(b"just notes")  # neither: skipped
    (root / "manifest.csv").write_text("path,label\nz.jpg,real\n")  # not special inside a folder
    (root / "meta.jsonl").write_text('{"path": "z.jpg"}\n')
    (root / ".hidden.jpg").write_bytes(jpeg(4))
    (root / ".hidden_dir" / "inside.jpg").write_bytes(jpeg(5))
    return root


def test_folder_is_walked_recursively_in_sorted_order_with_relative_posix_keys(image_folder: Path) -> None:
    items = list(iter_source(image_folder))
    assert keys(items) == ["a/x.PNG", "b/deep/y.webp", "b/really_a_jpeg.txt", "z.jpg"]
    assert keys(list(iter_source(str(image_folder)))) == keys(items)  # str or Path, same order every time
    assert source_kind(image_folder) == "folder"
    assert count_source(image_folder) == 4


def test_folder_items_read_their_own_bytes(image_folder: Path) -> None:
    by_key = {item.key: item for item in iter_source(image_folder)}
    assert by_key["z.jpg"].read() == (image_folder / "z.jpg").read_bytes()
    assert decode_image(by_key["b/really_a_jpeg.txt"].read()).format == "JPEG"
    assert all(item.label is None and item.url is None for item in by_key.values())


def test_folder_item_whose_file_vanished_raises_source_error(image_folder: Path) -> None:
    items = list(iter_source(image_folder))
    (image_folder / "z.jpg").unlink()
    with pytest.raises(SourceError, match="vanished"):
        items[-1].read()


def test_folder_item_over_the_byte_cap_is_refused_before_reading(image_folder: Path) -> None:
    item = next(i for i in iter_source(image_folder, limits=Limits(max_bytes=50)) if i.key == "z.jpg")
    with pytest.raises(ImageTooLargeError, match="max_bytes=50"):
        item.read()


def test_missing_source_and_unknown_file_kind_raise_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        iter_source(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="not a folder, a manifest"):
        iter_source(tmp_path / "notes.txt")


# --- manifests ------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    columns = sorted({column for row in rows for column in row})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.jpg").write_bytes(jpeg(11))
    (tmp_path / "imgs" / "two.jpg").write_bytes(jpeg(12))
    return tmp_path


def test_csv_manifest_rows_become_items_with_paths_relative_to_the_manifest(manifest_dir: Path) -> None:
    manifest = manifest_dir / "crawl.csv"
    write_csv(
        manifest,
        [
            {
                "path": "imgs/one.jpg",
                "url": "https://cdn.example/one.jpg",
                "page_url": "https://example.org/post/1",
                "collection": "crawl-2024",
                "label": "Generated",
                "generator": "stylegan2-ffhq",
                "licence": "CC-BY-4.0",
                "first_seen": "2024-03-01T12:00:00Z",
                "latent": "0.5 -1.25 2",
                "seed": "42",
                "caption": "ignored extra column",
            },
            {"path": "imgs/two.jpg", "label": "real", "first_seen": "2023-12-31", "latent": "[1, 2.5]"},
        ],
    )
    items = list(iter_source(manifest))
    assert keys(items) == ["imgs/one.jpg", "imgs/two.jpg"]
    first, second = items
    assert first.read() == (manifest_dir / "imgs" / "one.jpg").read_bytes()
    assert (first.url, first.page_url, first.collection) == (
        "https://cdn.example/one.jpg",
        "https://example.org/post/1",
        "crawl-2024",
    )
    assert (first.label, first.generator, first.licence) == ("generated", "stylegan2-ffhq", "CC-BY-4.0")
    assert (first.first_seen, first.latent, first.seed) == ("2024-03-01T12:00:00Z", (0.5, -1.25, 2.0), 42)
    assert (second.label, second.first_seen, second.latent, second.seed) == (
        "real",
        "2023-12-31",
        (1.0, 2.5),
        None,
    )
    assert source_kind(manifest) == "manifest"
    assert count_source(manifest) == 2


def test_jsonl_manifest_accepts_lists_numbers_and_blank_lines(manifest_dir: Path) -> None:
    manifest = manifest_dir / "crawl.jsonl"
    rows = [
        {
            "path": "imgs/two.jpg",
            "label": "stock",
            "latent": [0.1, 0.2, 0.3],
            "seed": 7,
            "licence": "unsplash",
        },
        {"url": "https://cdn.example/remote.png", "label": "unknown", "first_seen": 1700000000},
    ]
    manifest.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    local, remote = list(iter_source(manifest))
    assert (local.key, local.label, local.latent, local.seed) == ("imgs/two.jpg", "stock", (0.1, 0.2, 0.3), 7)
    assert local.read() == (manifest_dir / "imgs" / "two.jpg").read_bytes()
    assert remote.key == "https://cdn.example/remote.png"
    assert remote.first_seen == "2023-11-14T22:13:20+00:00"
    assert count_source(manifest) == 2


def test_url_only_rows_yield_items_whose_read_refuses_to_download(manifest_dir: Path) -> None:
    manifest = manifest_dir / "urls.csv"
    write_csv(manifest, [{"url": "https://cdn.example/a.jpg", "label": "real"}])
    (item,) = list(iter_source(manifest))
    assert (item.key, item.url) == ("https://cdn.example/a.jpg", "https://cdn.example/a.jpg")
    with pytest.raises(SourceError, match="url-only rows are not fetched; ingest never downloads"):
        item.read()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("label", "fake", "label 'fake' is not one of generated, stock, real, unknown"),
        ("first_seen", "last tuesday", "first_seen 'last tuesday' is not an ISO 8601"),
        ("latent", "0.1 abc", "latent holds a value that is not a number"),
        ("latent", "[1, NaN]", "finite"),
        ("seed", "4.5", "seed '4.5' is not an integer"),
    ],
)
def test_bad_row_values_raise_source_error_naming_the_row(
    manifest_dir: Path, column: str, value: str, message: str
) -> None:
    manifest = manifest_dir / "bad.csv"
    write_csv(manifest, [{"path": "imgs/one.jpg"}, {"path": "imgs/two.jpg", column: value}])
    items = iter_source(manifest)
    assert next(items).key == "imgs/one.jpg"  # rows before the bad one are fine
    with pytest.raises(SourceError, match=message) as caught:
        next(items)
    assert "bad.csv:3" in str(caught.value)


def test_row_without_path_or_url_and_bad_jsonl_raise_source_error(manifest_dir: Path) -> None:
    write_csv(manifest_dir / "empty_row.csv", [{"label": "real"}])
    with pytest.raises(SourceError, match="needs a path"):
        list(iter_source(manifest_dir / "empty_row.csv"))
    (manifest_dir / "broken.jsonl").write_text('{"path": "imgs/one.jpg"}\n{not json\n')
    with pytest.raises(SourceError, match="broken.jsonl:2"):
        list(iter_source(manifest_dir / "broken.jsonl"))
    (manifest_dir / "array.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SourceError, match="must be an object"):
        list(iter_source(manifest_dir / "array.jsonl"))


def test_eval_v1_style_columns_are_aliases(manifest_dir: Path) -> None:
    manifest = manifest_dir / "eval.csv"
    write_csv(
        manifest,
        [
            {
                "file": "imgs/one.jpg",
                "class": "gan_face",
                "generator_if_known": "StyleGAN2",
                "license": "MIT",
            },
            {"file": "imgs/two.jpg", "class": "real_face", "generator_if_known": "", "license": ""},
        ],
    )
    gan, real = list(iter_source(manifest))
    assert (gan.key, gan.label, gan.generator, gan.licence) == (
        "imgs/one.jpg",
        "generated",
        "StyleGAN2",
        "MIT",
    )
    assert (real.label, real.generator, real.licence) == ("real", None, None)


@pytest.mark.skipif(
    not (EVAL_V1 / "manifest.csv").is_file(), reason="eval-v1 data set is not on this machine"
)
def test_eval_v1_manifest_parses_with_labels_and_readable_files() -> None:
    manifest = EVAL_V1 / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    items = list(iter_source(manifest))
    assert len(items) == len(rows) == count_source(manifest)
    assert {item.label for item in items} <= set(LABELS)
    expected_label = {
        "gan_face": "generated",
        "real_face": "real",
        "generic_photo": "stock",
        "near_dup": "unknown",
    }
    for item, row in zip(items, rows, strict=True):
        assert item.key == row["file"]
        assert item.label == expected_label[row["class"]]
    for item, row in list(zip(items, rows, strict=True))[:: max(1, len(rows) // 20)]:
        assert hashlib.sha256(item.read()).hexdigest() == row["sha256"]


# --- tar shards -----------------------------------------------------------------------------------
def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            add_member(tar, name, data)


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "00000.tar"
    meta = {
        "url": "https://cdn.example/0001.jpg",
        "key": "0001",
        "caption": "a face",
        "page_url": "https://example.org/p/1",
        "timestamp": "2022-05-01T00:00:00",
        "label": "generated",
        "generator": "stylegan2",
        "LICENSE": "cc-by",
        "status": "success",
    }
    with tarfile.open(path, "w") as tar:
        add_member(tar, "0001.jpg", jpeg(21))
        add_member(tar, "0001.json", json.dumps(meta).encode())
        add_member(tar, "0001.txt", b"a face")
        add_member(tar, "../evil.jpg", jpeg(22))
        add_member(tar, "/abs/evil.jpg", jpeg(23))
        add_member(tar, "link.jpg", b"", kind=tarfile.SYMTYPE)
        add_member(tar, "0002.png", png_bytes(textured_rgb(8, 8, seed=24)))
        add_member(tar, "0003.json", b'{"url": "https://cdn.example/missing.jpg"}')  # no image: skipped
        add_member(tar, "0004.seg.png", png_bytes(textured_rgb(8, 8, seed=25)))  # a mask field, not the image
        add_member(tar, "sub/0005.jpg", jpeg(26))
        add_member(tar, "sub/0005.json", b"{broken json")
    return path


def test_webdataset_shard_pairs_images_with_their_json_and_skips_hostile_members(
    shard: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = list(iter_source(shard))
    assert keys(items) == ["00000.tar/0001", "00000.tar/0002", "00000.tar/sub/0005"]
    first, png_only, broken_json = items
    assert first.read() == jpeg(21)
    assert (first.url, first.page_url, first.first_seen) == (
        "https://cdn.example/0001.jpg",
        "https://example.org/p/1",
        "2022-05-01T00:00:00",
    )
    assert (first.label, first.generator, first.licence) == ("generated", "stylegan2", "cc-by")
    assert decode_image(png_only.read()).format == "PNG"
    assert png_only.url is None
    assert broken_json.url is None and decode_image(broken_json.read()).format == "JPEG"
    warnings = caplog.text
    assert "../evil.jpg" in warnings and "/abs/evil.jpg" in warnings and "link.jpg" in warnings
    assert source_kind(shard) == "shards"
    assert count_source(shard) is None


def test_shard_reading_never_extracts_to_disk(
    shard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    list(iter_source(shard))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_shard_members_over_the_byte_cap_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "big.tar"
    write_shard(path, [("small.jpg", jpeg(31)), ("huge.jpg", b"\xff\xd8\xff" + b"\x00" * 5000)])
    assert keys(list(iter_source(path, limits=Limits(max_bytes=4000)))) == ["big.tar/small"]
    assert "huge.jpg" in caplog.text and "over the cap" in caplog.text


def test_bad_label_in_a_shard_sidecar_raises_source_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    write_shard(path, [("a.jpg", jpeg(32)), ("a.json", b'{"label": "deepfake"}')])
    with pytest.raises(SourceError, match="label 'deepfake'"):
        list(iter_source(path))


def test_truncated_shard_raises_source_error_after_the_samples_it_could_read(tmp_path: Path) -> None:
    path = tmp_path / "cut.tar"
    write_shard(path, [("a.jpg", jpeg(33)), ("b.jpg", jpeg(34) * 4)])
    data = path.read_bytes()
    padded_a = -(-len(jpeg(33)) // 512) * 512
    path.write_bytes(data[: 512 + padded_a + 512 + 700])  # a, then b's header and part of b's data
    items = iter_source(path)
    assert next(items).key == "cut.tar/a"
    with pytest.raises(SourceError, match="cut.tar"):
        list(items)


def test_shard_cut_at_a_header_yields_what_it_holds_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cut.tar"
    write_shard(path, [("a.jpg", jpeg(35)), ("b.jpg", jpeg(36))])
    padded_a = -(-len(jpeg(35)) // 512) * 512
    path.write_bytes(path.read_bytes()[: 512 + padded_a + 100])  # a, then part of b's header
    assert keys(list(iter_source(path))) == ["cut.tar/a"]
    assert "looks truncated" in caplog.text
    caplog.clear()
    write_shard(path, [("a.jpg", jpeg(35))])
    assert keys(list(iter_source(path))) == ["cut.tar/a"]
    assert "looks truncated" not in caplog.text


def test_folder_of_shards_and_brace_patterns_read_shards_in_order(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(3):
        write_shard(shards / f"{n:05d}.tar", [(f"{n}{i}.jpg", jpeg(40 + 10 * n + i)) for i in range(2)])
    (shards / "README").write_text("shards written by a test")
    from_folder = keys(list(iter_source(shards)))
    assert from_folder == [
        "00000.tar/00",
        "00000.tar/01",
        "00001.tar/10",
        "00001.tar/11",
        "00002.tar/20",
        "00002.tar/21",
    ]
    assert source_kind(shards) == "shards"
    assert keys(list(iter_source(f"{shards}/{{00000..00002}}.tar"))) == from_folder
    assert keys(list(iter_source(f"{shards}/{{00002,00000}}.tar"))) == from_folder[4:] + from_folder[:2]
    with pytest.raises(SourceError, match="do not exist, first: .*00003.tar"):
        iter_source(f"{shards}/{{00000..00003}}.tar")


def test_folder_with_images_ignores_tar_files_in_it(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", [("a.jpg", jpeg(50))])
    (tmp_path / "b.jpg").write_bytes(jpeg(51))
    assert keys(list(iter_source(tmp_path))) == ["b.jpg"]


def test_gzipped_shard_is_read_as_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "s.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "k.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    assert keys(list(iter_source(path))) == ["s.tar.gz/k"]


def test_an_existing_path_with_braces_in_its_name_is_taken_literally(tmp_path: Path) -> None:
    folder = tmp_path / "set{1}"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(60))
    assert keys(list(iter_source(str(folder)))) == ["a.jpg"]


def test_brace_expansion_keeps_zero_padding_and_order() -> None:
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(SourceError):
        expand_braces("s/{abc}.tar")
