"""Exports loaded with the real clients: Hugging Face `datasets` imagefolder and `mlcroissant`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from gbif_assets.reports.exports import export_all
from gbif_assets.reports.metadata import rows_of


@pytest.fixture
def exported(merged: Path):
    return export_all(
        merged,
        "plants",
        "Fern and moss images from GBIF",
        "GBIF.org (2 January 2023) GBIF Occurrence Download https://doi.org/10.15468/dl.29wbtx",
    )


def test_hf_imagefolder_loads_every_image_with_label_and_split(
    merged: Path, exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(merged / "images"), cache_dir=str(tmp_path / "hf_cache"))
    # The `val` folder becomes HF's `validation` split.
    assert {name: ds[name].num_rows for name in ds} == {"train": 5, "validation": 2, "test": 2}
    expected = {}
    for row in rows_of(merged, 'SELECT split, label, license, width, height, "gbifID" FROM images'):
        split = "validation" if row["split"] == "val" else row["split"]
        expected.setdefault(split, []).append(
            (str(row["label"]), row["license"], row["gbifID"], (row["width"], row["height"]))
        )
    for split, part in ds.items():
        got = [(str(r["label"]), r["license"], str(r["gbif_id"]), r["image"].size) for r in part]
        assert sorted(got) == sorted(expected[split])
        assert isinstance(part[0]["image"], Image.Image)
    assert exported.rows == 9
    # labels stay text (numeric taxon keys are not read as int64), and become a ClassLabel at one call
    assert ds["train"].features["label"].dtype == "string"
    labels = sorted({label for split in ds.values() for label in split["label"]})  # as README does
    encoded = ds.cast_column("label", datasets.ClassLabel(names=labels))
    assert all(encoded[split].features["label"].names == ["1001", "2002"] for split in encoded)


def test_hf_metadata_files(merged: Path, exported) -> None:
    assert exported.hf_metadata_files == [merged / "images" / s / "metadata.jsonl" for s in ("train", "val", "test")]
    for file in exported.hf_metadata_files:
        for row in map(json.loads, file.read_text(encoding="utf-8").splitlines()):
            # file_name is relative to the split folder and names a real image of that label.
            assert (file.parent / row["file_name"]).is_file()
            assert row["file_name"].split("/")[0] == row["label"]
            assert isinstance(row["label"], str) and isinstance(row["gbif_id"], str)
    with exported.table_csv.open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 9 and all((merged / r["path"]).is_file() for r in table)


def test_an_earlier_versions_metadata_csv_is_replaced(merged: Path) -> None:
    """Two metadata files in one split folder would make `imagefolder` refuse the folder."""
    (merged / "images" / "train" / "metadata.csv").write_text("file_name,label\n", encoding="utf-8")
    export_all(merged, "plants", "d", "c")
    assert sorted(p.name for p in (merged / "images" / "train").glob("metadata.*")) == ["metadata.jsonl"]


def test_imagefolder_layout_is_split_label_file(merged: Path, exported) -> None:
    """What torchvision ImageFolder and keras read: images/<split>/<label>/<image file>."""
    for split in ("train", "val", "test"):
        labels = sorted(p.name for p in (merged / "images" / split).iterdir() if p.is_dir())
        assert labels == ["1001", "2002"]
        for file in (merged / "images" / split).glob("*/*"):
            with Image.open(file) as img:
                img.verify()


def test_croissant_validates_and_reads_records(merged: Path, exported) -> None:
    import mlcroissant as mlc

    assert exported.croissant == merged / "croissant.json"
    doc = json.loads(exported.croissant.read_text(encoding="utf-8"))
    assert doc["license"] == [
        "https://creativecommons.org/licenses/by/4.0/",
        "https://creativecommons.org/licenses/by-nc/4.0/",
        "https://creativecommons.org/publicdomain/zero/1.0/",
    ]
    assert "10.15468/dl.29wbtx" in doc["citeAs"]
    assert {d["encodingFormat"] for d in doc["distribution"]} == {
        "text/csv",
        "image/jpeg",
        "image/png",
    }
    dataset = mlc.Dataset(jsonld=exported.croissant)
    assert not dataset.metadata.ctx.issues.errors and not dataset.metadata.ctx.issues.warnings
    records = list(dataset.records(record_set="images"))
    assert len(records) == 9
    paths = {r["images/path"].decode() for r in records}
    assert all((merged / p).is_file() for p in paths)
    assert {r["images/license"].decode() for r in records} == {
        "CC-BY-4.0",
        "CC-BY-NC-4.0",
        "CC0-1.0",
    }


def test_unknown_split_is_refused(merged: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = merged / "metadata" / "images.parquet"
    rows = pq.read_table(table).to_pylist()
    rows[0]["split"] = "holdout"
    pq.write_table(pa.Table.from_pylist(rows), table)
    with pytest.raises(ValueError, match="split 'holdout'; exports know only train, val, test"):
        export_all(merged, "plants", "d", "c")
    assert not (merged / "croissant.json").exists()


def test_a_split_emptied_by_a_refresh_loses_its_metadata_file(merged: Path, exported) -> None:
    """A stale images/val/metadata.jsonl would list deleted files, and `imagefolder` would fail on them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert (merged / "images" / "val" / "metadata.jsonl").exists()
    table = merged / "metadata" / "images.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in pq.read_table(table).to_pylist() if r["split"] != "val"]), table)
    export_all(merged, "plants", "d", "c")
    assert not (merged / "images" / "val" / "metadata.jsonl").exists()
    assert (merged / "images" / "train" / "metadata.jsonl").exists()
