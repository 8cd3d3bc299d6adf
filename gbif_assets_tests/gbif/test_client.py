"""The GBIF client against the emulator and against small hostile servers: retries, auth, resume."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
import zipfile
from pathlib import Path

import pytest
from aiohttp import web

from gbif_assets.gbif import (
    DownloadGone,
    GbifAuthError,
    GbifClient,
    GbifError,
    harvest,
    query_to_predicate,
)
from gbif_assets.gbif.harvest import HarvestTooLarge
from gbif_assets_tests.conftest import GBIF_TEST_PASSWORD, GBIF_TEST_USER, corrupt_member

QUERY = {"speciesKey": [5352251, 3190653], "datasetKey": ["7a3679ef-5582-4aaa-81f0-8c2545cafc81"]}


def _client(url: str, password: str = GBIF_TEST_PASSWORD, **kw) -> GbifClient:
    return GbifClient(url, GBIF_TEST_USER, password, "t@example.org", backoff_base_s=0.01, **kw)


def test_download_roundtrip_with_resume(emulator, tmp_path: Path) -> None:
    async def go() -> tuple[dict, Path]:
        async with _client(emulator.api_url) as client:
            key = await client.request_download(query_to_predicate(QUERY))
            emulator.set_status(key, "SUCCEEDED")
            status = await client.download_status(key)
            emulator.config.cut_file_transfers = 1  # the first transfer breaks half-way
            path = await client.fetch_archive(key, tmp_path / f"{key}.zip")
            again = await client.fetch_archive(key, tmp_path / f"{key}.zip")  # idempotent
            assert again == path
            return status, path

    status, path = asyncio.run(go())
    assert status["status"] == "SUCCEEDED" and path.stat().st_size == status["size"]
    assert not list(tmp_path.glob("*.part"))


def test_bad_password_never_printed(emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def go() -> None:
        async with _client(emulator.api_url, password="s3cret-Pa55") as client:
            await client.request_download(query_to_predicate(QUERY))

    with pytest.raises(GbifAuthError) as info:
        asyncio.run(go())
    assert GBIF_TEST_USER in str(info.value)
    assert "s3cret-Pa55" not in str(info.value) and "s3cret-Pa55" not in caplog.text
    assert "s3cret-Pa55" not in repr(_client(emulator.api_url, password="s3cret-Pa55"))


def test_erased_download_says_request_again(emulator, tmp_path: Path) -> None:
    async def go() -> None:
        async with _client(emulator.api_url) as client:
            key = await client.request_download({"type": "equals", "key": "YEAR", "value": "1777"})
            emulator.set_status(key, "FILE_ERASED")
            await client.fetch_archive(key, tmp_path / "x.zip")

    with pytest.raises(DownloadGone, match="request a new download"):
        asyncio.run(go())


def test_an_archive_with_a_corrupt_member_is_refused_and_fetched_anew_next_time(tmp_path: Path) -> None:
    """A zip whose directory is fine but whose member data is broken (zlib refuses it) is not a
    valid archive: a clear error, no .part left behind, so the next run fetches it again instead
    of resuming a file that can never check out."""
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("occurrence.txt", "".join(f"{i}\tPlantae\t{i * 7919 % 1000}\n" for i in range(20_000)))
    body = corrupt_member(good, tmp_path / "bad.zip", "occurrence.txt").read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/zip")

    dest = tmp_path / "archive" / "0000001-000000000000000.zip"
    with pytest.raises(GbifError, match=r"not a valid zip .*run again to re-fetch"):
        _against(handler, lambda client: client.fetch_archive("0000001-000000000000000", dest))
    assert not dest.exists() and not list(dest.parent.iterdir())


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


def _against(handler, call, api_url=lambda url: url, **client_kw):
    """Run `call(client)` against a throwaway server answering with `handler`."""

    async def go():
        runner, url = await _serve(handler)
        try:
            async with _client(api_url(url), **client_kw) as client:
                return await call(client)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


@pytest.mark.parametrize("retry_after", ["1", "http-date"])
def test_429_and_5xx_back_off_and_honour_retry_after(retry_after: str) -> None:
    calls: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            value = retry_after if retry_after != "http-date" else email.utils.formatdate(time.time() + 2, usegmt=True)
            return web.Response(status=429, text="slow down", headers={"Retry-After": value})
        if len(calls) == 2:
            return web.Response(status=503, text="busy")
        return web.json_response({"count": 7, "results": []})

    async def go() -> dict:
        runner, url = await _serve(handler)
        try:
            async with _client(url) as client:
                return await client.count([("speciesKey", "1")])
        finally:
            await runner.cleanup()

    assert asyncio.run(go())["count"] == 7
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.9


def test_420_waits_then_succeeds() -> None:
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            return web.Response(status=420, text="Too many simultaneous downloads")
        return web.Response(status=201, text="0000009-000000000000000", content_type="application/json")

    async def go() -> str:
        runner, url = await _serve(handler)
        try:
            async with _client(url, too_many_downloads_wait_s=0.1) as client:
                return await client.request_download({"type": "equals", "key": "YEAR", "value": "2000"})
        finally:
            await runner.cleanup()

    assert asyncio.run(go()) == "0000009-000000000000000" and len(calls) == 2


def test_other_errors_name_status_and_body() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=400, text="Invalid predicate: bogus")

    def go() -> None:
        _against(handler, lambda client: client.request_download({"type": "equals", "key": "YEAR", "value": "2000"}))

    with pytest.raises(GbifError, match="HTTP 400: Invalid predicate: bogus"):
        go()


def test_harvest_fetches_every_stream_and_records_requests(emulator) -> None:
    async def go():
        async with _client(emulator.api_url) as client:
            return await harvest(client, QUERY, ["speciesKey", "datasetKey"], None)

    records, report = asyncio.run(go())
    assert len(report.streams) == 2 and all(s["fetched"] == s["matching"] > 0 for s in report.streams)
    assert len(records) == sum(s["matching"] for s in report.streams)
    assert any("limit=0" in r["params"] for r in report.requests)


def test_harvest_pages_only_what_the_balance_needs(emulator) -> None:
    async def go():
        async with _client(emulator.api_url) as client:
            return await harvest(client, {"speciesKey": [2683264]}, [], 10)

    _, report = asyncio.run(go())
    assert report.streams[0]["wanted"] == 35  # 10 needed x 1.5 + 20 reserve for link rot
    pages = [r for r in report.requests if r["purpose"] == "page"]
    assert len(pages) == 1 and "limit=300&offset=0" in pages[0]["params"]


def _paged_search(years: dict[str, int]):
    """A search endpoint with GBIF's paging rules: 400 past offset + limit 100,000; year facets."""

    async def handler(request: web.Request) -> web.Response:
        q = request.query
        year = q.get("year")
        count = years[year] if year else sum(years.values())
        if "facet" in q:
            counts = [{"name": y, "count": n} for y, n in years.items()]
            return web.json_response({"count": count, "results": [], "facets": [{"field": "YEAR", "counts": counts}]})
        limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
        if offset + limit > 100_000:
            return web.Response(status=400, text=f"Max offset of 100000 exceeded: {offset} + {limit}")
        n = max(0, min(limit, count - offset))
        base = int(year or 0) * 1_000_000
        return web.json_response(
            {"count": count, "results": [{"key": base + offset + i, "media": []} for i in range(n)]}
        )

    return handler


def _harvest_from(handler, need: int | None):
    return _against(handler, lambda client: harvest(client, {"speciesKey": [1]}, [], need))


def test_harvest_splits_past_the_offset_window() -> None:
    """A stream of 150,000 records is split by year so every record stays reachable."""
    records, report = _harvest_from(_paged_search({str(1990 + y): 5000 for y in range(30)}), None)
    assert len(records) == 150_000 and report.streams[0]["sub_queries"] == 30


def test_harvest_at_the_window_edge_shortens_its_last_page() -> None:
    """99,950 records: the page at offset 99,900 asks for 100, not 300 (GBIF answers 400 past 100,000)."""
    records, report = _harvest_from(_paged_search({"2000": 99_950}), None)
    assert len(records) == 99_950
    assert any(r["params"].endswith("limit=100&offset=99900") for r in report.requests)


def test_a_sample_of_a_large_stream_reaches_past_the_first_100000() -> None:
    """20,000 wanted of 150,000: the stream is still split, so the sample is spread over every
    record, not drawn from the first 100,000 only."""
    records, report = _harvest_from(_paged_search({str(1990 + y): 5000 for y in range(30)}), 20_000)
    assert report.streams[0]["sub_queries"] == 30
    years = {int(r["key"]) // 1_000_000 for r in records}
    assert len(years) == 30  # every part of the stream contributes


def test_harvest_refuses_what_it_cannot_reach() -> None:
    async def handler(request: web.Request) -> web.Response:
        if "facet" in request.query:
            return web.json_response(
                {
                    "count": 200_000,
                    "results": [],
                    "facets": [{"field": "X", "counts": [{"name": "a", "count": 200_000}]}],
                }
            )
        return web.json_response({"count": 200_000, "results": []})

    async def go():
        runner, url = await _serve(handler)
        try:
            async with _client(url) as client:
                return await harvest(client, {"speciesKey": [1]}, [], None)
        finally:
            await runner.cleanup()

    with pytest.raises(HarvestTooLarge, match=r"use `source\.mode: download`"):
        asyncio.run(go())


def test_an_api_that_never_answers_is_given_up_after_three_timeouts() -> None:
    """Connections accepted, no answer: three read timeouts end the call (not seven retries of a
    minute each), with a message that says the API is not answering."""
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(2)  # far past the client's 0.3 s; short, so the server's shutdown is quick
        return web.json_response({})

    def go() -> None:
        _against(handler, lambda client: client.count([("speciesKey", "1")]), timeout_s=0.3)

    started = time.monotonic()
    with pytest.raises(GbifError, match=r"no answer in 0 s, 3 times: GBIF \(or GBIF_API_URL\) is not answering"):
        go()
    assert calls == 3 and time.monotonic() - started < 8


def test_a_404_from_an_api_url_without_v1_says_where_the_api_lives() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=404, text="Not Found")

    def go() -> None:
        _against(
            handler, lambda client: client.count([("speciesKey", "1")]), api_url=lambda url: url.removesuffix("/v1")
        )

    with pytest.raises(GbifError, match=r"HTTP 404: Not Found \(GBIF_API_URL is .*: GBIF's API lives under /v1"):
        go()
