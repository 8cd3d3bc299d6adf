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
    words = " ".join(re.sub(r"[^a-z0-9.]+", " ", lower).split())
    for spaced, joined in _PHRASES:
        words = words.replace(spaced, joined)
    versions = {f"{a}.{b}" for a, b in _ANY_VERSION_RE.findall(lower)}
    if len(versions) > 1 or not versions <= set(VERSIONS):
        return "unknown"  # a version no deed has (a jurisdiction port such as 2.1 JP), or two of them
    version = versions.pop() if versions else None
    if re.search(r"\bcc0\b|\bcc 0\b", words) or "publicdomaindedication" in lower.replace(" ", ""):
        return "CC0-1.0"
    if "public domain" in words or re.search(r"\bpdm\b", words):
        return "PDM-1.0"
    if not (re.search(r"\bcc\b|creative commons", words) or _NAMED_RE.fullmatch(words)):
        return "unknown"  # free text ("Photo by J. Smith", "used by permission") is no licence
    parts = {part for part, pattern in _PARTS if re.search(pattern, words)}
    return _cc_id(parts, version)


# Spellings of the licence elements, joined to one word each before the parts are read.
_PHRASES = (("non commercial", "noncommercial"), ("share alike", "sharealike"), ("no derivatives", "noderivatives"),
            ("no derivs", "noderivs"), ("no derivative works", "noderivatives"))  # fmt: skip
_PARTS = (("nc", r"\bnc\b|noncommercial"), ("sa", r"\bsa\b|sharealike"), ("nd", r"\bnd\b|noderiv"))
# A licence named without "CC" or "Creative Commons", and nothing else: "Attribution-NonCommercial 4.0
# International", "BY-SA 3.0"
_NAMED_RE = re.compile(
    r"(attribution|by)( (noncommercial|sharealike|noderivs|noderivatives|nc|sa|nd))*( \d\.\d)?"
    r"( (international|unported|generic|license|licence))*"
)
_ANY_VERSION_RE = re.compile(r"(?<![\d.])(\d)[.,](\d)(?![\d])")


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
