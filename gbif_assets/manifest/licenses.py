"""Media licences are free text; training sets need canonical ids.

Publishers write licences as Creative Commons URLs (http or https, with or without www,
/legalcode, /deed.xx, jurisdiction ports), names ("CC BY-NC 4.0", "Attribution-NonCommercial"),
GBIF enum names from occurrence.txt (CC_BY_4_0), or "All rights reserved". Everything maps to one
id of `gbif_assets.recipe.LICENSE_IDS`; what cannot be read is "unknown", never guessed upward.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from gbif_assets.recipe import LICENSE_IDS

VERSIONS = ("1.0", "2.0", "2.5", "3.0", "4.0")
_URL_RE = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z-]+)(?:/(\d\.\d))?", re.I)
_VERSION_RE = re.compile(r"(?<![\d.])([1-4])[.,]([05])(?![\d])")
_RESERVED_RE = re.compile(r"all rights reserved|©|\(c\)|copyright|tous droits", re.I)


def _cc_id(parts: set[str], version: str | None) -> str:
    version = version or "4.0"
    if version not in VERSIONS:
        return "unknown"
    if "nd" in parts and "sa" in parts:
        return "unknown"  # no such licence
    kind = "BY" + ("-NC" if "nc" in parts else "") + ("-SA" if "sa" in parts else "") + ("-ND" if "nd" in parts else "")
    result = f"CC-{kind}-{version}"
    return result if result in LICENSE_IDS else "unknown"


def normalize_license(raw: str | None) -> str | None:
    """Canonical licence id of a free-text licence; None when no licence is given at all."""
    if raw is None:
        return None
    text = raw.strip()
    if not text:
        return None
    lower = text.lower()
    match = _URL_RE.search(lower)
    if match:
        family, code, version = match.groups()
        if family == "publicdomain":
            if code == "zero":
                return "CC0-1.0"
            if code == "mark":
                return "PDM-1.0"
            return "unknown"
        return _cc_id(set(code.split("-")) - {"by"}, version)
    enum = re.fullmatch(r"cc(0|_by(?:_nc)?(?:_sa)?(?:_nd)?)_(\d)_(\d)", lower)
    if enum:
        if enum.group(1) == "0":
            return "CC0-1.0"
        return _cc_id(set(enum.group(1).split("_")[2:]), f"{enum.group(2)}.{enum.group(3)}")
    if lower in ("unspecified", "unsupported", "unknown", "n/a", "none") or re.match(r"^[a-z]+://", lower):
        return "unknown"  # any URL that is not a Creative Commons deed is a custom licence
    if _RESERVED_RE.search(lower):
        return "all-rights-reserved"
    words = re.sub(r"[^a-z0-9.]+", " ", lower.replace("non-commercial", "noncommercial")).split()
    version_match = _VERSION_RE.search(lower)
    version = f"{version_match.group(1)}.{version_match.group(2)}" if version_match else None
    if (
        "cc0" in words
        or "zero" in words
        or ("cc" in words and "0" in words)
        or "publicdomaindedication" in lower.replace(" ", "")
    ):
        return "CC0-1.0"
    if "public" in words and "domain" in words:
        return "PDM-1.0"
    if "pdm" in words:
        return "PDM-1.0"
    joined = " ".join(words)
    is_cc = bool(re.search(r"\bcc\b|creative commons|\bby\b|attribution", joined))
    if not is_cc:
        return "unknown"
    parts: set[str] = set()
    if re.search(r"\bnc\b|noncommercial", joined):
        parts.add("nc")
    if re.search(r"\bsa\b|sharealike|share alike", joined):
        parts.add("sa")
    if re.search(r"\bnd\b|noderiv|no deriv", joined):
        parts.add("nd")
    for token in re.findall(r"by(?:-nc)?(?:-sa)?(?:-nd)?", lower.replace(" ", "-")):
        parts |= set(token.split("-")) - {"by"}
    return _cc_id(parts, version)


def license_url(license_id: str) -> str | None:
    """The canonical deed URL of a licence id (for attribution lines)."""
    if license_id == "CC0-1.0":
        return "https://creativecommons.org/publicdomain/zero/1.0/"
    if license_id == "PDM-1.0":
        return "https://creativecommons.org/publicdomain/mark/1.0/"
    match = re.fullmatch(r"CC-(BY(?:-NC)?(?:-SA)?(?:-ND)?)-(\d\.\d)", license_id)
    if match:
        return f"https://creativecommons.org/licenses/{match.group(1).lower()}/{match.group(2)}/"
    return None


def register_license_map(con: duckdb.DuckDBPyConnection, table: str, columns: list[str]) -> str:
    """A temp table raw -> license_id for every distinct licence text in `table` (fast on 8M rows).

    Normalizing the few thousand distinct strings in Python and joining back keeps the SQL
    simple and avoids a per-row Python UDF.
    """
    union = " UNION ".join(f'SELECT DISTINCT "{c}" AS raw FROM "{table}"' for c in columns)
    raws = [r[0] for r in con.execute(union).fetchall() if r[0] is not None]
    arrow = pa.table(
        {
            "raw": pa.array(raws, pa.string()),
            "license_id": pa.array([normalize_license(r) for r in raws], pa.string()),
        }
    )
    con.register("license_map_arrow", arrow)
    con.execute("CREATE OR REPLACE TEMP TABLE license_map AS SELECT * FROM license_map_arrow")
    con.unregister("license_map_arrow")
    return "license_map"
