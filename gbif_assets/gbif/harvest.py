"""Search mode without silent truncation.

GBIF's search API returns at most 300 records a page and refuses `offset + limit > 100,000`.
Each stream (one combination of `split_streams_by` values) is counted first (`limit=0`), then only
the pages the balance needs (plus a reserve for link rot) are fetched, spread over the stream
rather than its first pages. A stream whose needed window passes 100,000 records is split by
facets (year, then datasetKey); if that still cannot reach every record, the harvest stops and
says to use download mode.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gbif_assets.gbif.client import GbifClient
from gbif_assets.gbif.predicate import query_to_search_params

PAGE = 300
WINDOW = 100_000
SPLIT_FACETS = ("year", "datasetKey")
CONCURRENT_PAGES = 3


class HarvestTooLarge(RuntimeError):
    """The search API cannot reach every record needed: use download mode."""


def reserve_for(need: int) -> int:
    """Records to fetch for `need` images: half again as many, plus 20, to replace dead links."""
    return math.ceil(need * 1.5) + 20


@dataclass
class HarvestReport:
    """What was asked of GBIF, per stream and per request (shown in the asset's metadata)."""

    streams: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def requests_as_rows(self) -> list[dict[str, Any]]:
        return self.requests

    def streams_as_rows(self) -> list[dict[str, Any]]:
        return self.streams


def _with(params: list[tuple[str, str]], fixed: dict[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in params if k not in fixed] + [(k, str(v)) for k, v in fixed.items()]


async def _stream_values(
    client: GbifClient,
    base: list[tuple[str, str]],
    query: dict[str, list[Any]],
    streams_by: list[str],
    report: HarvestReport,
) -> list[dict[str, str]]:
    """Stream combinations: from the query's lists, or from facets (over the search parameters
    `base`) for fields it leaves open."""
    choices: list[list[str]] = []
    for name in streams_by:
        if name in query:
            choices.append([str(v) for v in query[name]])
        else:
            answer = await client.count(base, facets=[name], facet_limit=10_000)
            report.requests.append({"purpose": f"stream values of {name}", "params": _fmt(base) + f"&facet={name}"})
            counts = (answer.get("facets") or [{}])[0].get("counts", [])
            choices.append([str(c["name"]) for c in counts])
    return [dict(zip(streams_by, combo, strict=True)) for combo in itertools.product(*choices)] or [{}]


def _fmt(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params)


async def _windows(
    client: GbifClient,
    params: list[tuple[str, str]],
    total: int,
    report: HarvestReport,
    depth: int = 0,
) -> list[tuple[list[tuple[str, str]], int]]:
    """Sub-queries each within the 100,000 window, covering every record of `params`."""
    if total <= WINDOW:
        return [(params, total)]
    if depth >= len(SPLIT_FACETS):
        raise HarvestTooLarge(
            f"{total:,} records match {_fmt(params)} and splitting by {', '.join(SPLIT_FACETS)} cannot bring "
            "every part under GBIF's 100,000 search window: use `source.mode: download`"
        )
    facet = SPLIT_FACETS[depth]
    answer = await client.count(params, facets=[facet], facet_limit=100_000)
    report.requests.append({"purpose": f"split by {facet}", "params": _fmt(params) + f"&facet={facet}"})
    counts = (answer.get("facets") or [{}])[0].get("counts", [])
    if sum(c["count"] for c in counts) < total:
        raise HarvestTooLarge(
            f"{total:,} records match {_fmt(params)}, but facet {facet} covers only "
            f"{sum(c['count'] for c in counts):,}: use `source.mode: download`"
        )
    parts: list[tuple[list[tuple[str, str]], int]] = []
    for count in counts:
        sub = _with(params, {facet: str(count["name"])})
        parts += await _windows(client, sub, int(count["count"]), report, depth + 1)
    return parts


def _limit(offset: int) -> int:
    """A page's size: GBIF refuses offset + limit > 100,000, so the last page of a window is shorter."""
    return min(PAGE, WINDOW - offset)


def _offsets(total: int, wanted: int) -> list[int]:
    """Page offsets that cover `wanted` records spread evenly across `total`."""
    pages = math.ceil(total / PAGE)
    take = min(pages, math.ceil(wanted / PAGE))
    if take >= pages:
        return [i * PAGE for i in range(pages)]
    stride = pages / take
    return sorted({int(i * stride) * PAGE for i in range(take)})


async def harvest(
    client: GbifClient,
    query: dict[str, list[Any]],
    streams_by: list[str],
    need_per_stream: int | None,
    media_types: Sequence[str] = ("StillImage",),
) -> tuple[list[dict[str, Any]], HarvestReport]:
    """Occurrence records for every stream: all of them, or what the balance needs plus a reserve."""
    report = HarvestReport()
    base = query_to_search_params(query, media_types)
    semaphore = asyncio.Semaphore(CONCURRENT_PAGES)
    records: dict[int, dict[str, Any]] = {}

    async def page(params: list[tuple[str, str]], offset: int) -> list[dict[str, Any]]:
        async with semaphore:
            answer = await client.search([*params, ("limit", str(_limit(offset))), ("offset", str(offset))])
        return answer.get("results", [])

    for fixed in await _stream_values(client, base, query, streams_by, report):
        params = _with(base, fixed)
        total = int((await client.count(params)).get("count", 0))
        report.requests.append({"purpose": "count", "params": _fmt(params) + "&limit=0"})
        wanted = total if need_per_stream is None else min(total, reserve_for(need_per_stream))
        windows = [(params, total)]
        if total > WINDOW:  # split, so that a sample is spread over every record, not the first 100,000
            try:
                windows = await _windows(client, params, total, report)
            except HarvestTooLarge:
                if wanted > WINDOW:
                    raise
                report.notes.append(
                    f"stream {fixed or '(all)'}: {wanted:,} records sampled from the first 100,000 of {total:,} "
                    "(GBIF's search window; facets could not split it): use download mode for an even sample"
                )
        fetched = 0
        for sub, sub_total in windows:
            share = sub_total if wanted >= total else math.ceil(wanted * sub_total / max(total, 1))
            offsets = _offsets(min(sub_total, WINDOW), share)
            for offset in offsets:
                report.requests.append(
                    {"purpose": "page", "params": _fmt(sub) + f"&limit={_limit(offset)}&offset={offset}"}
                )
            pages = await asyncio.gather(*(page(sub, o) for o in offsets))
            for results in pages:
                for record in results:
                    records[int(record["key"])] = record
                    fetched += 1
        report.streams.append(
            {
                "stream": "|".join(f"{k}={v}" for k, v in fixed.items()) or "(all)",
                "matching": total,
                "wanted": wanted,
                "fetched": fetched,
                "sub_queries": len(windows),
            }
        )
        if total == 0:
            report.notes.append(f"stream {fixed or '(all)'} matches no occurrence with images")
    return list(records.values()), report
