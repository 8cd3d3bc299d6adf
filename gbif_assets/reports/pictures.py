"""Pictures a person checks at a glance: a contact sheet per label and the class balance."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from gbif_assets.fetch.partition import label_dir
from gbif_assets.reports.metadata import rows_of

THUMB = 128
PER_SHEET = 36


def contact_sheets(home: Path, per_sheet: int = PER_SHEET) -> list[Path]:
    """reports/contact_sheets/<label>.png: a grid of the first train images of each label."""
    rows = rows_of(
        home,
        "SELECT label, path FROM images ORDER BY label, CASE split WHEN 'train' THEN 0 ELSE 1 END, rank, path",
    )
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["path"])
    out_dir = home / "reports" / "contact_sheets"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for label, paths in by_label.items():
        paths = paths[:per_sheet]
        cols = min(6, len(paths))
        grid_rows = (len(paths) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * THUMB, grid_rows * THUMB + 20), "white")
        ImageDraw.Draw(sheet).text((4, 4), f"label {label}: {len(by_label[label])} images", fill="black")
        for i, rel in enumerate(paths):
            try:
                with Image.open(home / rel) as img:
                    img.draft("RGB", (THUMB, THUMB))
                    thumb = ImageOps.contain(img.convert("RGB"), (THUMB, THUMB))
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"contact sheet: cannot read {rel} ({exc.__class__.__name__}); rebuild its `images` partition"
                ) from exc
            x = (i % cols) * THUMB + (THUMB - thumb.width) // 2
            y = 20 + (i // cols) * THUMB + (THUMB - thumb.height) // 2
            sheet.paste(thumb, (x, y))
        path = out_dir / f"{label_dir(label)}.png"
        tmp = path.with_suffix(".png.tmp")
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
        written.append(path)
    return written


def class_balance_plot(home: Path) -> tuple[Path, list[dict[str, Any]]]:
    """reports/class_balance.png: kept images per label, stacked by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(
        home,
        """SELECT label, count(*) FILTER (WHERE split = 'train') AS train,
                  count(*) FILTER (WHERE split = 'val') AS val,
                  count(*) FILTER (WHERE split = 'test') AS test, count(*) AS total
           FROM images GROUP BY label ORDER BY total DESC, label""",
    )
    shown = rows[:60]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(shown) + 2), 4), dpi=100)
    x = list(range(len(shown)))
    bottom = [0] * len(shown)
    for split, color in (("train", "#2b6cb0"), ("val", "#dd6b20"), ("test", "#38a169")):
        values = [r[split] for r in shown]
        ax.bar(x, values, bottom=bottom, color=color, label=split)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(x, [str(r["label"]) for r in shown], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("class balance of the kept images")
    ax.legend()
    fig.tight_layout()
    path = home / "reports" / "class_balance.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path, rows
