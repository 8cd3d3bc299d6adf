"""image_metadata: merge, exact de-duplication, near-duplicates and the asset checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_home, image_bytes

from gbif_assets.reports.metadata import (
    CONTRACT_COLUMNS,
    check_files_match,
    check_hash_leakage,
    check_licenses,
    merge_image_metadata,
)


def test_merge_keeps_one_copy_of_each_hash_and_lists_the_others(home: Path) -> None:
    cands = {c.gbif_id: c for c in build_home(home)}
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    try:
        result = merge_image_metadata(home, con)
        table_rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        con.close()
    assert result.rows == 9 and table_rows == 9
    assert result.duplicates_removed == 1
    assert result.per_split == {"train": 5, "val": 2, "test": 2}
    assert result.labels == 2
    rows = pq.read_table(home / "metadata" / "images.parquet").to_pylist()
    assert set(CONTRACT_COLUMNS) <= set(rows[0])
    assert {"source", "license_source", "title"} <= set(rows[0])
    by_id = {r["gbifID"]: r for r in rows}
    # gbifID 2 (train, rank 2) beats gbifID 6 (test, rank 0): a train copy is kept first.
    assert "6" not in by_id and by_id["2"]["split"] == "train"
    assert not (home / cands["6"].path).exists()
    dups = pq.read_table(home / "metadata" / "duplicates.parquet").to_pylist()
    assert [(d["gbifID"], d["duplicate_of"]) for d in dups] == [("6", cands["2"].path)]
    # Manifest columns joined in: normalized and raw licence, publisher, attribution fields.
    assert by_id["7"]["license"] == "CC-BY-NC-4.0"
    assert by_id["7"]["license_raw"] == "http://creativecommons.org/licenses/by-nc/4.0/"
    assert by_id["7"]["source"] == "gbif_cache"
    assert by_id["3"]["publishingOrgKey"] and by_id["3"]["rightsHolder"] == "Museum B"
    assert by_id["4"]["width"] == 48 and by_id["4"]["height"] == 32
    assert check_files_match(home) == [] and check_hash_leakage(home) == []


def test_merge_is_idempotent(merged: Path) -> None:
    first = pq.read_table(merged / "metadata" / "images.parquet").to_pylist()
    again = merge_image_metadata(merged)
    assert again.rows == len(first) == 9
    assert check_files_match(merged) == []


def test_near_duplicates_are_flagged_not_removed(home: Path) -> None:
    # A resized copy of gbifID 1 under another URL in the same label: same picture, other bytes.
    original = next(c for c in build_home(home) if c.gbif_id == "1")
    target = home / "images" / "train" / "1001" / ("f" * 40 + ".jpg")
    target.write_bytes(image_bytes((200, 10, 10), size=(96, 64)))
    shutil.copy(home / original.path, home / "spare.jpg")
    part = home / "metadata" / "partitions" / "1001.parquet"
    rows = pq.read_table(part).to_pylist()
    extra = dict(rows[0], url="https://img.a.example/copy.jpg", url_sha1="f" * 40,
                 path=target.relative_to(home).as_posix(),
                 gbifID="99", rank=50, sha256="0" * 64, width=96, height=64)  # fmt: skip
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([*rows, extra]), part)
    result = merge_image_metadata(home)
    assert result.near_duplicates >= 1 and result.rows == 10
    flagged = {
        r["gbifID"]: r["near_duplicate_of"] for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()
    }
    assert flagged["99"] == original.path


def test_perceptual_hashes_are_kept_and_reused_by_the_next_merge(home: Path) -> None:
    """images.parquet carries each image's perceptual hash; the next merge takes it from there for
    the same sha256 instead of decoding the image again (a monthly refresh decodes only new ones)."""
    build_home(home)
    merge_image_metadata(home)
    first = {r["path"]: r["phash"] for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    assert first and all(isinstance(v, str) and len(v) == 16 for v in first.values())
    path = sorted(first)[0]  # another picture at its path, under the same recorded sha256
    (home / path).write_bytes(image_bytes((10, 200, 10), size=(64, 96)))
    merge_image_metadata(home)
    again = {r["path"]: r["phash"] for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    assert again == first
    (home / "metadata" / "images.parquet").unlink()  # no earlier merge: hashed from the file
    merge_image_metadata(home)
    fresh = {r["path"]: r["phash"] for r in pq.read_table(home / "metadata" / "images.parquet").to_pylist()}
    assert fresh[path] != first[path] and {k: v for k, v in fresh.items() if k != path} == {
        k: v for k, v in first.items() if k != path
    }


def test_near_duplicate_blocks_agree_with_one_pass_per_image() -> None:
    """The blocked search flags exactly what comparing each image with every earlier unflagged
    one flags, keeper included (the nearest, the earliest on a tie), across block edges."""
    import random

    from gbif_assets.reports import metadata

    rng = random.Random(7)
    centres = [rng.getrandbits(64) for _ in range(60)]
    hashes: list[int | None] = []
    for _ in range(3000):
        key = rng.choice(centres)
        for bit in rng.sample(range(64), rng.choice([0, 1, 3, 6, 8, 9, 12, 30])):
            key ^= 1 << bit
        hashes.append(None if rng.random() < 0.02 else key)

    def one_pass(hashes: list[int | None], max_distance: int) -> list[tuple[int, int]]:
        keepers: list[int] = []
        flagged = []
        for index, key in enumerate(hashes):
            if key is None:
                continue
            distances = [(hashes[k] ^ key).bit_count() for k in keepers]
            if distances and min(distances) <= max_distance:
                flagged.append((index, keepers[distances.index(min(distances))]))
            else:
                keepers.append(index)
        return flagged

    expected = one_pass(hashes, 8)
    assert 500 < len(expected) < 2900  # both kinds, many of each
    assert metadata.near_duplicate_pairs(hashes, 8, cells=5000) == expected  # blocks of a few images
    assert metadata.near_duplicate_pairs(hashes, 8) == expected


def test_missing_partitions_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest.parquet not found: materialize `media_manifest`"):
        merge_image_metadata(tmp_path)
    (tmp_path / "metadata").mkdir()
    pq.write_table(pa.table({"label": ["1001"], "url_sha1": ["ab"]}), tmp_path / "metadata" / "manifest.parquet")
    with pytest.raises(FileNotFoundError, match=r"partitions.*materialize `images`"):
        merge_image_metadata(tmp_path)
    assert not (tmp_path / "metadata" / "images.parquet").exists()


def test_files_match_reports_orphans_both_ways(merged: Path) -> None:
    stray = merged / "images" / "train" / "1001" / "stray.jpg"
    stray.write_bytes(image_bytes((1, 2, 3)))
    row = pq.read_table(merged / "metadata" / "images.parquet").to_pylist()[0]
    (merged / row["path"]).unlink()
    problems = check_files_match(merged)
    assert problems == [
        f"file without a row: {stray.relative_to(merged).as_posix()}",
        f"row without a file: {row['path']}",
    ]


def test_files_match_catches_a_file_cut_since(merged: Path) -> None:
    row = pq.read_table(merged / "metadata" / "images.parquet").to_pylist()[0]
    (merged / row["path"]).write_bytes(b"\xff\xd8\xff")
    assert check_files_match(merged) == [
        f"file size differs from its row: {row['path']} (3 bytes, row says {row['bytes']})"
    ]


def test_a_label_that_kept_nothing_misses_its_quota(merged: Path) -> None:
    """Every link of a label dead: it has no image row, yet the quota check must name it."""
    from gbif_assets.recipe import parse_recipe
    from gbif_assets.steps import check_quota

    manifest = pq.read_table(merged / "metadata" / "manifest.parquet").to_pylist()
    manifest.append({**manifest[0], "label": "9999", "url_sha1": "f" * 40, "identifier": "https://gone.example/x.jpg"})
    pq.write_table(pa.Table.from_pylist(manifest), merged / "metadata" / "manifest.parquet")
    recipe = parse_recipe(
        {"name": "demo", "source": {"mode": "search", "query": {"speciesKey": [1]}}, "download": {"min_per_label": 1}},
        "test",
    )
    problems, rows = check_quota(recipe, merged)
    assert problems == ["label 9999: 0 images < 1"]
    assert {"label": "9999", "images": 0, "min_per_label": 1} in rows


def test_a_label_no_longer_in_the_manifest_leaves_the_dataset(home: Path) -> None:
    """The recipe dropped a taxon: its images, partition file and attempt log go, and the merged
    metadata has only the manifest's labels (files and metadata still match)."""
    manifest = home / "metadata" / "manifest.parquet"
    pq.write_table(
        pa.Table.from_pylist([r for r in pq.read_table(manifest).to_pylist() if r["label"] != "2002"]), manifest
    )
    result = merge_image_metadata(home)
    assert any("1 label(s) no longer in the manifest removed with their images: 2002" in n for n in result.notes)
    assert set(pq.read_table(home / "metadata" / "images.parquet").column("label").to_pylist()) == {"1001"}
    assert not list(home.glob("images/*/2002/*"))
    assert not (home / "metadata" / "partitions" / "2002.parquet").exists()
    assert not (home / "metadata" / "downloads" / "2002.parquet").exists()
    assert check_files_match(home) == []


def test_files_match_without_table(tmp_path: Path) -> None:
    assert check_files_match(tmp_path) == [f"{tmp_path / 'metadata' / 'images.parquet'} does not exist"]


def test_hash_leakage_detects_a_crafted_copy_across_splits(merged: Path) -> None:
    table = merged / "metadata" / "images.parquet"
    rows = pq.read_table(table).to_pylist()
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    test["sha256"] = train["sha256"]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), table)
    assert check_hash_leakage(merged) == [f"sha256 {train['sha256']} is in splits test,train"]


def test_licence_check_names_each_disallowed_row(merged: Path) -> None:
    assert check_licenses(merged, ["CC0-1.0", "CC-BY-4.0", "CC-BY-NC-4.0"]) == []
    problems = check_licenses(merged, ["CC0-1.0", "CC-BY-4.0"])
    assert len(problems) == 1 and problems[0].endswith("licence CC-BY-NC-4.0 not allowed")
    assert "/2002/" in problems[0]
