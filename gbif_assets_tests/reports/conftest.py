"""A small dataset home written the way `media_manifest` and the `images` partitions write it.

Two labels, three splits, real JPEG/PNG files, an exact duplicate inside one label (train and
test copies of the same bytes), attempt logs with dead links, cache rescues and retries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

DS_A = "7a3679ef-5582-4aaa-81f0-8c2545cafc81"
DS_B = "50c9509d-22c7-4a22-a47d-8c48425ef4a7"
ORG_A = "28eb1a3f-1c15-4a95-931a-4af90ecb574d"
ORG_B = "e2e717bf-551a-4917-bdc9-4fa0f342c530"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (48, 32), fmt: str = "JPEG") -> bytes:
    """A real image: a coarse random pattern seeded by `color`, so perceptual hashes differ
    between colours and stay close for a resized copy of the same colour."""
    rng = random.Random(sum(c << (8 * i) for i, c in enumerate(color)))
    coarse = Image.new("RGB", (6, 4))
    coarse.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(24)])
    img = coarse.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@dataclass
class Item:
    """One manifest candidate and, when `data` is set, its downloaded file."""

    gbif_id: str
    label: str
    split: str
    rank: int
    dataset: str
    org: str
    license_id: str
    license_raw: str
    data: bytes | None
    ext: str = "jpg"
    source: str = "publisher"
    title: str | None = None
    creator: str | None = "Ann Observer"
    holder: str | None = "Ann Observer"

    @property
    def url(self) -> str:
        host = "img.a.example" if self.dataset == DS_A else "media.b.example"
        return f"https://{host}/{self.gbif_id}.{self.ext}"

    @property
    def url_sha1(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()

    @property
    def path(self) -> str:
        return f"images/{self.split}/{self.label}/{self.url_sha1}.{self.ext}"


def items() -> list[Item]:
    """Label 1001: 6 kept files (one a byte copy of another); 2002: 4 kept and 2 dead links."""
    by = "CC-BY-4.0", "http://creativecommons.org/licenses/by/4.0/"
    nc = "CC-BY-NC-4.0", "http://creativecommons.org/licenses/by-nc/4.0/"
    zero = "CC0-1.0", "http://creativecommons.org/publicdomain/zero/1.0/"
    dup = image_bytes((10, 200, 30))
    out = [
        Item("1", "1001", "train", 1, DS_A, ORG_A, *by, image_bytes((200, 10, 10)), title="Fern 1"),
        Item("2", "1001", "train", 2, DS_A, ORG_A, *by, dup),
        Item(
            "3",
            "1001",
            "train",
            3,
            DS_B,
            ORG_B,
            *zero,
            image_bytes((10, 10, 200)),
            creator=None,
            holder="Museum B",
        ),
        Item(
            "4",
            "1001",
            "val",
            4,
            DS_B,
            ORG_B,
            *zero,
            image_bytes((90, 90, 90), fmt="PNG"),
            ext="png",
        ),
        Item("5", "1001", "test", 5, DS_A, ORG_A, *by, image_bytes((220, 220, 20))),
        Item("6", "1001", "test", 0, DS_A, ORG_A, *by, dup),
        Item(
            "7",
            "2002",
            "train",
            1,
            DS_A,
            ORG_A,
            *nc,
            image_bytes((20, 120, 220)),
            source="gbif_cache",
        ),
        Item("8", "2002", "train", 2, DS_B, ORG_B, *by, image_bytes((120, 20, 220))),
        Item("9", "2002", "val", 3, DS_B, ORG_B, *by, image_bytes((220, 120, 20))),
        Item("10", "2002", "test", 4, DS_A, ORG_A, *by, image_bytes((60, 160, 60))),
        Item("11", "2002", "train", 5, DS_B, ORG_B, *by, None),
        Item("12", "2002", "train", 6, DS_B, ORG_B, *by, None),
    ]
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def build_home(home: Path) -> list[Item]:
    """Write manifest, partitions, attempt logs and image files under `home`."""
    cands = items()
    manifest = [
        {
            "gbifID": c.gbif_id, "datasetKey": c.dataset, "publishingOrgKey": c.org,
            "identifier": c.url, "references": f"https://observations.example/{c.gbif_id}",
            "title": c.title, "creator": c.creator, "rightsHolder": c.holder,
            "license": c.license_raw, "label": c.label, "license_id": c.license_id,
            "license_source": "media", "host": c.url.split("/")[2], "url_sha1": c.url_sha1,
            "stream": f"{c.dataset}|{c.label}", "rank": c.rank, "selected": True, "split": c.split,
        }
        for c in cands
    ]  # fmt: skip
    _write(home / "metadata" / "manifest.parquet", manifest)
    for label in sorted({c.label for c in cands}):
        kept, log = [], []
        for c in (c for c in cands if c.label == label):
            if c.data is not None:
                file = home / c.path
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(c.data)
                with Image.open(io.BytesIO(c.data)) as img:
                    width, height = img.size
                kept.append({
                    "url": c.url, "url_sha1": c.url_sha1, "path": c.path, "split": c.split,
                    "label": c.label,
                    "gbifID": c.gbif_id, "stream": f"{c.dataset}|{c.label}", "rank": c.rank,
                    "sha256": hashlib.sha256(c.data).hexdigest(), "width": width, "height": height,
                    "bytes": len(c.data), "mime": "image/png" if c.ext == "png" else "image/jpeg",
                    "source": c.source, "fetched_at": T0,
                })  # fmt: skip
            attempts = []
            if c.source == "gbif_cache":
                attempts = [("publisher", 404, "HTTPStatus", 1), ("gbif_cache", 200, None, 1)]
            elif c.data is None and c.gbif_id == "11":
                attempts = [
                    ("publisher", None, "Timeout", 1),
                    ("publisher", None, "Timeout", 2),
                    ("gbif_cache", 404, "HTTPStatus", 1),
                ]
            elif c.data is None:
                attempts = [
                    ("publisher", 403, "HTTPStatus", 1),
                    ("gbif_cache", 404, "HTTPStatus", 1),
                ]
            else:
                attempts = [("publisher", 200, None, 1)]
            for i, (source, status, error, attempt) in enumerate(attempts):
                log.append({
                    "url": c.url, "host": c.url.split("/")[2], "final_url": c.url,
                    "status": status, "error": error, "ms": 12, "attempt": attempt,
                    "bytes": len(c.data) if c.data and error is None else 0,
                    "source": source, "stream": f"{c.dataset}|{c.label}", "gbifID": c.gbif_id,
                    "fetched_at": T0 + dt.timedelta(seconds=i),
                })  # fmt: skip
        _write(home / "metadata" / "partitions" / f"{label}.parquet", kept)
        _write(home / "metadata" / "downloads" / f"{label}.parquet", log)
    return cands


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh dataset home with manifest, partitions, attempt logs and images."""
    root = tmp_path / "data" / "plants"
    build_home(root)
    return root


@pytest.fixture
def merged(home: Path) -> Path:
    """The home after `image_metadata` ran."""
    from gbif_assets.reports.metadata import merge_image_metadata

    merge_image_metadata(home)
    return home
