"""Async GBIF API client (aiohttp): search, downloads, archives, citations, derived datasets.

The base URL comes from settings (`GBIF_API_URL`), so the same code talks to GBIF and to the
emulator. Transient trouble (429, 5xx, resets, timeouts) is retried with exponential backoff and
jitter, honouring `Retry-After`; 420 means "too many downloads running" and waits longer; 401
is a clear error that names the user and never the password.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import aiohttp

from gbif_assets.retry_after import retry_after_seconds

log = logging.getLogger(__name__)
USER_AGENT = "gbif-assets/0.1 (+https://github.com/gbif-assets)"
RETRY_STATUSES = {429, 500, 502, 503, 504}
TIMEOUTS_BEFORE_GIVING_UP = 3  # read timeouts on one call (each timeout_s long) before GBIF counts as down


class GbifError(RuntimeError):
    """GBIF answered with an error; status and a short body excerpt say which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GbifAuthError(GbifError):
    """Bad or missing credentials (HTTP 401); never carries the password."""


class DownloadGone(GbifError):
    """The download's file was erased (HTTP 410 / FILE_ERASED): request a new download."""


class GbifClient:
    """One aiohttp session to the GBIF API; use as `async with GbifClient(...) as client`."""

    def __init__(
        self,
        api_url: str,
        username: str | None = None,
        password: str | None = None,
        email: str | None = None,
        *,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 120.0,
        too_many_downloads_wait_s: float = 60.0,
        too_many_downloads_retries: int = 30,
        timeout_s: float = 60.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.username = username
        self._password = password
        self.email = email
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.too_many_wait_s = too_many_downloads_wait_s
        self.too_many_retries = too_many_downloads_retries
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"GbifClient({self.api_url!r}, username={self.username!r})"

    async def __aenter__(self) -> GbifClient:
        self._session = aiohttp.ClientSession(
            timeout=self.timeout, headers={"User-Agent": USER_AGENT}, raise_for_status=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use GbifClient as `async with GbifClient(...) as client`")
        return self._session

    def _auth(self) -> dict[str, str]:
        if not self.username or not self._password:
            raise GbifAuthError("this GBIF call needs GBIF_USERNAME and GBIF_PASSWORD", 401)
        return {"Authorization": aiohttp.encode_basic_auth(self.username, self._password)}

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return delay * (0.5 + random.random() / 2)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        body: Any = None,
        auth: bool = False,
    ) -> tuple[int, Any]:
        """One API call with retries; returns (status, parsed body) for 2xx, raises otherwise."""
        url = path if path.startswith("http") else f"{self.api_url}{path}"
        attempt = too_many = timeouts = 0
        while True:
            try:
                async with self.session.request(
                    method, url, params=params, json=body, headers=self._auth() if auth else None
                ) as response:
                    status = response.status
                    text = await response.text(errors="replace")
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                timeouts += isinstance(exc, TimeoutError)
                if timeouts >= TIMEOUTS_BEFORE_GIVING_UP:  # an API silent for minutes is down, not slow
                    raise GbifError(
                        f"{method} {url}: no answer in {self.timeout.sock_read:.0f} s, {timeouts} times: "
                        "GBIF (or GBIF_API_URL) is not answering"
                    ) from None
                if attempt >= self.max_retries:
                    raise GbifError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
                delay = self._backoff(attempt)
                log.warning(
                    "GBIF %s %s failed (%s); retrying in %.1f s",
                    method,
                    path,
                    type(exc).__name__,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if 200 <= status < 300:
                return status, _parse(text)
            if status in RETRY_STATUSES and attempt < self.max_retries:
                delay = retry_after_seconds(retry_after, self._backoff(attempt))
                log.warning("GBIF %s %s answered %s; retrying in %.1f s", method, path, status, delay)
                attempt += 1
                await asyncio.sleep(min(delay, self.backoff_max_s))
                continue
            if status == 420 and too_many < self.too_many_retries:
                too_many += 1
                log.warning(
                    "GBIF: too many simultaneous downloads for %s; waiting %.0f s",
                    self.username,
                    self.too_many_wait_s,
                )
                await asyncio.sleep(self.too_many_wait_s)
                continue
            raise self._error(status, method, url, text)

    def _error(self, status: int, method: str, url: str, text: str) -> GbifError:
        excerpt = " ".join(text.split())[:300]
        if status == 401:
            who = f"user {self.username!r}" if self.username else "no user"
            return GbifAuthError(
                f"GBIF rejected the credentials of {who} (HTTP 401): check GBIF_USERNAME and GBIF_PASSWORD",
                status,
            )
        if status == 410:
            return DownloadGone(
                f"{url}: the download file was erased by GBIF (HTTP 410); request a new download",
                status,
            )
        if status == 420:
            return GbifError(f"GBIF: too many simultaneous downloads for {self.username!r} (HTTP 420)", status)
        hint = ""
        if status == 404 and not self.api_url.endswith("/v1"):
            hint = f" (GBIF_API_URL is {self.api_url}: GBIF's API lives under /v1, like https://api.gbif.org/v1)"
        return GbifError(f"{method} {url}: HTTP {status}: {excerpt}{hint}", status)

    # -- search ----------------------------------------------------------------------------

    async def search(self, params: list[tuple[str, str]]) -> dict[str, Any]:
        """One page of /occurrence/search (GBIF caps limit at 300)."""
        _, page = await self._call("GET", "/occurrence/search", params=params)
        return page

    async def count(
        self,
        params: list[tuple[str, str]],
        facets: list[str] | None = None,
        facet_limit: int = 1000,
    ) -> dict[str, Any]:
        """Count only (limit=0), optionally with facet counts, so paging can be planned."""
        query = [*params, ("limit", "0"), ("offset", "0")]
        for facet in facets or []:
            query.append(("facet", facet))
        if facets:
            query.append(("facetLimit", str(facet_limit)))
        return await self.search(query)

    # -- downloads -------------------------------------------------------------------------

    async def request_download(self, predicate: dict[str, Any], fmt: str = "DWCA") -> str:
        """POST a download request; returns the key (GBIF answers 201 with the bare key)."""
        body = {
            "creator": self.username,
            "notificationAddresses": [self.email] if self.email else [],
            "sendNotification": bool(self.email),
            "format": fmt,
            "predicate": predicate,
        }
        _, key = await self._call("POST", "/occurrence/download/request", body=body, auth=True)
        return str(key).strip()

    async def download_status(self, key_or_doi: str) -> dict[str, Any]:
        """Status document of a download, by key or by DOI (no DataCite round trip)."""
        _, status = await self._call("GET", f"/occurrence/download/{key_or_doi}")
        if not isinstance(status, dict) or "key" not in status:
            raise GbifError(f"unexpected status document for {key_or_doi}: {str(status)[:200]}")
        return status

    async def cancel_download(self, key: str) -> None:
        """DELETE a running download."""
        await self._call("DELETE", f"/occurrence/download/request/{key}", auth=True)

    async def citation(self, key: str) -> str:
        """GBIF's citation text of a download."""
        _, text = await self._call("GET", f"/occurrence/download/{key}/citation")
        return str(text).strip()

    async def create_derived_dataset(
        self,
        title: str,
        source_url: str,
        related_datasets: dict[str, int],
        original_download_doi: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """Register a derived dataset (search-mode citation); returns GBIF's answer with the DOI."""
        body: dict[str, Any] = {
            "title": title,
            "sourceUrl": source_url,
            "relatedDatasets": related_datasets,
        }
        if original_download_doi:
            body["originalDownloadDOI"] = original_download_doi
        if description:
            body["description"] = description
        _, answer = await self._call("POST", "/derivedDataset", body=body, auth=True)
        return answer

    async def fetch_archive(self, key: str, dest: Path, chunk_bytes: int = 1 << 20) -> Path:
        """Stream the zip to `dest` (follows the 302, resumes with Range, verifies, renames).

        Idempotent: a verified file at `dest` is not fetched again.
        """
        if dest.exists() and zipfile.is_zipfile(dest):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(dest.suffix + ".part")
        url = await self._archive_location(key)
        attempt = 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                async with self.session.get(url, headers=headers) as response:
                    if response.status == 416:  # already complete
                        break
                    if response.status == 410:
                        raise DownloadGone(
                            f"download {key} was erased by GBIF (HTTP 410): request a new download",
                            410,
                        )
                    if response.status not in (200, 206):
                        text = await response.text(errors="replace")
                        raise self._error(response.status, "GET", url, text)
                    mode = "ab" if response.status == 206 else "wb"
                    with part.open(mode) as handle:
                        async for chunk in response.content.iter_chunked(chunk_bytes):
                            handle.write(chunk)
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt >= self.max_retries:
                    raise GbifError(f"archive {key}: transfer failed {attempt + 1} times: {exc}") from None
                attempt += 1
                log.warning(
                    "archive %s: transfer cut at %s bytes (%s); resuming",
                    key,
                    part.stat().st_size if part.exists() else 0,
                    type(exc).__name__,
                )
                await asyncio.sleep(self._backoff(attempt - 1))
        error = await asyncio.to_thread(_zip_problem, part)
        if error:
            part.unlink(missing_ok=True)
            raise GbifError(f"archive {key}: the downloaded file is not a valid zip ({error}); run again to re-fetch")
        os.replace(part, dest)
        return dest

    async def _archive_location(self, key: str) -> str:
        url = f"{self.api_url}/occurrence/download/request/{key}.zip"
        for attempt in range(self.max_retries + 1):
            async with self.session.get(url, allow_redirects=False) as response:
                status = response.status
                location = response.headers.get("Location")
                text = "" if status in (301, 302, 303, 307, 308) else await response.text(errors="replace")
            if status in (301, 302, 303, 307, 308) and location:
                return str(response.url.join(aiohttp.client.URL(location)))
            if status == 200:
                return url
            if status == 404:
                raise GbifError(f"download {key} has no file yet (HTTP 404): is it SUCCEEDED?", 404)
            if status in RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(self._backoff(attempt))
                continue
            raise self._error(status, "GET", url, text)
        raise GbifError(f"download {key}: no answer after retries")


def _parse(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _zip_problem(path: Path) -> str | None:
    """None when every member's CRC checks out, else what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            return f"member {bad} is corrupt" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:  # zlib: a member's deflate data is broken
        return str(exc) or type(exc).__name__
