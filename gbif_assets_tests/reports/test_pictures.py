"""Contact sheets and the class-balance plot."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from gbif_assets.reports.pictures import THUMB, class_balance_plot, contact_sheets


def test_one_contact_sheet_per_label(merged: Path) -> None:
    sheets = contact_sheets(merged)
    assert sheets == [merged / "reports" / "contact_sheets" / f"{label}.png" for label in ("1001", "2002")]
    with Image.open(sheets[0]) as img:
        # label 1001 keeps 5 images: one row of 5 thumbnails under a caption strip.
        assert img.format == "PNG" and img.size == (5 * THUMB, THUMB + 20)
        # a thumbnail is painted (the background is white).
        assert img.convert("RGB").getpixel((THUMB // 2, 20 + THUMB // 2)) != (255, 255, 255)
    with Image.open(sheets[1]) as img:
        assert img.size == (4 * THUMB, THUMB + 20)


def test_contact_sheet_is_capped(merged: Path) -> None:
    sheets = contact_sheets(merged, per_sheet=3)
    with Image.open(sheets[0]) as img:
        assert img.size == (3 * THUMB, THUMB + 20)


def test_class_balance_plot(merged: Path) -> None:
    path, rows = class_balance_plot(merged)
    assert path == merged / "reports" / "class_balance.png"
    assert rows == [
        {"label": "1001", "train": 3, "val": 1, "test": 1, "total": 5},
        {"label": "2002", "train": 2, "val": 1, "test": 1, "total": 4},
    ]
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 600


def test_unreadable_image_is_named(merged: Path) -> None:
    victim = next((merged / "images" / "train" / "1001").glob("*.jpg"))
    victim.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"contact sheet: cannot read {victim.relative_to(merged).as_posix()}"):
        contact_sheets(merged)
